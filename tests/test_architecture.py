"""The package's shape: no module reaches into another's private names, every task key is
of a kind in the one table, every engine is one entry of the registry. (The layers and the
absence of import cycles are import-linter's contracts in pyproject.toml, which `make test`
checks with `lint-imports`; the first test here runs the same check.)"""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

import daskptycho
from daskptycho import keys

PACKAGE = pathlib.Path(daskptycho.__file__).parent


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        yield (name[: -len(".__init__")] if name.endswith(".__init__") else name), path


def test_the_layer_and_cycle_contracts_hold():
    exe = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent))
    if exe is None:
        pytest.skip("lint-imports (import-linter, extra 'test') is not installed")
    r = subprocess.run([exe, "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "2 kept, 0 broken" in r.stdout


def test_no_private_name_is_imported_across_modules():
    """``from .x import _name`` and ``x._name`` on an imported daskptycho module are refused;
    a package may import its own private submodule (physics imports physics._compiled)."""
    bad = []
    for module, path in _modules():
        tree = ast.parse(path.read_text())
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                src = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                if not src.startswith("daskptycho"):
                    continue
                for a in node.names:
                    own_submodule = src == package and (PACKAGE.parent / (src.replace(".", "/") + f"/{a.name}.py")).exists()
                    if a.name.startswith("_") and not a.name.startswith("__") and not own_submodule:
                        bad.append(f"{module}: from {src} import {a.name}")
                    aliases[a.asname or a.name] = f"{src}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("daskptycho"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{module}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, bad


def test_graph_builders_use_only_kinds_of_the_one_table():
    from daskptycho.schedule.graph import IterationGraph

    g = IterationGraph(tag="t")
    assert g.add(("grad", 0, 0, 0), (len, "x"), (0, 0)) == ("grad", 0, 0, 0, "t")
    with pytest.raises(ValueError, match="not in daskptycho.keys.TASKS"):
        g.add(("gradient", 0, 0, 0), (len, "x"))
    assert {k.phase for k in keys.TASKS.values()} <= set(keys.PHASES)
    assert {k.drawn_as for k in keys.TASKS.values()} <= set(keys.COLOURS)


def test_every_engine_is_one_registry_entry_with_its_options():
    from daskptycho.engines import ENGINES, engine_options
    from daskptycho.engines.options import EngineOptions

    assert set(ENGINES) == {"gd", "ml", "hve", "dm"}
    for name, engine in ENGINES.items():
        assert issubclass(engine.options, EngineOptions) and engine.options.ENGINE == name
        assert engine_options(engine=name).engine == name and callable(engine.run)
    # an option of another engine names the engines that take it
    with pytest.raises(daskptycho.OptionsError, match="only 'gd' and 'hve'"):
        engine_options(engine="ml", tiles=(2, 2))
