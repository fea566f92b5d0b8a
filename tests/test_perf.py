"""benchmarks/perf.py in smoke mode: every row and target is produced and the doc block is
replaced in place (speed is not asserted here; docs/PERFORMANCE.md holds the real run)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "perf"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_perf_smoke_produces_every_row(tmp_path: Path) -> None:
    perf = _bench()
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\nintro\n\n{perf.MARK_BEGIN}\nold table\n{perf.MARK_END}\n\nafter\n")
    r = perf.main(["--smoke", "--json", str(tmp_path / "p.json"), "--doc", str(doc)])
    assert set(r["rows"]) == {"reference", "at", "at-nchw", "done", "done-diag", "done-cid", "trades"}
    for row in r["rows"].values():
        for key in ("step_ms", "examples_per_s", "gflop_per_step", "flop_rate_fraction_of_gemm",
                    "vs_reference", "step_time_x_at"):
            assert math.isfinite(row[key]) and row[key] > 0, key
    # the attack passes dominate: a PGD-2 step costs > 2x a plain forward-backward's FLOPs
    assert r["rows"]["done-cid"]["gflop_per_step"] > r["rows"]["at"]["gflop_per_step"]
    assert set(r["targets"]) == {"at", "done", "done-diag", "done-cid"}
    assert r["eval_pgd20_examples_per_s"] > 0 and r["gemm_gflops"] > 0
    assert json.loads((tmp_path / "p.json").read_text())["rows"].keys() == r["rows"].keys()
    text = doc.read_text()
    assert "old table" not in text and "intro" in text and "after" in text
    assert text.count(perf.MARK_BEGIN) == 1 and "| reference |" in text


def test_workers_benchmark_smoke(tmp_path: Path) -> None:
    mod = _bench("workers")
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\n\nafter\n")
    r = mod.main(["--smoke", "--runs", "2", "--rounds", "1", "--doc", str(doc)])
    assert len(r["seconds"]["1"]) == len(r["seconds"]["2"]) == 1
    assert r["median_seconds"]["1"] > 0 and r["median_seconds"]["2"] > 0
    assert math.isclose(r["speedup"], r["median_seconds"]["1"] / r["median_seconds"]["2"])
    text = doc.read_text()
    assert "old" not in text and "`--workers 2`" in text and text.endswith("after\n")


def test_autoattack_benchmark_smoke(tmp_path: Path) -> None:
    mod = _bench("autoattack")
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\n")
    r = mod.main(["--smoke", "--n", "16", "--rounds", "2", "--doc", str(doc)])
    assert r["same_points"] and r["n"] == 16
    assert all(len(v) == 2 and min(v) > 0 for v in r["seconds"].values())
    assert "dorat adapter, weights frozen" in doc.read_text() and "old" not in doc.read_text()
