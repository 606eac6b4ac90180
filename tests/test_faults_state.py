"""Faults in the gateway's own state and in what the upstream sends: hostile tile answers,
encoded echoes of the key, breakers, concurrency leases, damaged and full caches.

Everything runs against real things: the emulator as an HTTP server (its fault injection
stands in for a hostile upstream), real diskcache directories, real subprocesses, and a real
full disk (a small tmpfs; those tests skip when it cannot be mounted).
"""

from __future__ import annotations

import base64

import pytest

from gateway.emulator import FAULTS_KEY, Fault
from tests.conftest import PLANTED_KEY

OLINDA = "/tiles/olinda/13/3302/4278.png"
ATTEMPTS = 3  # retry_attempts in the demo config


async def problem(response) -> dict:
    assert response.headers["Content-Type"] == "application/problem+json"
    return await response.json(content_type=None)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)


# --------------------------------------------------------------------------- redaction


def encoded_forms(key: str) -> list[str]:
    """The key and ``Bearer <key>`` in every encoding an upstream might echo them in."""
    forms = []
    for text in (key, f"Bearer {key}"):
        raw = text.encode()
        std = base64.b64encode(raw).decode()
        url = base64.urlsafe_b64encode(raw).decode()
        forms += [std, std.rstrip("="), url, url.rstrip("="), raw.hex(), raw.hex().upper()]
        forms += ["".join(f"%{b:02X}" for b in raw), "".join(f"%{b:02x}" for b in raw)]
    return forms


@pytest.mark.parametrize("encoding", ["base64", "base64url", "hex", "percent"])
async def test_an_encoded_echo_of_the_key_never_reaches_the_log(
    gateway, emulator, caplog, encoding
):
    emulator.app[FAULTS_KEY].add(Fault("echo-key", encoding=encoding, count=ATTEMPTS))
    response = await gateway.get(OLINDA)
    assert response.status == 502
    text = log_text(caplog)
    echoes = [line for line in text.splitlines() if "backend failed for" in line]
    assert echoes and all("***" in line for line in echoes)  # logged, redacted
    for form in encoded_forms(PLANTED_KEY):
        assert form not in text


def test_redaction_finds_the_key_inside_longer_encoded_text():
    from gateway.secrets import Secret, redact

    secret = Secret("gpra_another-planted-key-0123456789")
    for prefix in ("", "x", "xy", "user=admin&auth=Bearer "):
        raw = (prefix + secret.reveal() + " trailing").encode()
        for encoded in (
            base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
            raw.hex(),
        ):
            cleaned = redact(f"detail: {encoded}")
            assert "***" in cleaned
            for form in encoded_forms(secret.reveal()):
                assert form not in cleaned
    assert redact("nothing secret here") == "nothing secret here"


# --------------------------------------------------------------------------- hostile tiles


@pytest.mark.parametrize("kind", ["huge-png", "corrupt-png"])
async def test_a_hostile_png_is_502_and_never_cached(gateway, emulator, caplog, kind):
    emulator.app[FAULTS_KEY].add(Fault(kind))
    response = await gateway.get(OLINDA)
    assert response.status == 502
    assert (await problem(response))["type"].endswith("upstream-bad-response")
    assert "Traceback" not in log_text(caplog)
    again = await gateway.get(OLINDA)  # nothing was cached: the upstream is asked again
    assert again.status == 200 and again.headers["X-Cache"] == "MISS"
    assert emulator.renders() == 2
