"""The shape of the package: subpackages in layers whose imports only point down, no import
circle between modules (imports under ``if TYPE_CHECKING:`` and inside functions counted), a
docstring on every subpackage, only the run layer drives the trainer, no module over 400 lines.

A new arrow against the layers fails here with the import that drew it; if the arrow is right,
the layers (and docs/ARCHITECTURE.md, which draws them) change in the same commit."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dorat"

# Top to bottom. A module may import its own subpackage and any subpackage of a lower layer;
# never one of its own layer's siblings or a higher layer.
LAYERS: list[set[str]] = [
    {"dorat.__main__"},                    # python -m dorat
    {"dorat", "dorat.cli"},                # the public names (loaded on first use); the CLI
    {"dorat.api"},                         # dorat.fit
    {"dorat.compare"},                     # grids of runs, on Slurm or local workers, and their report
    {"dorat.tune"},                        # Optuna studies whose trials are runs
    {"dorat.runs"},                        # run directories: prepare, train, reopen, evaluate
    {"dorat.report"},                      # reports of results on disk (evaluation.results)
    {"dorat.training"},                    # the loop, its statistics, stops, checkpoints, guard
    {"dorat.objectives"},                  # attack × per-example loss × weighting
    {"dorat.evaluation"},                  # attacks on a model, sanity checks, cards, the probe
    {"dorat.models", "dorat.data"},        # networks and weight averages; data sets and loaders
    {"dorat.config"},                      # parts registry, presets, sections, YAML, resolution
    {"dorat.attacks"},                     # PGD, CW, FGSM, the AutoAttack adapter
    {"dorat.files", "dorat.system"},       # atomic files, safetensors, locks; devices, torchrun
    {"dorat.errors"},                      # the exception types every user-facing error is
]
# The config layer knows the built-in parts by module name only, as it knows plug-ins: they
# register themselves into it when imported (config.BUILTIN_PARTS); that is not an import arrow.


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports() -> dict[str, dict[str, int]]:
    """Every dorat module -> {imported dorat module: line}, every import statement counted."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        deps: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES:
                        deps.setdefault(a.name, node.lineno)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dorat"):
                for a in node.names:  # `from dorat.training import trainer` names a module
                    full = f"{node.module}.{a.name}"
                    deps.setdefault(full if full in MODULES else node.module, node.lineno)
        deps.pop(name, None)
        graph[name] = deps
    return graph


def _unit(module: str) -> str:
    """The layered unit a module belongs to: its subpackage, or itself at the top level."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{unit} is in no layer of tests/test_layers.py: place it there")


def test_every_subpackage_and_top_module_has_a_layer() -> None:
    for m in MODULES:
        _layer(_unit(m))


def test_imports_only_point_down_the_layers() -> None:
    wrong = []
    for m, deps in _imports().items():
        for d, line in deps.items():
            a, b = _unit(m), _unit(d)
            if a == b or b == "dorat":  # inside one subpackage; `from dorat import errors`
                continue
            if _layer(b) <= _layer(a):
                wrong.append(f"{MODULES[m].relative_to(SRC.parent)}:{line}: {a} -> {b}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circle_between_modules() -> None:
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, {}):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_every_subpackage_says_what_lives_there_and_what_it_may_import() -> None:
    for init in SRC.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        where = init.relative_to(SRC.parent)
        assert len(doc) > 80 and "imports:" in doc.lower(), \
            f"{where}: say what lives here and what it may import (a line 'Imports: ...')"


def test_only_the_run_layer_drives_the_trainer() -> None:
    importers = sorted(m for m, deps in _imports().items() if "dorat.training.trainer" in deps)
    assert importers == ["dorat.runs.run"], importers


def test_no_module_over_400_lines() -> None:
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_the_old_module_paths_give_the_same_modules_with_a_warning() -> None:
    import dorat

    for old, new in dorat.MOVED.items():
        assert f"dorat.{new}" in MODULES, new
        assert f"dorat.{old}" not in MODULES, f"dorat.{old} is both a module and an old path"
    code = ("import warnings, importlib, dorat\n"
            "warnings.simplefilter('error', DeprecationWarning)\n"
            "for old, new in dorat.MOVED.items():\n"
            "    try:\n"
            "        importlib.import_module('dorat.' + old)\n"
            "        raise SystemExit('no warning for dorat.' + old)\n"
            "    except DeprecationWarning as w:\n"
            "        assert str(w) == f'dorat.{old} is now dorat.{new}', w\n"
            "warnings.simplefilter('ignore', DeprecationWarning)\n"
            "for old, new in dorat.MOVED.items():\n"
            "    assert importlib.import_module('dorat.' + old) is importlib.import_module('dorat.' + new)\n"
            "from dorat.run import load_run\n"
            "from dorat.runs import load_run as new\n"
            "assert load_run is new\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("dorat.nothing_here")


def test_the_command_line_starts_without_torch() -> None:
    """`dorat --help`, `--version` and the parsers load in a fraction of a second: nothing the
    CLI imports at start (the --log option included) pulls torch in."""
    code = "import sys, dorat.cli, dorat.tune.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
