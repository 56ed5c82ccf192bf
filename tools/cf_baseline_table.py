#!/usr/bin/env python3
"""Summarize `genrec cf --report X.json` runs as markdown tables (per seed and mean ± sd).

usage: tools/cf_baseline_table.py REPORT.json [REPORT.json ...]
Runs are grouped by model; each model's main protocol (history masked for lightgcn/mf, all
items for sasrec) comes first, then the other protocol.
"""
import json
import statistics
import sys

KEYS = ["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"]


def fmt_mean(vals):
    if len(vals) < 2:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    by_model = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        rs.sort(key=lambda r: r["seed"])
        main_masked = rs[0]["main_protocol_history_masked"]
        for masked in [main_masked, not main_masked]:
            proto = "history_masked" if masked else "all_items"
            print(f"\n{model} — test, {proto.replace('_', ' ')}{' (main protocol)' if masked == main_masked else ''}\n")
            print("| seed | R@5 | R@10 | R@20 | N@5 | N@10 | N@20 | epochs (best) | stopped by | s/epoch |")
            print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
            for r in rs:
                t = r["test"][proto]
                print(
                    f"| {r['seed']} | " + " | ".join(f"{t[k]:.4f}" for k in KEYS)
                    + f" | {r['epochs_trained']} ({r['best_epoch']}) | {r['stopped_by']} | {r['seconds_per_epoch']:.1f} |"
                )
            cols = [fmt_mean([r["test"][proto][k] for r in rs]) for k in KEYS]
            print(f"| mean ± sd | " + " | ".join(cols) + " | | | |")


if __name__ == "__main__":
    main(sys.argv[1:])
