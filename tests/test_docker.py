"""The Docker image's start command, run as the image would run it (there is no Docker
engine in the test environment): its ENTRYPOINT plus what follows the image name in
``docker run``, with its ENV."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from gateway.cli.main import build_parser, listen_address
from gateway.config.settings import ConfigError, load_settings
from tests.conftest import DEFAULT_CONFIG, PLANTED_KEY
from tests.test_cli import free_port, running, wait_healthy

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def image() -> tuple[dict[str, str], list[str], list[str]]:
    """The Dockerfile's ``ENV`` (all of them), ``ENTRYPOINT`` and ``CMD`` (exec forms)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    cmd: list[str] = []
    for line in text.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
        elif instruction == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif instruction == "CMD":
            cmd = json.loads(rest)
    return env, entrypoint, cmd


def docker_run(*arguments: str) -> list[str]:
    """The command ``docker run IMAGE ARGUMENTS`` starts: arguments replace ``CMD``."""
    _, entrypoint, cmd = image()
    return entrypoint + (list(arguments) or cmd)


@pytest.mark.parametrize("arguments", [(), ("--workers", "2"), ("--workers", "2", "--port", "9")])
def test_the_image_listens_on_all_interfaces_whatever_follows_its_name(arguments):
    env, _, _ = image()
    command = docker_run(*arguments)
    assert command[:2] == ["geopera-gateway", "serve"]
    args = build_parser().parse_args(command[1:])
    settings = load_settings(DEFAULT_CONFIG, environ={**env, "GEOPERA_API_KEY": PLANTED_KEY})
    port = 9 if "--port" in arguments else 8080
    assert listen_address(args, settings) == ("0.0.0.0", port)
    assert f"EXPOSE {8080}" in DOCKERFILE.read_text()


def test_a_bad_port_in_the_environment_is_a_config_error():
    with pytest.raises(ConfigError, match="GEOPERA_PORT: must be a port number"):
        load_settings(DEFAULT_CONFIG, environ={"GEOPERA_API_KEY": PLANTED_KEY, "GEOPERA_PORT": "x"})


async def test_docker_run_with_workers_serves_on_the_images_address(emulator, tmp_path):
    env, _, _ = image()
    port = free_port()  # the image's 8080 may be taken on a shared machine
    env.update(
        GEOPERA_PORT=str(port),
        GEOPERA_CONFIG=str(DEFAULT_CONFIG),  # the image's copy of it
        GEOPERA_CACHE_DIR=str(tmp_path / "cache"),
        GEOPERA_BASE_URL=emulator.url,
        GEOPERA_API_KEY=PLANTED_KEY,
    )
    program, *arguments = docker_run("--workers", "2")
    script = str(Path(sys.executable).with_name(program))  # the installed console script
    started = f"started 2 workers on 0.0.0.0 port {port}"
    async with running(*arguments, env=env, ready=started, program=(script,)) as (_, lines):
        await wait_healthy(f"http://127.0.0.1:{port}")
    assert f"on http://127.0.0.1:{port}" in "".join(lines)  # the banner shows loopback
