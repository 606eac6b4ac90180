"""The folder layout is the architecture: each folder may import only the folders below it.

Read from the source with ``ast`` (no import runs), so a violation fails here with the file,
the line and the rule, before it becomes a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"

LEAVES = frozenset(
    {
        "clock",
        "errors",
        "humanize",
        "imaging",
        "layers",
        "logs",
        "metrics",
        "secrets",
        "__version__",
        "__init__",
    }
)
"""Top-level modules with one small job each; they import only each other."""

ALLOWED: dict[str, frozenset[str]] = {
    "leaf": frozenset({"leaf"}),
    "config": frozenset({"leaf", "config"}),
    "storage": frozenset({"leaf", "storage"}),
    "upstream": frozenset({"leaf", "config", "storage", "upstream"}),
    "discovery": frozenset({"leaf", "config", "discovery"}),
    "services": frozenset({"leaf", "config", "storage", "upstream", "services"}),
    "seed": frozenset({"leaf", "config", "storage", "upstream", "services", "discovery", "seed"}),
    "http": frozenset(
        {"leaf", "config", "storage", "upstream", "services", "discovery", "seed", "http"}
    ),
    # route modules never import each other: what several share lives in http/
    "routes": frozenset(
        {"leaf", "config", "storage", "upstream", "services", "discovery", "http", "seed"}
    ),
    "app": frozenset(
        {"leaf", "config", "storage", "upstream", "services", "discovery", "seed", "http"}
        | {"routes"}
    ),
    "cli": frozenset(
        {"leaf", "config", "storage", "upstream", "services", "discovery", "http", "routes"}
        | {"seed", "app", "cli", "emulator"}
    ),
    "emulator": frozenset({"emulator", "cli"}),  # only its __main__: python -m gateway.emulator
}
"""Which parts of the package each part may import (the README's module map)."""


def part_of(module: str) -> str:
    """``gateway.storage.tiles`` -> ``storage``; ``gateway.layers`` -> ``leaf``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "leaf"
    head = parts[1]
    if head in ("app", "__main__"):
        return "app" if head == "app" else "cli"
    if head in LEAVES:
        return "leaf"
    return head


def module_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(relative.parts).removesuffix(".__init__")


def gateway_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every ``gateway...`` module that ``path`` imports."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: no import at run time
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("gateway")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "gateway":
                found += [(node.lineno, f"gateway.{a.name}") for a in node.names]
            elif node.module.startswith("gateway."):
                found.append((node.lineno, node.module))
    return found


def test_every_folder_imports_only_what_it_may():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_of(path)
        part = part_of(source)
        for line, target in gateway_imports(path):
            if part_of(target) not in ALLOWED[part]:
                violations.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {part} may not import "
                    f"{target} ({part_of(target)})"
                )
    assert not violations, "\n".join(violations)


def test_every_folder_is_a_known_part():
    for path in PACKAGE.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            assert path.name in ALLOWED, f"{path.name}/ has no rule in ALLOWED"
        elif path.suffix == ".py" and path.stem not in LEAVES | {"app", "__main__"}:
            raise AssertionError(f"{path.name}: a top-level module that is no leaf")


def test_config_and_the_cli_parser_load_no_heavy_modules():
    """The config never loads the HTTP edge, and the emulator package and the CLI (which
    reads the emulator's defaults) load no rio-tiler until an emulator is started."""
    code = (
        "import sys\n"
        "import gateway.config.settings\n"
        "print(sorted(m for m in sys.modules if m.startswith(('aiohttp.web', 'gateway.http'))))\n"
        "import gateway.emulator, gateway.cli.main\n"
        "gateway.cli.main.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rio_tiler', 'rasterio')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.splitlines() == ["[]", "[]"], result.stdout
