"""bf16 against fp32, paired by seed, under the decision rule written in bf16.yaml (issue 32 §4).

    python benchmarks/results/bf16_verdict.py --bf16 benchmarks/results/bf16 \\
        --grid benchmarks/results/grid --json docs/perf-bf16.json --doc docs/PERFORMANCE.md

Reads the two compare aggregates (OUT/results.json; `dorat compare FILE --out OUT
--aggregate-only` refreshes one): the bf16 rows of bf16.yaml and their fp32 twins, the results
grid's balanced `at` and `done` (the same config but perf.amp). For each pair and metric: the
bf16 − fp32 difference on every seed both have, its mean, and the fp32 row's seed spread (std).
The rule: bf16 becomes the default where the device computes it natively if, for both methods,
RA-AA and the worst class under all attacks (AutoAttack on 1,000 points) move by less than the
fp32 seed spread; otherwise it stays off. With fewer than 3 seeds on either side the verdict is
"incomplete".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf import publish  # noqa: E402

from dorat.compare import signed_points  # noqa: E402

PAIRS = {"at-bf16": "at", "done-bf16": "done"}
METRICS = [("aa1000:ra.aa", "RA-AA"), ("aa1000:worst_class.worst", "worst class (all)"),
           ("sa", "SA"), ("ra.pgd", "RA-PGD (full test set)")]
DECIDE = ("aa1000:ra.aa", "aa1000:worst_class.worst")
SEEDS = 3
MARK_BEGIN, MARK_END = "<!-- bf16:begin -->", "<!-- bf16:end -->"


def verdict(bf16_rows: list[dict], fp32_rows: list[dict], setting: str = "balanced") -> dict[str, Any]:
    """The paired comparison and the rule's verdict: "default", "off" or "incomplete"."""
    def find(rows: list[dict], name: str) -> dict | None:
        return next((r for r in rows if r["method"] == name and r["setting"] == setting), None)

    pairs, complete, within = [], True, True
    for b_name, f_name in PAIRS.items():
        b, f = find(bf16_rows, b_name), find(fp32_rows, f_name)
        if b is None or f is None:
            complete = False
            continue
        for key, label in METRICS:
            if key not in b["metrics"] or key not in f["metrics"]:
                complete &= key not in DECIDE
                continue
            bv, fv = b["metrics"][key]["values"], f["metrics"][key]["values"]
            common = [s for s in b["seeds"] if s in f["seeds"]]
            diff = [bv[b["seeds"].index(s)] - fv[f["seeds"].index(s)] for s in common]
            mean = sum(diff) / len(diff) if diff else float("nan")
            spread = f["metrics"][key]["std"]
            ok = bool(diff) and abs(mean) < spread
            if key in DECIDE:
                complete &= len(common) >= SEEDS
                within &= ok
            pairs.append({"method": f_name, "metric": label, "key": key, "seeds": common,
                          "bf16": b["metrics"][key]["mean"], "fp32": f["metrics"][key]["mean"],
                          "diff": diff, "mean_diff": mean, "fp32_std": spread,
                          "within_spread": ok, "decides": key in DECIDE})
    decision = "incomplete" if not complete else "default" if within else "off"
    return {"pairs": pairs, "decision": decision}


def table(result: dict[str, Any]) -> str:
    lines = ["| method | metric | fp32 | bf16 | bf16 − fp32, per seed | mean | fp32 seed std | within |",
             "|---|---|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        per_seed = ", ".join(f"s{s}: {signed_points(d)}" for s, d in zip(p["seeds"], p["diff"]))
        mark = ("yes" if p["within_spread"] else "**no**") if p["decides"] else ""
        lines.append(f"| {p['method']} | {p['metric']} | {100 * p['fp32']:.2f} | {100 * p['bf16']:.2f} | "
                     f"{per_seed} | {signed_points(p['mean_diff'])} | {100 * p['fp32_std']:.2f} | {mark} |")
    words = {"default": "bf16 keeps the robustness: `perf.amp=auto` (bf16 where native) is the default",
             "off": "bf16 moves RA-AA or the worst class by more than the fp32 seed spread: it stays off",
             "incomplete": "incomplete: fewer than 3 paired seeds, no decision yet"}
    return "\n".join(lines + ["", f"Verdict under the rule: **{words[result['decision']]}**."])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", type=Path, default=ROOT / "benchmarks" / "results" / "bf16")
    ap.add_argument("--grid", type=Path, default=ROOT / "benchmarks" / "results" / "grid")
    ap.add_argument("--json")
    ap.add_argument("--doc")
    a = ap.parse_args(argv)
    rows = {}
    for name, d in (("bf16", a.bf16), ("grid", a.grid)):
        f = d / "results.json"
        if not f.is_file():
            sys.exit(f"bf16_verdict: error: {f} does not exist; aggregate it first with "
                     f"`dorat compare <file> --out {d} --aggregate-only`")
        rows[name] = json.loads(f.read_text())["rows"]
    result = verdict(rows["bf16"], rows["grid"])
    publish(result, table(result), a.json, a.doc, MARK_BEGIN, MARK_END)
    return result


if __name__ == "__main__":
    main()
