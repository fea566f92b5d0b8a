"""`dorat report` (Markdown + PNGs whose numbers match metrics.json) and `dorat compare`
(grid, skip/resume, mean ± std aggregation, best-per-column marking)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from dorat import config as C
from dorat.cli import main
from dorat.compare import aggregate, compare, load_grid, markdown_tables, signed_points
from dorat.errors import ConfigError
from dorat.report import write_report
from dorat.runs.run import train

TINY = ["attack.steps=2", "attack.alpha=0.05", "eval.n=40", "eval.steps=3", "eval.check_n=20",
        "optim.lr=0.02", "eval.attacks=pgd,cw"]
PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(npz: Path, *sets: str) -> dict:
    return C.resolve(None, {"dataset": f"npz:{npz}", "epochs": 2, "batch_size": 64}, [*TINY, *sets])


def _rows(md: str) -> dict[str, list[str]]:
    """First table of a Markdown text: {first cell: cells}."""
    out = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| run") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells
    return out


def test_report_markdown_and_pngs(tmp_path: Path, synthetic_npz: Path) -> None:
    train(_cfg(synthetic_npz, "method=at"), tmp_path / "at", log=lambda s: None)
    train(_cfg(synthetic_npz, "method=done", "done.warmup=0", "done.r=0.5"),
          tmp_path / "done", log=lambda s: None)
    path = write_report([tmp_path / "at", tmp_path / "done"], tmp_path / "rep")
    md = path.read_text()
    rows = _rows(md)
    for name in ("at", "done"):
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        cells = rows[name]
        # run | method | SA | RA-PGD | RA-CW | RA-worst | worst class | RA-Tail-30 | n
        assert cells[1] == name
        assert cells[2] == f"{100 * m['sa']:.2f}"
        assert cells[3] == f"{100 * m['ra']['pgd']:.2f}" and cells[4] == f"{100 * m['ra']['cw']:.2f}"
        assert cells[5] == f"{100 * m['ra']['worst']:.2f}"
        assert cells[6].startswith(f"{100 * m['worst_class']['worst']:.2f} (")
        assert cells[7] == f"{100 * m['tail30']['worst']:.2f}" and cells[8] == str(m["n"])
    for png in ("per_class.png", "training.png", "weights.png", "top_weighted_done.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, png
        assert f"]({png})" in md
    assert not (tmp_path / "rep" / "top_weighted_at.png").exists()  # uniform weights: no panel
    # the weights plot only has a row for the reweighting run
    from dorat.report import load_result

    assert load_result(tmp_path / "done").reweights and not load_result(tmp_path / "at").reweights


def test_report_cli_errors_on_unfinished_run(tmp_path: Path, synthetic_npz: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    train(_cfg(synthetic_npz), tmp_path / "r", stop_after_epoch=1, log=lambda s: None)
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "has no metrics.json" in err and "--resume" in err
    assert not (tmp_path / "rep" / "report.md").exists()


def _compare_file(tmp_path: Path, npz: Path, epochs: int = 2) -> Path:
    spec = {
        "title": "tiny",
        "base": "base.yaml",
        "set": {"epochs": epochs},
        "methods": ["at", {"name": "done-w0", "method": "done", "set": {"done.warmup": 0}}],
        "seeds": [0, 1],
        "evals": [{"name": "cw40", "attacks": ["cw"], "n": 40}],
    }
    base = {"dataset": f"npz:{npz}", "batch_size": 64,
            **{k: yaml.safe_load(v) for k, v in (s.split("=") for s in TINY)}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    f = tmp_path / "grid.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


def test_compare_runs_skips_resumes_and_aggregates(tmp_path: Path, synthetic_npz: Path) -> None:
    f = _compare_file(tmp_path, synthetic_npz)
    out = tmp_path / "out"
    grid = load_grid(f, out)
    assert [(r.name, r.seed) for r in grid.runs] == [("at", 0), ("done-w0", 0), ("at", 1), ("done-w0", 1)]
    # one run interrupted after its first epoch: compare must resume it, not restart it
    pre = grid.runs[2]
    train(pre.cfg, pre.path, stop_after_epoch=1, log=lambda s: None)
    # another stopped before its first checkpoint (only config.yaml), then started again: that
    # attempt trains beside it in RUN/.next, and its checkpoint there must be resumed, not wiped
    nxt = grid.runs[3]
    train(nxt.cfg, nxt.path, stop_after_epoch=1, log=lambda s: None)
    for name in ("checkpoint.safetensors", "log.jsonl", "weights.safetensors"):
        (nxt.path / name).unlink()
    train(nxt.cfg, nxt.path, overwrite=True, stop_after_epoch=1, log=lambda s: None)
    assert (nxt.path / ".next" / "checkpoint.safetensors").is_file()
    logs: list[str] = []
    report = compare(f, out, log=logs.append)
    assert any("at/seed1: resuming" in m for m in logs)
    assert any("done-w0/seed1: resuming" in m for m in logs)
    assert sum("training" in m and "seed" in m for m in logs) == 2
    assert not (nxt.path / ".next").exists()
    assert [json.loads(ln)["epoch"] for ln in (nxt.path / "log.jsonl").read_text().splitlines()] == [1, 2]
    for r in grid.runs:
        assert (r.path / "metrics.json").is_file() and (r.path / "eval-cw40.json").is_file()
    agg = json.loads((out / "results.json").read_text())
    assert agg["finished_runs"] == 4
    for row in agg["rows"]:
        runs = [r for r in grid.runs if r.name == row["method"]]
        for key, pick in [("sa", lambda m: m["sa"]), ("ra.pgd", lambda m: m["ra"]["pgd"]),
                          ("worst_class.worst", lambda m: m["worst_class"]["worst"])]:
            vals = [pick(json.loads((r.path / "metrics.json").read_text())) for r in runs]
            assert row["metrics"][key]["mean"] == pytest.approx(statistics.fmean(vals))
            assert row["metrics"][key]["std"] == pytest.approx(statistics.stdev(vals))
        cw = [json.loads((r.path / "eval-cw40.json").read_text())["ra"]["cw"] for r in runs]
        assert row["metrics"]["cw40:ra.cw"]["mean"] == pytest.approx(statistics.fmean(cw))
        # each seed's per-class accuracies, in the order of "seeds" (for pairing by seed)
        assert row["per_class_values"]["cw40"] == [
            json.loads((r.path / "eval-cw40.json").read_text())["per_class"]["cw"] for r in runs]
        last = [json.loads((r.path / "log.jsonl").read_text().splitlines()[-1]) for r in runs]
        w = row["weights"]
        assert w["ess"]["values"] == pytest.approx([e["ess"] for e in last])
        assert w["w_max"]["mean"] == pytest.approx(statistics.fmean(e["w_max"] for e in last))
        assert w["class_mean"] == pytest.approx([statistics.fmean(c) for c in
                                                 zip(*(e["w_class_mean"] for e in last))])
        if row["method"] == "at":
            assert w["ess"]["mean"] == pytest.approx(1.0)
            assert w["class_mean"] == pytest.approx([1.0] * len(row["classes"]))
    md = (out / "results.md").read_text()
    assert "RA-CW [cw40]" in md
    assert report.name == "report.md" and "per_class_" in report.read_text()
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes().startswith(PNG) for p in pngs)

    # second call: everything finished, nothing trained again
    stamps = {r.path: (r.path / "model.safetensors").stat().st_mtime_ns for r in grid.runs}
    logs.clear()
    compare(f, out, log=logs.append)
    assert any("4 finished, 0 to go" in m for m in logs)
    assert all((r.path / "model.safetensors").stat().st_mtime_ns == stamps[r.path] for r in grid.runs)

    # the compare file changed under finished runs: refuse rather than mix results
    f2 = _compare_file(tmp_path, synthetic_npz, epochs=3)
    with pytest.raises(ConfigError, match="different config.*epochs"):
        compare(f2, out, log=logs.append)


def test_markdown_marks_best_mean_per_column() -> None:
    def row(method: str, sa: list[float], ra: list[float]) -> dict:
        from dorat.compare import mean_std

        return {"dataset": "d", "setting": "default", "method": method, "seeds": [0, 1],
                "metrics": {"sa": mean_std(sa), "ra.pgd": mean_std(ra)}}

    agg = {"rows": [row("a", [0.8, 0.9], [0.4, 0.5]), row("b", [0.7, 0.7], [0.6, 0.4])]}
    md = "\n".join(markdown_tables(agg))
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith(("| a", "| b"))}
    assert "**85.00 ± 7.07**" in lines["a"]  # best SA, std = stdev([.8, .9]) = 0.0707
    assert "**50.00 ± 14.14**" in lines["b"] and "45.00 ± 7.07" in lines["a"]
    assert re.search(r"\| 70.00 ± 0.00 \|", lines["b"])
    only = "\n".join(markdown_tables(agg, columns=["ra.pgd", "missing.key"]))
    assert "RA-PGD" in only and "SA" not in only and "missing" not in only


def test_compare_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [at]\nseedz: [0]\n")
    with pytest.raises(ConfigError, match="unknown key.*seedz"):
        load_grid(bad, tmp_path / "o")
    bad.write_text("methods: [at, nonsense]\n")
    with pytest.raises(ConfigError, match="nonsense"):
        load_grid(bad, tmp_path / "o")
    bad.write_text("methods: []\n")
    with pytest.raises(ConfigError, match="non-empty"):
        load_grid(bad, tmp_path / "o")
    with pytest.raises(ConfigError, match="does not exist.*demo"):
        load_grid(tmp_path / "missing.yaml", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_aggregate_with_missing_seed_uses_finished_ones(tmp_path: Path, synthetic_npz: Path) -> None:
    from dorat.compare.execute import _extra_eval

    f = _compare_file(tmp_path, synthetic_npz)
    grid = load_grid(f, tmp_path / "out")
    r = grid.runs[0]
    train(r.cfg, r.path, log=lambda s: None)
    # trained, but its extra evaluation (cw40) is not written yet: not aggregated, so that no
    # column of the row averages over other seeds than the rest
    agg = aggregate(grid)
    assert agg["finished_runs"] == 0 and len(agg["rows"]) == 1
    row = agg["rows"][0]
    assert row["seeds"] == [] and row["pending_seeds"] == [0] and row["metrics"] == {}
    assert "| at | 0 (1 evaluating) |" in "\n".join(markdown_tables(agg))
    _extra_eval(r, grid.evals[0], lambda s: None, "t", False)
    agg = aggregate(grid)
    assert len(agg["rows"]) == 1 and agg["rows"][0]["seeds"] == [0]
    assert agg["rows"][0]["pending_seeds"] == [] and "cw40:ra.cw" in agg["rows"][0]["metrics"]
    assert agg["rows"][0]["metrics"]["sa"]["std"] == 0.0 and agg["finished_runs"] == 1
    # the machine that trained and evaluated it, in one line (older runs: 'unrecorded')
    from dorat.compare.report import machine_label
    from dorat.system.runtime import machine

    assert agg["rows"][0]["machines"] == [machine_label(machine())]
    assert machine_label(None) == "unrecorded"


def test_compare_leaves_a_run_another_process_owns_and_takes_it_once_that_one_is_killed(
        tmp_path: Path, synthetic_npz: Path) -> None:
    from conftest import holder

    f = _compare_file(tmp_path, synthetic_npz)
    out = tmp_path / "out"
    held = load_grid(f, out).runs[0]
    logs: list[str] = []
    with holder(held.path) as p:  # a live process owns the run directory
        compare(f, out, only=["at"], log=logs.append)
        assert any(f"at/seed0: another process (pid {p.pid}) is running it" in m for m in logs)
        assert not (held.path / "metrics.json").exists()  # left to the other process
        other = next(r for r in load_grid(f, out).runs if r.name == "at" and r.seed == 1)
        assert (other.path / "metrics.json").is_file() and not (other.path / ".lock").exists()
        rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
        assert rows["at"]["seeds"] == [1]
    # its owner was killed (kill -9): the kernel released the lock, the run is trained now
    logs.clear()
    compare(f, out, only=["at"], log=logs.append)
    assert any("at/seed0: training" in m for m in logs)
    assert (held.path / "metrics.json").is_file() and not (held.path / ".lock").exists()


def test_compare_workers_split_the_grid(tmp_path: Path, synthetic_npz: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--workers 2: two processes on one OUT; every run is trained exactly once, by one of them,
    and the parent aggregates all of them."""
    f = _compare_file(tmp_path, synthetic_npz)
    out = tmp_path / "out"
    assert main(["compare", str(f), "--out", str(out), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    trained = re.findall(r"\[(w[12])\] \[\d/4\] \S+/default/(\S+): training", err)
    assert sorted(r for _, r in trained) == ["at/seed0", "at/seed1", "done-w0/seed0", "done-w0/seed1"]
    assert {w for w, _ in trained} == {"w1", "w2"}  # both took part
    agg = json.loads((out / "results.json").read_text())
    assert agg["finished_runs"] == 4 and all(r["seeds"] == [0, 1] for r in agg["rows"])
    assert not list(out.rglob(".lock"))


def test_a_stopped_compare_checkpoints_its_workers_and_starts_no_queued_run(
        tmp_path: Path, synthetic_npz: Path) -> None:
    """SIGTERM to the whole process group (a scheduler's stop) while two workers train: both
    checkpoint and stop, and the runs the pool had queued never start (a worker that ends
    cleanly would otherwise be replaced by one running the next run)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    f = _compare_file(tmp_path, synthetic_npz, epochs=200)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dorat", "compare", str(f), "--out", str(out),
                             "--workers", "2"], env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    grid = load_grid(f, out)
    first, queued = grid.runs[:2], grid.runs[2:]
    deadline = time.time() + 120
    while time.time() < deadline and not all((r.path / "log.jsonl").is_file() for r in first):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert all((r.path / "checkpoint.safetensors").is_file() for r in first)
    assert not any((r.path / "log.jsonl").exists() for r in queued), err
    assert "training" not in " ".join(ln for ln in err.splitlines() if "seed1" in ln), err


def test_compare_checks_methods_before_writing_or_starting_workers(tmp_path: Path,
                                                                   synthetic_npz: Path) -> None:
    f = _compare_file(tmp_path, synthetic_npz)
    for workers in (1, 2):
        with pytest.raises(ConfigError, match="--methods names nope, not in the compare file"):
            compare(f, tmp_path / "out", only=["nope"], workers=workers)
        assert not (tmp_path / "out").exists()
    # SETTING/METHOD takes one setting's runs of a method (a grid's priority rows first)
    spec = yaml.safe_load(f.read_text())
    f.write_text(yaml.safe_dump({**spec, "settings": {"a": {}, "b": {"epochs": 1}}}))
    from dorat.compare.execute import pending

    grid = load_grid(f, tmp_path / "out")
    todo = pending(grid, lambda s: None, ["b/at", "done-w0"])
    assert [(r.setting, r.name, r.seed) for r, _ in todo] == [
        ("a", "done-w0", 0), ("b", "at", 0), ("b", "done-w0", 0),
        ("a", "done-w0", 1), ("b", "at", 1), ("b", "done-w0", 1)]
    with pytest.raises(ConfigError, match="--methods names c/at, not in"):
        compare(f, tmp_path / "out", only=["c/at"])
    assert not (tmp_path / "out").exists()


def test_worker_env_splits_the_cpu_threads() -> None:
    import os

    from dorat.compare import worker_env

    cores = len(os.sched_getaffinity(0))
    env = worker_env(0, 2, "cpu", {"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2)) and env["PATH"] == "/bin"
    assert worker_env(1, 4 * cores, "cpu", {})["OMP_NUM_THREADS"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(0, 2, "cpu", {})


def test_a_finished_run_without_its_model_is_trained_again_for_a_missing_eval(
        tmp_path: Path, synthetic_npz: Path) -> None:
    """The grid keeps only small result files in git: on a new machine a run that has
    metrics.json but lost both its model and an extra evaluation is redone, not a crash."""
    f = _compare_file(tmp_path, synthetic_npz)
    out = tmp_path / "out"
    compare(f, out, only=["at"], log=lambda s: None)
    kept, lost = [r for r in load_grid(f, out).runs if r.name == "at"]
    for r in (kept, lost):
        for heavy in r.path.glob("*.safetensors"):
            heavy.unlink()
    (lost.path / "eval-cw40.json").unlink()
    before = (kept.path / "metrics.json").read_text()
    logs: list[str] = []
    compare(f, out, only=["at"], log=logs.append)
    assert any("at/seed1: finished, but its model file is gone" in m for m in logs)
    assert not any("at/seed0" in m for m in logs)  # complete without its model: untouched
    assert (kept.path / "metrics.json").read_text() == before
    assert (lost.path / "eval-cw40.json").is_file() and (lost.path / "model.safetensors").is_file()


def test_a_failing_run_is_recorded_and_the_grid_goes_on(tmp_path: Path, synthetic_npz: Path) -> None:
    spec = yaml.safe_load(_compare_file(tmp_path, synthetic_npz).read_text())
    spec["seeds"] = [0]
    spec["evals"] = []
    # a learning rate that makes the loss non-finite in the first epoch
    spec["methods"] = [{"name": "boom", "method": "at", "set": {"optim.lr": 1.0e30,
                                                               "optim.grad_clip": None}}, "at"]
    f = tmp_path / "fail.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    logs: list[str] = []
    compare(f, out, log=logs.append)
    boom = next(r.path for r in load_grid(f, out).runs if r.name == "boom")
    assert boom.parent.parent.parent.name.startswith("npz_")  # one directory per dataset
    assert "diverged" in json.loads((boom / "failed.json").read_text())["error"]
    assert any("boom/seed0: FAILED" in m for m in logs)
    agg = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in agg["rows"]}
    assert rows["boom"]["failed_seeds"] == [0] and rows["boom"]["seeds"] == []
    assert rows["at"]["seeds"] == [0]
    assert "| boom | 0 (1 failed) |" in (out / "results.md").read_text()
    logs.clear()
    compare(f, out, log=logs.append)  # skipped, not retried
    assert any("failed earlier" in m and "skipped" in m for m in logs)
    logs.clear()
    compare(f, out, log=logs.append, retry_failed=True)
    assert any("boom/seed0: training" in m for m in logs) and (boom / "failed.json").is_file()


def test_compare_set_can_name_the_dataset_and_null_a_key(tmp_path: Path, synthetic_npz: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text(yaml.safe_dump({"base": "fmnist-demo", "methods": ["at"],
                                 "set": {"dataset": f"npz:{synthetic_npz}", "data.train_subset": None},
                                 "settings": {"plain": {}, "lt": {"data.imbalance_ratio": 4}}},
                                sort_keys=False))
    grid = load_grid(f, tmp_path / "o")
    assert [r.setting for r in grid.runs] == ["plain", "lt"]
    for r in grid.runs:
        assert r.cfg["dataset"] == f"npz:{synthetic_npz}" and r.cfg["data"]["train_subset"] is None
        assert r.path.parts[-4].startswith("npz_")
    assert grid.runs[1].cfg["data"]["imbalance_ratio"] == 4


def test_a_method_can_have_its_own_seeds(tmp_path: Path) -> None:
    """More seeds for some methods (the finalists of a sweep): the file's seeds come first in
    the run order, extra seeds after them; a bad per-method list is one clear error."""
    f = tmp_path / "g.yaml"
    f.write_text(yaml.safe_dump({"base": "fmnist-demo", "seeds": [3, 0], "methods": [
        "at", {"name": "d", "method": "done", "seeds": [0, 3, 1, 2]}]}, sort_keys=False))
    grid = load_grid(f, tmp_path / "o")
    assert [(r.name, r.seed) for r in grid.runs] == [("at", 3), ("d", 3), ("at", 0), ("d", 0),
                                                      ("d", 1), ("d", 2)]
    assert all(r.cfg["seed"] == r.seed and r.path.name == f"seed{r.seed}" for r in grid.runs)
    for seeds, msg in (([], "non-empty"), ([1, 1], "twice"), ([-1], "non-negative"), (["a"], "integers")):
        f.write_text(yaml.safe_dump({"base": "fmnist-demo",
                                     "methods": [{"name": "d", "method": "done", "seeds": seeds}]}))
        with pytest.raises(ConfigError, match=f"d.seeds.*{msg}"):
            load_grid(f, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["fmnist.yaml", "fmnist-sweep.yaml", "fmnist-longtail-sweep.yaml",
                                  "fairness-sweep.yaml", "fairness-ablation.yaml"])
def test_results_compare_files_are_valid(tmp_path: Path, name: str) -> None:
    """The grid and sweep behind docs/RESULTS.md parse, every run's config validates, and no two runs
    share a directory (the yaml files grow as the study goes on, so their sizes are not pinned)."""
    f = Path(__file__).parent.parent / "benchmarks" / "results" / name
    grid = load_grid(f, tmp_path / "o")
    assert len(grid.runs) >= 20 and len({r.path for r in grid.runs}) == len(grid.runs)
    assert all(r.cfg["epochs"] == 8 and r.cfg["attack"]["eps"] == 0.1 for r in grid.runs)
    assert not (tmp_path / "o").exists()


def test_the_cifar10_tuned_grid_states_one_budget_before_any_run(tmp_path: Path) -> None:
    """Issue 51's CIFAR-10 grid: every method tuned with the same trials, length, sampler seed and
    objective (one tune block), 3 seeds, FAAL fine-tuning each seed's PGD-AT run."""
    f = Path(__file__).parent.parent / "benchmarks" / "results" / "cifar10-tuned.yaml"
    grid = load_grid(f, tmp_path / "o")
    assert grid.tune is not None and grid.tune.trials >= 6 and grid.tune.seed == 0
    assert {st.name.rpartition("/")[2] for st in grid.studies} == set(grid.names)
    assert {r.seed for r in grid.runs} == {0, 1, 2} and len(grid.runs) == 3 * len(grid.names)
    assert all(r.cfg.dataset == "cifar10-jpeg" and r.cfg.data.val_size == 5000 for r in grid.runs)
    faal = [r for r in grid.runs if r.name == "faal"]
    assert all(r.after == next(x.path for x in grid.runs if (x.name, x.seed) == ("at", r.seed))
               for r in faal)
    assert not (tmp_path / "o").exists()


def _write_results():
    """benchmarks/results/write_results.py as a module (it is a script, not part of dorat)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "write_results", Path(__file__).parent.parent / "benchmarks" / "results" / "write_results.py")
    wr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wr)
    return wr


def test_results_pair_done_with_pgd_at_and_the_best_baseline_by_seed() -> None:
    """RESULTS.md's paired table: differences on the seeds both rows have, won-tied-lost, and
    the best baseline chosen per metric by its mean; and the weights table."""
    wr = _write_results()

    def row(method: str, seeds: list[int], aa: list[float]) -> dict:
        return {"setting": "balanced", "method": method, "seeds": seeds,
                "metrics": {"aa1000:ra.aa": {"mean": sum(aa) / len(aa), "std": 0.01, "values": aa}}}

    grid = {"rows": [row("at", [0, 1, 2], [0.70, 0.71, 0.72]),
                     row("mart", [0, 1], [0.74, 0.73]),
                     row("done", [0, 1, 2], [0.71, 0.73, 0.72])]}
    lines = wr.paired_lines(grid, "balanced")
    assert len(lines) == 2 + 2 + 1  # header, vs at, vs mart (best), blank
    vs_at, vs_best = lines[2], lines[3]
    assert "| at |" in vs_at and "s0: +1.00, s1: +2.00, s2: +0.00" in vs_at
    assert "| +1.00 ± 1.00 | 2-1-0 | 1.00 |" in vs_at
    assert "mart (best)" in vs_best and "s0: −3.00, s1: +0.00 | −1.50 ± 2.12 | 0-1-1" in vs_best
    assert wr.paired_lines({"rows": grid["rows"][:2]}, "balanced") == []
    # the fairness rows against their own references, by name: wat-at against at and at-x2
    grid["rows"] += [row("wat-at", [0, 1, 2], [0.73, 0.72, 0.74]), row("at-x2", [1, 2], [0.74, 0.72])]
    ref = wr.reference_lines(grid, "balanced")
    assert [ln.split(" | ")[:3] for ln in ref[2:-1]] == [
        ["| at-x2", "RA-AA", "at"], ["| wat-at", "RA-AA", "at"], ["| wat-at", "RA-AA", "at-x2"]]
    assert "| s1: −2.00, s2: +2.00 | +0.00 ± 2.83 | 1-0-1 |" in ref[4]
    assert wr.reference_lines(grid, "longtail") == []
    grid["rows"][0]["machines"] = ["AMD EPYC (1 thread(s), torch 2.13.0)", "unrecorded"]
    assert wr.machine_lines(grid)[2:-1] == [
        "- AMD EPYC (1 thread(s), torch 2.13.0): balanced/at",
        "- unrecorded: balanced/at, balanced/mart, balanced/done, balanced/wat-at, balanced/at-x2"]
    # a mean of +x and −x is a float a hair below zero: it is printed as +0.00, never −0.00
    assert signed_points(-1e-17) == "+0.00" and signed_points(-0.0123) == "−1.23"

    def weighted(method: str, ess: float, cls: list[float]) -> dict:
        return {"setting": "balanced", "method": method, "classes": ["a", "b", "c", "d"],
                "weights": {"ess": {"mean": ess, "std": 0.0, "n": 1}, "w_max": {"mean": 3.0},
                            "class_mean": cls}}

    lines = wr.weights_lines({"rows": [weighted("at", 1.0, [1.0] * 4),
                                       weighted("gairat", 0.5, [0.5, 2.0, 1.0, 0.25])]}, "balanced")
    assert len(lines) == 4 and "| at |" not in "".join(lines)  # unweighted rows are left out
    assert lines[2] == "| gairat | 0.500 | 3.00 | b 2.00, c 1.00, a 0.50 | d 0.25, a 0.50, c 1.00 | 8.00 |"


def test_results_aggregates_come_from_the_runs_else_from_the_committed_copy(tmp_path: Path) -> None:
    """write_results.py reads RUNS/results.json and refreshes the copy in docs/results/; where
    the runs are not on this machine it falls back to that committed copy, else skips."""
    wr = _write_results()
    runs, committed = tmp_path / "runs", tmp_path / "docs" / "sweep.json"
    committed.parent.mkdir()
    assert wr.load_aggregate(runs, committed) is None and not committed.exists()
    runs.mkdir()
    (runs / "results.json").write_text(json.dumps({"rows": [], "finished_runs": 3}))
    assert wr.load_aggregate(runs, committed)["finished_runs"] == 3
    assert json.loads(committed.read_text())["finished_runs"] == 3
    (runs / "results.json").unlink()
    assert wr.load_aggregate(runs, committed)["finished_runs"] == 3


def test_results_target_checks_each_bar_and_dominance_by_the_fairness_rows() -> None:
    """Issue 31's target on means: worst class ≥ 13%, RA-AA ≥ PGD-AT − 1, SA ≥ PGD-AT − 2, and
    no FRL/CFA/WAT/DAFA row at least as good on both plane axes; fewer than 3 seeds: provisional."""
    wr = _write_results()

    def row(method: str, sa: float, ra: float, worst: float, seeds: int = 3) -> dict:
        def m(v: float) -> dict:
            return {"mean": v, "std": 0.01, "values": [v] * seeds}
        return {"setting": "balanced", "method": method, "seeds": list(range(seeds)),
                "metrics": {"sa": m(sa), "aa1000:ra.aa": m(ra), "aa1000:worst_class.worst": m(worst)}}

    rows = [row("at", 0.82, 0.72, 0.04),
            row("done-a", 0.81, 0.72, 0.14),         # every bar cleared, undominated: met
            row("done-b", 0.79, 0.73, 0.20),         # SA 3 points below PGD-AT's
            row("done-c", 0.82, 0.712, 0.135),       # dominated by wat (≥ both, > one)
            row("wat", 0.82, 0.718, 0.15, seeds=1),  # meets every bar, on one seed only
            row("trades", 0.82, 0.80, 0.30)]         # not a fairness row: dominates nothing here
    lines = wr.target_lines({"rows": rows})
    table = {ln.split(" | ")[0][2:]: ln for ln in lines if ln.startswith("| ") and "---" not in ln}
    assert "RA-AA ≥ 71.00, SA ≥ 80.00" in lines[0]
    assert table["done-a"].endswith("| – | met |")
    assert "SA" not in table["done-b"] and "81.00" not in table["done-b"]
    assert table["done-b"].count("✗") == 1 and table["done-b"].endswith("not met |")
    assert table["done-c"].endswith("| wat | not met |") and table["done-c"].count("✗") == 0
    assert table["wat"].endswith("| met (provisional) |")
    assert table["at"].endswith("not met |")  # the reference never meets its own target
    assert lines[-2] == "**Target met by a DONE variant**: done-a. Rows that meet it: done-a, wat, trades."
    assert wr.target_lines({"rows": rows[1:]}) == []  # no PGD-AT row: no bars


def test_bf16_verdict_applies_the_rule_written_before_the_runs() -> None:
    """bf16 becomes the default only if, paired by seed, RA-AA and the worst class of both at and
    done move by less than the fp32 seed spread; fewer than 3 paired seeds: no decision."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bf16_verdict", Path(__file__).parent.parent / "benchmarks" / "results" / "bf16_verdict.py")
    bv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bv)

    def row(method: str, ra: list[float], worst: list[float]) -> dict:
        def m(v: list[float]) -> dict:
            mean = sum(v) / len(v)
            std = (sum((x - mean) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5
            return {"mean": mean, "std": std, "values": v}
        return {"setting": "balanced", "method": method, "seeds": list(range(len(ra))),
                "metrics": {"aa1000:ra.aa": m(ra), "aa1000:worst_class.worst": m(worst)}}

    fp32 = [row("at", [0.72, 0.73, 0.74], [0.02, 0.04, 0.06]),   # std 1 and 2 points
            row("done", [0.72, 0.73, 0.74], [0.02, 0.04, 0.06])]
    same = [row("at-bf16", [0.725, 0.73, 0.74], [0.03, 0.04, 0.06]),
            row("done-bf16", [0.72, 0.725, 0.74], [0.02, 0.05, 0.05])]
    r = bv.verdict(same, fp32)
    assert r["decision"] == "default" and len(r["pairs"]) == 4
    at_ra = r["pairs"][0]
    assert at_ra["diff"] == pytest.approx([0.005, 0, 0]) and at_ra["fp32_std"] == pytest.approx(0.01)
    worse = [same[0], row("done-bf16", [0.70, 0.71, 0.72], [0.02, 0.04, 0.06])]  # −2 points: > 1
    assert bv.verdict(worse, fp32)["decision"] == "off"
    assert "**no**" in bv.table(bv.verdict(worse, fp32))
    two = [row("at-bf16", [0.72, 0.73], [0.02, 0.04]), same[1]]
    assert bv.verdict(two, fp32)["decision"] == "incomplete"
    assert bv.verdict(same[:1], fp32)["decision"] == "incomplete"  # done-bf16 not run yet


def test_the_verdict_pairs_each_method_with_tuned_pgd_at_by_seed(tmp_path: Path) -> None:
    """benchmarks/results/verdict.py (issue 51): verdict.json's reference and methods are means
    over seeds in %; the target is checked on the seeds a row shares with PGD-AT (worst class
    ≥ 1.5×, RA-AA ≥ −0.5, SA ≥ −1 points) and fails when a FAAL/DAFA/WAT row dominates."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "verdict", Path(__file__).parent.parent / "benchmarks" / "results" / "verdict.py")
    v = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v)

    def row(method: str, seeds: list[int], sa: list[float], ra: list[float], worst: list[float]) -> dict:
        m = {k: {"values": vals} for k, vals in (("sa", sa), ("aa400:ra.aa", ra),
                                                  ("aa400:worst_class.worst", worst))}
        return {"method": method, "setting": "balanced", "seeds": seeds, "metrics": m}

    results = {"rows": [
        row("at", [0, 1, 2], [.80, .80, .80], [.40, .40, .40], [.10, .10, .10]),
        row("done-val", [0, 1, 2], [.795, .79, .80], [.398, .40, .40], [.16, .15, .17]),  # meets it
        row("trades", [0, 1, 2], [.81, .81, .81], [.42, .42, .42], [.12, .12, .12]),      # worst too low
        row("wat-at", [1, 2], [.70, .70], [.39, .39], [.20, .20]),  # two seeds; lower RA-AA
    ]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = v.main(["--grid", f"cifar10-jpeg={tmp_path}:aa400", "--json", str(tmp_path / "verdict.json")])
    entry = json.loads((tmp_path / "verdict.json").read_text())["cifar10-jpeg"]
    assert entry == out["cifar10-jpeg"]
    assert entry["reference"] == {"name": "at", "seeds": [0, 1, 2], "sa": pytest.approx(80),
                                  "ra_aa": pytest.approx(40), "worst_all": pytest.approx(10)}
    by = {m["name"]: m for m in entry["methods"]}
    assert by["done-val"]["worst_all"] == pytest.approx(16) and by["done-val"]["target"]
    assert by["done-val"]["paired"]["sa"]["diff"] == pytest.approx(-0.5)
    assert by["done-val"]["paired"]["sa"]["diff_std"] == pytest.approx(0.5)
    assert not by["trades"]["target"] and not by["trades"]["paired"]["checks"]["worst_all"]
    wat = by["wat-at"]
    assert wat["paired"]["seeds"] == [1, 2] and wat["provisional"] and not wat["paired"]["checks"]["sa"]
    results["rows"].append(row("dafa", [0, 1, 2], [.80, .80, .80], [.41, .41, .41], [.17, .17, .17]))
    entry = v.verdict(results, "aa400")
    assert [m["dominated_by"] for m in entry["methods"] if m["name"] == "done-val"] == [["dafa"]]
    assert not next(m for m in entry["methods"] if m["name"] == "done-val")["target"]
    table = "\n".join(v.target_lines(entry))
    assert "| done-val | 3 | 16.00 | 1.60 | -0.07 ± 0.12 | -0.50 ± 0.50 | dafa | not met |" in table
