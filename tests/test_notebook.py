"""examples/tutorial.ipynb, executed as a reader would run it (nbclient, a real Jupyter kernel,
real Fashion-MNIST), with every number it prints checked against the files its runs wrote; and
committed without outputs. About three minutes: `make notebook` (CI) runs it, `make test` does
not (marker ``notebook``)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from conftest import needs_fmnist

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "tutorial.ipynb"
nbformat = pytest.importorskip("nbformat")


def test_the_tutorial_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def _pct(text: str, label: str) -> float:
    m = re.search(rf"{label} ([0-9.]+)%", text)
    assert m, f"'{label}' not in {text!r}"
    return float(m.group(1)) / 100


@pytest.mark.notebook
@needs_fmnist
def test_the_tutorial_runs_and_prints_what_its_runs_wrote(tmp_path: Path) -> None:
    pytest.importorskip("nbclient")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - t0
    print(f"the tutorial ran in {seconds:.0f} s")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.get("name") == "stdout")
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert images == 2, "the per-class bar chart and DONE's class weights"
    lines = {line.split(":")[0]: line for line in text.splitlines() if ":" in line}
    runs = tmp_path / "tutorial-runs"
    for name, method in (("PGD-AT", "at"), ("DONE", "done")):
        m = json.loads((runs / method / "metrics.json").read_text())
        line = next(line for line in text.splitlines() if line.startswith(f"{name}: SA"))
        assert _pct(line, "SA") == pytest.approx(m["sa"], abs=5e-5)
        assert _pct(line, "RA-PGD") == pytest.approx(m["ra"]["pgd"], abs=5e-5)
        assert _pct(line, "worst class") == pytest.approx(m["worst_class"]["pgd"], abs=5e-5)
        assert len(m["per_class"]["pgd"]) == 10 and m["n"] == 1000
    from dorat.runs import load_result

    w = load_result(runs / "done").weights
    classes = json.loads((runs / "done" / "metrics.json").read_text())["classes"]
    for c, name in enumerate(classes):
        printed = float(lines[f"DONE weight {name}"].split(":")[1])
        assert printed == pytest.approx(w["w"][w["y"] == c].mean().item(), abs=5e-4)
    card = json.loads((runs / "my-net-card.json").read_text())
    assert _pct(lines["MyNet"], "SA") == pytest.approx(card["sa"], abs=5e-5)
    assert _pct(lines["MyNet"], "RA-worst") == pytest.approx(card["ra"]["worst"], abs=5e-5)
    assert card["n"] == 500 and card["ra"]["worst"] < card["sa"]
