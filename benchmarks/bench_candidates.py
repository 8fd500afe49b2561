"""K candidates in one pass vs K sequential K = 1 runs: digits MLP 64-256-256-10, Adam, batch 64, a fixed-LR grid
(strategy="grid", no early stop), so every run does the same S steps. ms/step counts the steps phase of find()
(result.timings["steps"]) divided by S: for the sequential runs, the sum over the K runs. Interleaved, best of N
(the 2-core machines are noisy: PERF-NOTES). Writes benchmarks/results/cpu/candidates.csv and .md from it.

    python -m benchmarks.bench_candidates [--k 16] [--steps 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import lrfast
from lrfast.data import digits

OUT = Path(__file__).parent / "results" / "cpu"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def one_pass(m, loader, lrs, steps) -> tuple[float, lrfast.LRFindResult]:
    res = lrfast.find(m, loader, optimizer="adam", strategy="grid", lrs=lrs, steps=steps, early_stop_threshold=None,
                      progress=False)  # fmt: skip
    return res.timings["steps"], res


def sequential(m, loader, lrs, steps) -> tuple[float, np.ndarray]:
    total, curves = 0.0, []
    for lr in lrs:
        t, res = one_pass(m, loader, [lr], steps)
        total += t
        curves.append(res.losses[0])
    return total, np.stack(curves)


def conditions() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    return {"device": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "lrfast": lrfast.__version__,
            "commit": commit, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    loader = DataLoader(digits(), batch_size=64, shuffle=True)
    m, lrs = model(), list(np.geomspace(1e-4, 1e-2, args.k))
    one_pass(m, loader, lrs[:2], 5)  # warm-up: imports, vmap tracing caches, thread pools
    best_pass, best_seq, info = float("inf"), float("inf"), {}
    for _ in range(args.repeats):
        t, res = one_pass(m, loader, lrs, args.steps)
        best_pass, info = min(best_pass, t), res.info
        t_seq, curves = sequential(m, loader, lrs, args.steps)
        best_seq = min(best_seq, t_seq)
    rel = float(np.max(np.abs(res.losses - curves) / np.abs(curves)))
    row = {"workload": "digits_mlp_64-256-256-10", "optimizer": "adam", "batch_size": 64, "k": args.k,
           "steps": args.steps, "forward": info["forward"], "ms_per_step_one_pass": 1e3 * best_pass / args.steps,
           "ms_per_step_sequential": 1e3 * best_seq / args.steps,
           "ms_per_candidate_step_one_pass": 1e3 * best_pass / args.steps / args.k,
           "speedup_vs_sequential": best_seq / best_pass, "max_rel_diff_curves": rel, "repeats": args.repeats,
           **conditions()}  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "candidates.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    write_md()
    print(open(OUT / "candidates.md").read())


def write_md() -> None:
    with open(OUT / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    cols = ["workload", "k", "steps", "forward", "ms_per_step_one_pass", "ms_per_step_sequential",
            "ms_per_candidate_step_one_pass", "speedup_vs_sequential", "max_rel_diff_curves"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{float(r[c]):.3g}" if c.startswith(("ms_", "speedup", "max_")) else r[c] for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    cond = rows[0]
    lines.append(f"\n{cond['device']}, {cond['cores']} cores, {cond['threads']} threads, torch {cond['torch']}, "
                 f"commit {cond['commit']}, {cond['date']}; best of {cond['repeats']}, interleaved. Generated from "
                 "candidates.csv by benchmarks/bench_candidates.py.")  # fmt: skip
    (OUT / "candidates.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
