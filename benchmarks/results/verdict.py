"""Issue 51's verdict from finished tuned grids: docs/results/verdict.json and the target table.

    python benchmarks/results/verdict.py --grid cifar10-jpeg=benchmarks/results/cifar10-tuned:aa400 \
        --grid fashion-mnist=benchmarks/results/fmnist-tuned:aa1000 --json docs/results/verdict.json

Each --grid is DATASET=OUT:EVAL: a `dorat compare` output directory (its results.json) and the
extra evaluation whose worst case over all attacks (AutoAttack included) gives the worst class.
For each data set, ``reference`` is the tuned PGD-AT row (method ``at``) and ``methods`` every
row, each with name, seeds, sa, ra_aa and worst_all: means over its seeds, in %.

The target (issue 51), paired by seed (the seeds a row shares with PGD-AT): worst-class robust
accuracy under all attacks ≥ 1.5 × PGD-AT's, RA-AA ≥ PGD-AT's − 0.5, SA ≥ PGD-AT's − 1 (points),
and no FAAL, DAFA or WAT row dominating it on the (RA-AA, worst-class) plane (≥ on both means,
> on one). Rows with fewer than 3 shared seeds are provisional.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

RATIO, RA_DROP, SA_DROP = 1.5, 0.5, 1.0  # the target's bars, in points where not a ratio
DOMINATORS = ("faal", "dafa", "wat")


def _values(row: dict[str, Any], key: str) -> dict[int, float]:
    """Seed -> value in % of one metric of a results.json row."""
    return {s: 100 * v for s, v in zip(row["seeds"], row["metrics"][key]["values"])}


def summary(row: dict[str, Any], aa: str) -> dict[str, Any]:
    keys = {"sa": "sa", "ra_aa": f"{aa}:ra.aa", "worst_all": f"{aa}:worst_class.worst"}
    out: dict[str, Any] = {"name": row["method"], "seeds": list(row["seeds"])}
    for field, key in keys.items():
        out[field] = statistics.fmean(_values(row, key).values())
    return out


def paired(row: dict[str, Any], ref: dict[str, Any], aa: str) -> dict[str, Any]:
    """The target's criteria on the seeds ``row`` shares with ``ref``, with the paired spread."""
    keys = {"sa": "sa", "ra_aa": f"{aa}:ra.aa", "worst_all": f"{aa}:worst_class.worst"}
    seeds = sorted(set(row["seeds"]) & set(ref["seeds"]))
    out: dict[str, Any] = {"seeds": seeds}
    for field, key in keys.items():
        mine, theirs = _values(row, key), _values(ref, key)
        diffs = [mine[s] - theirs[s] for s in seeds]
        out[field] = {"mean": statistics.fmean(mine[s] for s in seeds),
                      "reference": statistics.fmean(theirs[s] for s in seeds),
                      "diff": statistics.fmean(diffs),
                      "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else None}
    w = out["worst_all"]
    out["checks"] = {"worst_all": w["mean"] >= RATIO * w["reference"],
                     "ra_aa": out["ra_aa"]["diff"] >= -RA_DROP, "sa": out["sa"]["diff"] >= -SA_DROP}
    return out


def verdict(results: dict[str, Any], aa: str, setting: str = "balanced") -> dict[str, Any]:
    """One data set's entry of verdict.json from a grid's results.json."""
    rows = [r for r in results["rows"] if r["setting"] == setting and r["seeds"]
            and f"{aa}:worst_class.worst" in r["metrics"]]
    ref = next((r for r in rows if r["method"] == "at"), None)
    if ref is None:
        raise SystemExit(f"no finished tuned PGD-AT row (method 'at') with {aa} in the {setting} setting")
    methods = []
    for r in rows:
        entry = summary(r, aa)
        if r is not ref:
            p = paired(r, ref, aa)
            dominated = [o["method"] for o in rows if o is not r and o["method"].startswith(DOMINATORS)
                         and _dominates(summary(o, aa), entry)]
            entry.update({"paired": p, "dominated_by": dominated,
                          "target": all(p["checks"].values()) and not dominated,
                          "provisional": len(p["seeds"]) < 3})
        methods.append(entry)
    return {"setting": setting, "eval": aa, "reference": summary(ref, aa), "methods": methods}


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    plane = ("ra_aa", "worst_all")
    return all(a[k] >= b[k] for k in plane) and any(a[k] > b[k] for k in plane)


def target_lines(entry: dict[str, Any]) -> list[str]:
    """The target table of one data set (Markdown)."""
    ref = entry["reference"]
    out = [f"Tuned PGD-AT ({len(ref['seeds'])} seeds): SA {ref['sa']:.2f}, RA-AA {ref['ra_aa']:.2f}, "
           f"worst class (all attacks) {ref['worst_all']:.2f}. Paired by seed: Δ = row − PGD-AT on "
           "the same seeds (± std of the paired differences).", "",
           "| method | seeds | worst class (all) | ×PGD-AT | ΔRA-AA | ΔSA | dominated by | target |",
           "|---|---|---|---|---|---|---|---|"]

    def delta(d: dict[str, Any]) -> str:
        return f"{d['diff']:+.2f}" + (f" ± {d['diff_std']:.2f}" if d["diff_std"] is not None else "")

    for m in entry["methods"]:
        if "paired" not in m:
            continue
        p = m["paired"]
        w = p["worst_all"]
        ratio = f"{w['mean'] / w['reference']:.2f}" if w["reference"] > 0 else "–"
        verdict_text = ("met" if m["target"] else "not met") + (" (provisional)" if m["provisional"] else "")
        out.append(f"| {m['name']} | {len(p['seeds'])} | {w['mean']:.2f} | {ratio} | {delta(p['ra_aa'])} | "
                   f"{delta(p['sa'])} | {', '.join(m['dominated_by']) or '–'} | {verdict_text} |")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", action="append", required=True, metavar="DATASET=OUT:EVAL")
    ap.add_argument("--json", type=Path, help="write verdict.json here")
    a = ap.parse_args(argv)
    out = {}
    for spec in a.grid:
        name, _, rest = spec.partition("=")
        where, _, aa = rest.rpartition(":")
        out[name] = verdict(json.loads((Path(where) / "results.json").read_text()), aa)
        print(f"## {name}\n\n" + "\n".join(target_lines(out[name])) + "\n")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
