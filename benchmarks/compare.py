"""lrfast against its peers on the same workloads: torch-lr-finder, Lightning's `Tuner.lr_find` and a bare eager loop.

Every contestant runs the same range (exp 1e-7 -> 10, early stopping off) with the workload's optimizer (torch
defaults), batch, precision and steps (benchmarks/workloads.py), on the same batches (a fresh `lrfast.data.loader`
with seed 0, cycled when the steps outrun it), in the same process. Two measures per (workload, contestant):
- first call: the whole range test in a fresh process (`--child`), Python and torch already imported; the model,
  optimizer, trainer and finder set-up are inside the timing, the contestant's own import is its own column; best
  of 5 processes, run round by round (one in three or four fresh processes here runs 10-20x slow while other jobs
  load the second core);
- warm: best of 3 in one process after one warm-up, contestants interleaved round by round (the 2-core machines
  swing up to 2x minute to minute, see shared/PERF-NOTES.md).
Long workloads (ResNet-18 and char-GPT on CPU: seconds per step; GPT-2-shaped) get one fresh process and one warm
run after a 2-step warm-up. On CUDA the clock stops after torch.cuda.synchronize(); lrfast runs with its CUDA
defaults (compile and CUDA-graph capture times are their own columns when lrfast reports them) and K = 16 / 32 rows
(strategy "seeds": K replicas of the same range test) come with it, except for GPT-2-shaped (K copies of 124M
params). Steady state: lrfast's steps phase, the bare loop's steps after the first 10 %, the peers' whole call
(they have no separable phases).
Rows go to `benchmarks/results/<device>/compare.csv` (units in column names, conditions on every row); `compare.md`
and `compare.png` are rendered from the CSV. Peers are optional imports: a missing one gets a row with a `note`.

    python -m benchmarks.compare [--device cpu|cuda] [--workloads mlp,lenet,resnet18,chargpt,gpt2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks import report
from benchmarks import workloads as W
from benchmarks.contestants import (
    CONTESTANTS,
    PEERS,
    RUNNERS,
    SUGGESTION_METHOD,
    Settings,
    for_workload,
    fresh,
    missing,
    sync,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
# K-candidate rows are the GPU engine's claim; on CPU time vs K is bench_candidates.py's job
DEFAULT_CONTESTANTS = {"cpu": ("lrfast", "torch_lr_finder", "lightning", "bare"), "cuda": CONTESTANTS}
DEFAULT_WORKLOADS = {"cpu": tuple(w for w in W.WORKLOADS if w not in W.GPU_ONLY), "cuda": W.WORKLOADS}
COLUMNS = [
    "workload", "contestant", "k", "steps_run", "wall_s_first", "wall_s_warm_best", "ms_per_step_warm",
    "ms_per_step_steady", "compile_s", "capture_s", "suggestion", "suggestion_method", "impl",
    "speedup_vs_bare", "speedup_vs_torch_lr_finder", "speedup_vs_lightning", "steady_speedup_vs_bare",
    "steady_speedup_vs_torch_lr_finder", "steady_speedup_vs_lightning", "wall_vs_lrfast_k1",
    "import_s_first", "peak_rss_mb", "cuda_max_alloc_mb", "note",
    "model", "params", "optimizer", "precision", "min_lr", "max_lr", "steps", "batch_size", "early_stop", "repeats",
    "first_repeats", "device", "cores", "threads", "python", "torch", "triton", "lightning", "torch_lr_finder",
    "lrfast", "commit", "date",
]  # fmt: skip


def timed(contestant: str, dataset, make_model, s: Settings) -> dict:
    model, loader = fresh(dataset, make_model, s)
    gc.collect()
    if s.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(s)
    t0 = time.perf_counter()
    out = RUNNERS[contestant](model, loader, s)
    sync(s)
    out["wall_s"] = time.perf_counter() - t0
    if s.cuda:
        out["cuda_max_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------------------------------------- measures


def child(contestant: str, workload_name: str, s: Settings) -> dict:
    """One range test in this (fresh) process: the first-call measure."""
    # torch.optim imports torch._dynamo on its first step (1.1-2.4 s here) and importing Lightning does it too: count
    # it with the torch import, outside every contestant's timing, so first calls compare the finders, not who
    # happened to prepay it
    importlib.import_module("torch._dynamo")
    t0 = time.perf_counter()
    why = missing(contestant)
    import_s = time.perf_counter() - t0
    if why:
        raise RuntimeError(why)
    wl = W.get(workload_name, s.device, s.quick)
    out = timed(contestant, wl.dataset(), wl.model, s)
    out.update(import_s=import_s, peak_rss_mb=_peak_rss_mb(), threads=torch.get_num_threads())
    return out


def first_call(contestant: str, workload_name: str, s: Settings) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.compare", "--child", contestant, "--workloads", workload_name,
           "--device", s.device, "--steps", str(s.steps), "--min-lr", repr(s.min_lr), "--max-lr", repr(s.max_lr),
           "--batch-size", str(s.batch_size)]  # fmt: skip
    if s.early_stop is not None:
        cmd += ["--early-stop", repr(s.early_stop)]
    if s.threads:
        cmd += ["--threads", str(s.threads)]
    if s.quick:
        cmd += ["--quick"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"first call failed (exit {p.returncode}): {tail}"}


def best_of(contestants: list[str], rounds: int, warmups: int, run_one, warm_up=None) -> dict:
    """Each contestant's fastest run of `rounds` after `warmups` (run with `warm_up` when given, else `run_one`),
    every round running each contestant once in an order that rotates by round (bursts of load from other jobs here
    last seconds: spread them over everyone)."""
    best: dict[str, dict] = {}
    for r in range(warmups + rounds):
        order = contestants[r % len(contestants) :] + contestants[: r % len(contestants)]
        for c in order:
            if "error" in best.get(c, {}):
                continue
            try:
                out = (warm_up or run_one)(c) if r < warmups else run_one(c)
            except Exception as e:  # one broken contestant must not sink the table
                out = {"error": f"failed: {type(e).__name__}: {e}"}
            if "error" in out or (r >= warmups and out["wall_s"] < best.get(c, {}).get("wall_s", math.inf)):
                best[c] = out
    return best


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------- rows


def conditions(s: Settings, repeats: int, first_repeats: int) -> dict:
    return {
        "optimizer": s.optimizer, "precision": s.precision, "min_lr": s.min_lr, "max_lr": s.max_lr, "steps": s.steps,
        "batch_size": s.batch_size, "early_stop": "off" if s.early_stop is None else s.early_stop,
        "repeats": repeats, "first_repeats": first_repeats, **report.conditions(s.device),
        "lightning": report.version("pytorch-lightning"), "torch_lr_finder": report.version("torch-lr-finder"),
    }  # fmt: skip


def rows_for(wl: W.Workload, firsts: dict, warms: dict, why_missing: dict, cond: dict) -> list[dict]:
    torch.manual_seed(0)
    model = {"model": wl.title, "params": sum(p.numel() for p in wl.model().parameters())}
    rows = []
    for c in CONTESTANTS:
        w, f = warms.get(c, {}), firsts.get(c, {})
        notes = [n for n in (why_missing.get(c), w.get("error"), f.get("error")) if n]
        ms = 1e3 * w["wall_s"] / w["steps_run"] if w.get("steps_run") else None
        rows.append({
            "workload": wl.name, "contestant": c, "k": w.get("k", f.get("k")),
            "steps_run": w.get("steps_run", f.get("steps_run")), "wall_s_first": f.get("wall_s"),
            "wall_s_warm_best": w.get("wall_s"), "ms_per_step_warm": ms,
            "ms_per_step_steady": w.get("steady_ms", ms), "compile_s": w.get("compile_s"),
            "capture_s": w.get("capture_s"), "suggestion": w.get("suggestion", f.get("suggestion")),
            "suggestion_method": SUGGESTION_METHOD[c], "impl": w.get("impl", f.get("impl")),
            "import_s_first": f.get("import_s"), "peak_rss_mb": f.get("peak_rss_mb"),
            "cuda_max_alloc_mb": w.get("cuda_max_alloc_mb"), "note": "; ".join(notes), **model, **cond,
        })  # fmt: skip
    by = {r["contestant"]: r for r in rows}
    k1 = by["lrfast"]["wall_s_warm_best"]
    for r in rows:
        for peer in PEERS:
            for col, prefix in (("ms_per_step_warm", "speedup"), ("ms_per_step_steady", "steady_speedup")):
                ok = by[peer][col] and r[col]
                r[f"{prefix}_vs_{peer}"] = by[peer][col] / r[col] if ok else None
        if r["contestant"].startswith("lrfast_k") and k1 and r["wall_s_warm_best"]:
            r["wall_vs_lrfast_k1"] = r["wall_s_warm_best"] / k1
    return [r for r in rows if r["contestant"] in warms or r["contestant"] in why_missing]


def render_markdown(csv_path: Path) -> str:
    """compare.md from compare.csv: the table, the workloads, the conditions, how to reproduce."""
    rows = report.read_csv(csv_path)
    if not rows:
        return "# lrfast vs peers\n\n(no rows)\n"
    num = report.num
    head = ["workload", "contestant", "k", "ms/step warm", "ms/step steady", "wall s warm best", "wall s first call",
            "compile s", "capture s", "speedup vs bare", "vs torch-lr-finder", "vs Lightning", "steady vs bare",
            "steady vs Lightning", "time / K=1", "steps", "suggestion", "import s", "peak RSS MB", "CUDA max MB",
            "note"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        suggestion = num(r["suggestion"], ".3g") + (f" ({r['suggestion_method']})" if r["suggestion"] else "")
        cells = [r["workload"], r["contestant"], r["k"], num(r["ms_per_step_warm"], ".3f"),
                 num(r["ms_per_step_steady"], ".3f"), num(r["wall_s_warm_best"], ".3f"), num(r["wall_s_first"], ".3f"),
                 num(r["compile_s"], ".2f"), num(r["capture_s"], ".2f"), num(r["speedup_vs_bare"], ".2f"),
                 num(r["speedup_vs_torch_lr_finder"], ".2f"), num(r["speedup_vs_lightning"], ".2f"),
                 num(r["steady_speedup_vs_bare"], ".2f"), num(r["steady_speedup_vs_lightning"], ".2f"),
                 num(r["wall_vs_lrfast_k1"], ".2f"), r["steps_run"], suggestion, num(r["import_s_first"], ".2f"),
                 num(r["peak_rss_mb"], ".0f"), num(r["cuda_max_alloc_mb"], ".0f"), r["note"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    seen = {}
    for r in rows:
        seen.setdefault(r["workload"], r)
    workloads = [
        f"- {w}: {r['model']}, {int(r['params']):,} params; {r['steps']} steps, batch {r['batch_size']}, "
        f"{r['optimizer']}, {r['precision']}; warm best of {r['repeats']}, first call best of {r['first_repeats']}"
        for w, r in seen.items()
    ]  # fmt: skip
    c = rows[0]
    quick = all(r["first_repeats"] == "0" for r in rows)
    lrfast_impl = "; ".join(sorted({r["impl"] for r in rows if r["contestant"] == "lrfast" and r["impl"]}))
    return "\n".join([
        f"# lrfast vs peers: LR range test, {c['device']}", "",
        f"Range exp {c['min_lr']} -> {c['max_lr']}, torch default hyper-parameters, early stop {c['early_stop']}; "
        "warm = best of N after one warm-up (2 steps for the long workloads), contestants "
        "interleaved round by round; first call = one range test in a fresh process, best of N processes run "
        "round by round (Python, torch and torch._dynamo imported before the clock starts, the contestant's own "
        "import timed apart in `import s`); peak RSS of that process. k = LR candidates per pass. ms/step warm = "
        "whole call / steps; steady = lrfast's steps phase (compile and capture apart), the bare loop's steps "
        "after the first 10 %, the peers' whole call / steps. time / K=1 = warm wall of the K row / lrfast K = 1.",
        "", "Workloads (steps and batch as run here):", *workloads, "",
        *lines, "",
        f"Machine: {c['device']}, {c['cores']} cores, {c['threads']} torch threads; Python {c['python']}, "
        f"torch {c['torch']}, triton {c['triton'] or '-'}, Lightning {c['lightning'] or '-'}, torch-lr-finder "
        f"{c['torch_lr_finder'] or '-'}, lrfast {c['lrfast'] or '-'} at {c['commit']}; {c['date']}.", "",
        "Settings that differ between contestants: the schedule (lrfast, torch-lr-finder and bare: "
        "min*(max/min)^(i/(N-1)), both endpoints; Lightning: lr_0 = min, then min*(max/min)^((k+1)/N)); the "
        "suggestion method (in brackets, each peer's default, on its own smoothing: lrfast and Lightning debiased "
        "EMA 0.98, torch-lr-finder an undebiased 0.05 EMA); the optimizer code (torch.optim's default for the "
        "peers, the bare loop's in `impl`, lrfast's own: "
        f"{lrfast_impl or '-'}); torch-lr-finder and Lightning draw a tqdm bar that "
        "cannot be switched off (sent to /dev/null), lrfast runs with progress=False; Lightning writes and reloads "
        "a checkpoint per call; with early stop off every curve runs on into divergence, and each suggestion is its "
        "tool's own pick on that whole curve; the bare loop restores nothing and suggests nothing. Workloads run "
        "for fewer than 100 steps are there for time: 8 decades of LR in 10-20 steps make a coarse curve, so "
        "their suggestions mean little (Lightning gives none under its minimum number of points)."
        + (" No fresh-process call in this run (--quick)." if quick else ""),
        "", "Reproduce: `pip install -e . torch-lr-finder pytorch-lightning scikit-learn && "
        f"python -m benchmarks.compare --device {'cuda' if 'cuda' in csv_path.parent.name else 'cpu'}`; "
        "this file and compare.png are rendered from compare.csv (`python -m benchmarks.compare --render "
        "PATH/compare.csv`).", "",
    ])  # fmt: skip


def render_png(csv_path: Path) -> None:
    """compare.png from compare.csv: lrfast K = 1's speedup over each peer, per workload; whole call and steady."""
    rows = [r for r in report.read_csv(csv_path) if r["contestant"] == "lrfast"]
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    x = np.arange(len(rows))
    for ax, prefix, title in zip(axes, ("speedup", "steady_speedup"), ("whole call, warm", "steady state")):
        for i, peer in enumerate(PEERS):
            vals = [float(r[f"{prefix}_vs_{peer}"] or "nan") for r in rows]
            bars = ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=f"vs {peer}")
            ax.bar_label(bars, fmt="%.2g", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(x, [f"{r['workload']}\n{r['steps']} steps" for r in rows])
        ax.set(title=f"lrfast K=1 speedup, {title}", yscale="log")
        ax.yaxis.set_major_formatter("{x:g}x")
        ax.yaxis.set_minor_formatter("")
    axes[0].set_ylabel("x faster (peer time / lrfast time)")
    axes[0].legend(fontsize=8)
    c = rows[0] if rows else {}
    fig.suptitle(f"{c.get('device', '')}, {c.get('threads', '')} threads, torch {c.get('torch', '')}, "
                 f"commit {c.get('commit', '')}, {c.get('date', '')}", fontsize=9)  # fmt: skip
    report.save_png(fig, csv_path.with_suffix(".png"))


def render(csv_path: Path) -> None:
    csv_path.with_suffix(".md").write_text(render_markdown(csv_path))
    render_png(csv_path)


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workloads", help="comma-separated from " + ", ".join(W.WORKLOADS) + "; default: all that run "
                   "on the device (gpt2 is GPU-only unless named)")  # fmt: skip
    p.add_argument("--contestants", help="comma-separated from " + ", ".join(CONTESTANTS) + "; default: all on "
                   "cuda, no K > 1 rows on cpu")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke run: tiny workloads, 20 steps, 1 repetition, no "
                   "fresh-process call")  # fmt: skip
    p.add_argument("--out", type=Path, help="for compare.csv/.md/.png; default benchmarks/results/<device>")
    p.add_argument("--steps", type=int, help="default: the workload's (100; fewer for the heavy ones on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="warm: best of this many after one warm-up")
    p.add_argument("--first-repeats", type=int, default=5, help="first call: best of this many fresh processes")
    p.add_argument("--min-lr", type=float, default=1e-7)
    p.add_argument("--max-lr", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, help="default: the workload's")
    p.add_argument("--early-stop", type=float, default=None, help="threshold x best loss for every contestant "
                   "that has one (torch-lr-finder's applies to its own smoothing); default off")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch.set_num_threads for every contestant (default: torch's)")
    p.add_argument("--child", choices=CONTESTANTS, help=argparse.SUPPRESS)
    p.add_argument("--render", type=Path, help="only render compare.md and compare.png next to this compare.csv")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])

    status = report.render_or_refuse(args, render)
    if status is not None:
        return status
    repeats = 1 if args.quick else args.repeats
    first_repeats = 0 if args.quick else args.first_repeats
    s = Settings(args.min_lr, args.max_lr, early_stop=args.early_stop, device=args.device, threads=args.threads,
                 quick=args.quick)  # fmt: skip
    if s.threads:
        torch.set_num_threads(s.threads)
    workloads = [w for w in (args.workloads or ",".join(DEFAULT_WORKLOADS[args.device])).split(",") if w]
    for w in workloads:
        if w not in W.WORKLOADS:
            p.error(f"--workloads: unknown workload {w!r}; choose from {', '.join(W.WORKLOADS)}")

    if args.child:
        wl = W.get(workloads[0], s.device, s.quick)
        print(json.dumps(child(args.child, wl.name, for_workload(wl, s, args.steps, args.batch_size))))
        return 0

    chosen = [c for c in CONTESTANTS if c in (args.contestants or ",".join(DEFAULT_CONTESTANTS[args.device]))]
    why_missing = {c: missing(c) for c in chosen}
    live = [c for c in chosen if why_missing[c] is None]
    rows = []
    for name in workloads:
        wl = W.get(name, s.device, s.quick)
        sw = for_workload(wl, s, args.steps, args.batch_size)
        reps, firsts_n = (min(repeats, 1), min(first_repeats, 1)) if wl.heavy else (repeats, first_repeats)
        skip = {c: "not run for this workload (K copies of its model)" for c in live
                if c.startswith("lrfast_k") and not wl.candidates}  # fmt: skip
        run_here = [c for c in live if c not in skip]
        firsts = best_of(run_here, firsts_n, 0, lambda c: first_call(c, name, sw))
        dataset = wl.dataset()
        warm_up = partial(timed, dataset=dataset, make_model=wl.model, s=dataclasses.replace(sw, steps=2))
        warms = best_of(run_here, reps, 1, lambda c: timed(c, dataset, wl.model, sw), warm_up if wl.heavy else None)
        new = rows_for(wl, firsts, warms, {**{c: why_missing[c] for c in chosen if why_missing[c]}, **skip},
                       conditions(sw, reps, firsts_n))  # fmt: skip
        for r in new:
            print(f"{name:8} {r['contestant']:16} warm {r['ms_per_step_warm'] or float('nan'):9.3f} ms/step  "
                  f"first {r['wall_s_first'] or float('nan'):7.3f} s  {r['note']}", file=sys.stderr)  # fmt: skip
        rows += new
    out = args.out or ROOT / "benchmarks" / "results" / args.device
    report.write_csv(rows, out / "compare.csv", COLUMNS)
    render(out / "compare.csv")
    print(f"wrote {out / 'compare.csv'}, compare.md and compare.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
