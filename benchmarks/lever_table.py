"""The table of a `benchmarks/lever_runs.sh` folder: per lever, dev CIDEr-D by epoch and the best checkpoint's
greedy and beam-3 scores, as markdown on stdout and as JSON.

    python benchmarks/lever_table.py runs/levers [--out benchmarks/results/lever_runs.json]
"""
import argparse
import csv
import json
from pathlib import Path

from captioner.io import atomic_write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="the RUNS folder of benchmarks/lever_runs.sh")
    ap.add_argument("--out", default="benchmarks/results/lever_runs.json")
    args = ap.parse_args()

    levers = []
    for run in sorted(p for p in Path(args.runs).iterdir() if (p / "log.csv").is_file()):
        log = list(csv.DictReader(open(run / "log.csv")))
        decoded = json.loads((run / "levers.json").read_text())["rows"] if (run / "levers.json").is_file() else []
        best = max(log, key=lambda r: float(r["cider"]))
        levers.append({
            "lever": run.name, "epochs": len(log), "best_epoch": int(best["epoch"]),
            "dev_cider_by_epoch": [round(float(r["cider"]), 4) for r in log],
            "train_secs_per_epoch": round(sum(float(r["train_secs"]) for r in log) / len(log), 1),
            "decoded": {f"beam{r['beam']}": {k: r[k] for k in ("bleu1", "bleu4", "rougeL", "cider")} for r in decoded},
        })
    atomic_write_json(args.out, {"runs": args.runs, "split": "dev", "levers": levers})

    base = next((lv for lv in levers if lv["lever"] == "base"), None)
    print("| lever | dev CIDEr-D by epoch (greedy) | best greedy BLEU-4 / CIDEr-D | beam 3 BLEU-4 / CIDEr-D |")
    print("|---|---|---|---|")
    for lv in levers:
        g, b = lv["decoded"].get("beam1", {}), lv["decoded"].get("beam3", {})
        delta = ""
        if base and lv is not base and g and base["decoded"].get("beam1"):
            delta = f" ({100 * (g['cider'] - base['decoded']['beam1']['cider']):+.1f})"
        print(f"| {lv['lever']} | {' '.join(f'{100 * c:.1f}' for c in lv['dev_cider_by_epoch'])} | "
              f"{100 * g.get('bleu4', 0):.1f} / {100 * g.get('cider', 0):.1f}{delta} (epoch {lv['best_epoch']}) | "
              f"{100 * b.get('bleu4', 0):.1f} / {100 * b.get('cider', 0):.1f} |")


if __name__ == "__main__":
    main()
