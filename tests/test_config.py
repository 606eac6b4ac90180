"""Config loading: the demo default is valid, and every mistake names file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.layers import RasterLayerTable, TerrainLayerTable
from gateway.config.settings import (
    ConfigError,
    Rate,
    ServerSettings,
    Settings,
    default_config_path,
    load_settings,
)
from gateway.config.tables import Table
from gateway.layers import RENDER_PARAMS
from gateway.secrets import Secret, redact
from gateway.upstream.client import parse_retry_after
from tests.conftest import DEFAULT_CONFIG

ENV = {"GEOPERA_API_KEY": "gpra_config-test-key-1"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_repo_config_is_the_packaged_demo_default():
    assert DEFAULT_CONFIG.read_bytes() == default_config_path().read_bytes()
    settings = load_settings(DEFAULT_CONFIG, environ=ENV)
    assert set(settings.layers) == {"olinda", "olinda-ndvi", "bahamas", "st-helens"}
    assert settings.default_layer == "olinda"
    assert settings.layers["st-helens"].operation == "cog.tile.terrain"
    assert settings.layers["olinda"].operation == "cog.tile.render"


def test_environment_overrides_base_url_and_cache_dir(tmp_path):
    env = {**ENV, "GEOPERA_BASE_URL": "https://api.geopera.com/", "GEOPERA_CACHE_DIR": "/x/y"}
    settings = load_settings(DEFAULT_CONFIG, environ=env)
    assert settings.upstream.base_url == "https://api.geopera.com"
    assert str(settings.cache.directory) == "/x/y"


def test_missing_key_says_how_to_set_it():
    with pytest.raises(ConfigError) as error:
        load_settings(DEFAULT_CONFIG, environ={})
    assert str(DEFAULT_CONFIG) in str(error.value)
    assert "GEOPERA_API_KEY" in str(error.value)


def test_key_from_a_secret_file(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("gpra_from-file-123\n")
    settings = load_settings(DEFAULT_CONFIG, environ={"GEOPERA_API_KEY_FILE": str(secret)})
    assert settings.upstream.api_key.reveal() == "gpra_from-file-123"


def test_key_written_in_the_file_is_refused(tmp_path):
    path = write(tmp_path, '[upstream]\nbase_url = "http://x"\napi_key = "gpra_oops12345"\n')
    with pytest.raises(ConfigError, match=r"upstream\.api_key: .*GEOPERA_API_KEY") as error:
        load_settings(path, environ=ENV)
    assert "gpra_oops12345" not in str(error.value)


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ('[upstream]\nbase_url = "ftp://x"', r"upstream\.base_url: must be an http\(s\) URL"),
        ("[cache]\nsize_limit_bytes = -1", r"cache\.size_limit_bytes: must be greater than 0"),
        ("[cache]\nsize = 1", r"cache\.size: unknown key"),
        (
            '[[layers]]\nname = "Bad Name"\nurl = "u"',
            r"layers\[0\]\.name: 1-64 characters.*, got .Bad Name.",
        ),
        ('[[layers]]\nname = "a"\nkind = "vector"\nurl = "u"', r"layers\[0\]\.kind"),
        ('[[layers]]\nname = "a"', r"layers\[0\]\.url: required"),
        ('[[layers]]\nname = "a"\nurl = "u"\nminzoom = 9\nmaxzoom = 3', r"layers\[0\]\.maxzoom"),
        ('[[layers]]\nname = "a"\nurl = "u"\nbounds = [1, 2, 3]', r"layers\[0\]\.bounds"),
        ('[[layers]]\nname = "a"\nurl = "u"\nformats = ["gif"]', r"layers\[0\]\.formats"),
        ('[[layers]]\nname = "a"\nurl = "u"\nquality = "high"', r"layers\[0\]\.quality: expected"),
        (
            '[[layers]]\nname = "a"\nurl = "u"\nbands = "1"\nexpression = "b1"',
            r"layers\[0\]\.expression: set either",
        ),
        (
            '[[layers]]\nname = "t"\nkind = "terrain"\nurl = "u"\nformats = ["jpg"]',
            r"layers\[0\]\.formats: terrain",
        ),
        (
            '[[layers]]\nname = "a"\nurl = "u"\n[[layers]]\nname = "a"\nurl = "v"',
            r"layers\[1\]\.name: duplicate",
        ),
        ('[[layers]]\nname = "clips"\nurl = "u"', r"layers\[0\]\.name: 'clips' is reserved"),
        ('[downloads]\norganization_id = "a b"', r"downloads\.organization_id: a Geopera"),
        ("[downloads]\nlist_ttl_s = 0", r"downloads\.list_ttl_s: must be greater than 0"),
        (
            '[[layers]]\nname = "a"\nurl = "u"\n[[tokens]]\nname = "t"\nsha256 = "'
            + "0" * 64
            + '"\nscopes = ["downloads"]\nprojects = []',
            r"tokens\[0\]\.projects: a non-empty list",
        ),
        (
            '[[layers]]\nname = "t"\nkind = "terrain"\nurl = "u"\nbands = "1"',
            r"layers\[0\]\.bands: unknown key; allowed keys are .*nodata_height_m",
        ),
        (
            '[limits.operations."cog.tile.render"]\nrps = 0',
            r'limits\.operations\."cog\.tile\.render"\.rps: must be greater than 0, got 0',
        ),
        ('[server]\nport = "8080"', r"server\.port: expected an integer, got str"),
        ("[server]\nport = 70000", r"server\.port: must be 0 to 65535, got 70000"),
        ("[limits]\nmax_wait_s = true", r"limits\.max_wait_s: expected a number, got a boolean"),
        (
            "[limits]\nfailure_threshold = 3",  # the attribute's name, not the TOML key
            r"limits\.failure_threshold: unknown key.*breaker_failures",
        ),
        (
            '[upstream]\nbase_url = "http://x"\nthrottle_scopes = {"u:t" = "all"}',
            r'upstream\.throttle_scopes\."u:t": must be one of',
        ),
        ("[upstream\n", r"not valid TOML"),
        ("", r"layers: no layers"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, snippet, message):
    base = '[upstream]\nbase_url = "http://127.0.0.1:1"\n' if "[upstream]" not in snippet else ""
    path = write(tmp_path, base + snippet + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        load_settings(path, environ=ENV)
    assert str(path) in str(error.value)


def test_demo_config_lists_the_emulator_organisation_and_tokens_take_projects(tmp_path):
    settings = load_settings(DEFAULT_CONFIG, environ=ENV)
    assert settings.downloads.organization_id == "demo-org"
    assert settings.downloads.list_ttl_s == 10
    token = '[[tokens]]\nname = "t"\nsha256 = "' + "1" * 64 + '"\nscopes = ["downloads"]\n'
    path = write(tmp_path, DEFAULT_CONFIG.read_text() + token + 'projects = ["survey"]\n')
    (configured,) = load_settings(path, environ=ENV).tokens
    assert configured.projects == {"survey"}
    path = write(tmp_path, DEFAULT_CONFIG.read_text() + token)
    assert load_settings(path, environ=ENV).tokens[0].projects is None  # every project


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", environ=ENV)


def test_secret_never_prints():
    secret = Secret("gpra_do-not-print-42")
    assert "gpra_" not in f"{secret} {secret!r} {[secret]}"
    assert redact("key=gpra_do-not-print-42!") == "key=***!"


def test_retry_after_forms():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) == 1.0
    assert parse_retry_after("soon") == 1.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    (conf / "dist").mkdir(parents=True)
    (conf / "dist" / "maplibre-gl.js").write_text("/* js */")
    (conf / "key").write_text("gpra_from-relative-file-1\n")
    text = DEFAULT_CONFIG.read_text()
    text = text.replace("connect_timeout_s = 5.0", 'connect_timeout_s = 5.0\napi_key_file = "key"')
    text += '\n[viewer]\nassets_dir = "dist"\n'
    path = conf / "gateway.toml"
    path.write_text(text.replace("[downloads]\n", '[downloads]\ndirectory = "files"\n'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as when a command runs from another directory
    settings = load_settings(Path("..") / "etc" / "gateway.toml", environ={})
    assert settings.cache.directory == conf.absolute() / ".cache/geopera-gateway/tiles"
    assert settings.cache.state_directory == conf / ".cache/geopera-gateway/tiles-state"
    assert settings.downloads.directory == conf / "files"
    assert settings.viewer.assets_dir == conf / "dist"
    assert settings.upstream.api_key.reveal() == "gpra_from-relative-file-1"
    assert all(p.is_absolute() for p in (settings.cache.directory, settings.viewer.assets_dir))
    # paths from the environment are the shell user's: against the working directory
    settings = load_settings(path, environ={**ENV, "GEOPERA_CACHE_DIR": "here"})
    assert settings.cache.directory == Path("here")
    # the packaged demo config keeps its cache under the working directory
    packaged = load_settings(None, environ=ENV)
    assert packaged.cache.directory == Path(".cache/geopera-gateway/tiles")


def test_unset_settings_take_the_declared_defaults(tmp_path):
    path = write(tmp_path, '[upstream]\nbase_url = "http://x"\n[[layers]]\nname = "a"\nurl = "u"\n')
    settings = load_settings(path, environ=ENV)
    assert settings.limits.operation_default == Rate(rps=20.0, burst=40.0)
    assert settings.limits.rate_for("cog.tile.render") == settings.limits.operation_default
    assert settings.server == ServerSettings()
    assert settings.clients.rate_limit == "100/second"
    assert settings.downloads.directory == tmp_path / ".cache/geopera-gateway/tiles-downloads"
    (layer,) = settings.layers.values()
    assert (layer.kind, layer.formats, layer.minzoom, layer.maxzoom) == (
        "raster",
        ("png", "jpg", "webp"),
        0,
        18,
    )
    # a burst left unset follows a higher rate (one second's worth)
    text = path.read_text() + '[limits]\noperation_rps = 100\n[limits.operations."x"]\nrps = 50\n'
    limits = load_settings(write(tmp_path, text), environ=ENV).limits
    assert limits.operation_default == Rate(rps=100.0, burst=100.0)
    assert limits.rate_for("x") == Rate(rps=50.0, burst=50.0)


def test_environment_values_are_checked_like_the_file(tmp_path):
    env = {**ENV, "GEOPERA_BASE_URL": "ftp://nowhere", "GEOPERA_HOST": " 0.0.0.0 "}
    with pytest.raises(ConfigError, match=r"upstream\.base_url: must be an http\(s\) URL"):
        load_settings(DEFAULT_CONFIG, environ=env)
    env["GEOPERA_BASE_URL"] = ""  # empty: unset, the file's value stands
    settings = load_settings(DEFAULT_CONFIG, environ=env)
    assert settings.upstream.base_url == "http://127.0.0.1:8081"
    assert settings.server.host == "0.0.0.0"


def test_every_setting_is_in_the_readme_configuration_reference():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    tables = [Settings, RasterLayerTable, TerrainLayerTable, Rate]
    tables += [info.annotation for info in Settings.model_fields.values()]
    missing = set()
    for table in tables:
        if not (isinstance(table, type) and issubclass(table, Table)):
            continue
        for name, info in table.model_fields.items():
            key = info.alias or name
            forms = (f"`{key}`", f"`[{key}]`", f"`[[{key}]]`", f".{key}.")
            if not any(form in reference for form in forms):
                missing.add(f"{table.__name__}: {key}")
    assert not missing, sorted(missing)


def test_layer_models_declare_exactly_the_render_parameters_sent_upstream():
    common = set(RasterLayerTable.model_fields) & set(TerrainLayerTable.model_fields)
    gateway_only = {"terrain": {"nodata_height_m"}, "raster": set()}
    for kind, model in (("raster", RasterLayerTable), ("terrain", TerrainLayerTable)):
        own = set(model.model_fields) - common - gateway_only[kind]
        assert own == set(RENDER_PARAMS[kind]), kind
