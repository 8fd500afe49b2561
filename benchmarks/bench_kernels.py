"""AdamW step kernels on CPU: lrfast's C++ and reference steps against torch's fused, foreach and raw
`torch._fused_adamw_` steps, at 10k / 100k / 1M params (K = 1) and K = 16 candidates of 100k params.

    python -m benchmarks.bench_kernels   # interleaved best-of-N; writes benchmarks/results/cpu/kernels.{csv,md}
    pytest benchmarks/bench_kernels.py --benchmark-enable

Every contestant does the same work per call: one AdamW step (betas 0.9/0.999, eps 1e-8, weight decay 1e-2) over
K candidates of `params` fp32 parameters, each candidate at its own lr. torch.optim gets one param group per
candidate (its way to give each its own lr); `torch._fused_adamw_` is called once per candidate. The machine is
shared and noisy: contestants run interleaved, round after round, and we keep the median and the best round.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import lrfast
from lrfast.kernels import cpu, reference
from lrfast.kernels.reference import AdamParams

try:
    import pytest
except ImportError:  # main() needs no pytest
    pytest = None

BYTES_PER_PARAM = 28  # AdamW fp32: read p, g, m, v; write p, m, v
CASES = [(10_000, 1), (100_000, 1), (1_000_000, 1), (100_000, 16)]  # (params per candidate, K)
KERNELS = ["lrfast_cpp", "lrfast_reference", "torch_fused", "torch_foreach", "torch_fused_adamw_direct"]
HP = AdamParams(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True)
RESULTS = Path(__file__).resolve().parent / "results" / "cpu"


def make_step(kernel: str, params: int, k: int, seed: int = 0):
    """A zero-argument callable doing one AdamW step of `kernel` over k candidates of `params` parameters."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(k, params, generator=gen)
    g = torch.randn(k, params, generator=gen) * 1e-2
    lr = torch.logspace(-4, -2, k, dtype=torch.float64) if k > 1 else torch.tensor([1e-3], dtype=torch.float64)
    step = 10  # a mid-run step: bias corrections != 1

    if kernel in ("lrfast_cpp", "lrfast_reference"):
        if kernel == "lrfast_cpp" and cpu.BACKEND != "cpp":
            return None
        fn = cpu.adam_step if kernel == "lrfast_cpp" else reference.adam_step
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        return lambda: fn(p, g, m, v, lr, step, HP)

    rows = [p[i].clone() for i in range(k)]
    grads = [g[i].clone() for i in range(k)]
    if kernel == "torch_fused_adamw_direct":
        ms, vs = [torch.zeros_like(r) for r in rows], [torch.zeros_like(r) for r in rows]
        steps = [torch.tensor(float(step)) for _ in rows]
        lrs = lr.tolist()

        def direct():
            for i in range(k):
                torch._fused_adamw_(
                    [rows[i]], [grads[i]], [ms[i]], [vs[i]], [], [steps[i]], lr=lrs[i], beta1=HP.beta1,
                    beta2=HP.beta2, weight_decay=HP.weight_decay, eps=HP.eps, amsgrad=False, maximize=False,
                )  # fmt: skip

        return direct

    ps = [torch.nn.Parameter(r) for r in rows]
    for w, gr in zip(ps, grads):
        w.grad = gr
    groups = [{"params": [w], "lr": lr_k} for w, lr_k in zip(ps, lr.tolist())]
    flags = {"fused": True} if kernel == "torch_fused" else {"foreach": True}
    opt = torch.optim.AdamW(groups, betas=(HP.beta1, HP.beta2), eps=HP.eps, weight_decay=HP.weight_decay, **flags)
    return opt.step


def time_interleaved(steps: dict, rounds: int, target_s: float = 0.004) -> dict:
    """{name: [us per call, one per round]}: each round times every contestant once, in turn, over a batch of calls
    sized to ~target_s, so that noise from other processes falls on all of them alike."""
    inner = {}
    for name, fn in steps.items():
        for _ in range(3):
            fn()  # warm up: first-call set-up, OpenMP thread start, caches
        t = time.perf_counter()
        fn()
        inner[name] = max(1, min(2000, int(target_s / max(time.perf_counter() - t, 1e-7))))
    out = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            n = inner[name]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            out[name].append((time.perf_counter() - t) / n * 1e6)
    return out


def _busy_jiffies() -> tuple[float, float] | None:
    """(busy, total) CPU jiffies of the whole machine since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class OthersLoad:
    """Share of the machine's CPU time that other processes used between start() and stop(), in %: the noise
    indicator written with each case (this process's own CPU time is subtracted)."""

    def start(self):
        self.j0, self.own0, self.t0 = _busy_jiffies(), _own_cpu_s(), time.perf_counter()

    def stop(self) -> float:
        j1, own1 = _busy_jiffies(), _own_cpu_s()
        if self.j0 is None or j1 is None or j1[1] <= self.j0[1]:
            return float("nan")
        hz = os.sysconf("SC_CLK_TCK")
        wall_cpu = (j1[1] - self.j0[1]) / hz  # all cores' seconds
        others = (j1[0] - self.j0[0]) / hz - (own1 - self.own0)
        return round(max(0.0, others) / wall_cpu * 100, 1)


def wait_quiet(max_wait_s: float, threshold_pct: float = 15.0) -> float:
    """Wait (up to max_wait_s) for a 1-second window in which other processes use < threshold_pct of the CPUs;
    return the last window's %. The project's machines are shared: other sessions' runs take whole cores."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = OthersLoad()
        load.start()
        time.sleep(1.0)
        pct = load.stop()
        if not pct >= threshold_pct or time.monotonic() > deadline:
            return pct


def _conditions() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "isa": cpu._C.isa() if cpu.BACKEND == "cpp" else "",
        "torch": torch.__version__,
        "lrfast": lrfast.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


FIELDS = ["kernel", "params", "k", "us_median", "us_best", "gbps", "speedup_vs_torch_fused",
          "speedup_vs_fused_adamw_direct", "others_cpu_pct", "device", "cores", "threads", "isa", "torch", "lrfast",
          "commit", "date"]  # fmt: skip


def run(rounds: int, cases=CASES, max_wait_s: float = 0.0) -> list[dict]:
    cond = _conditions()
    rows = []
    for params, k in cases:
        steps = {name: make_step(name, params, k) for name in KERNELS}
        steps = {name: fn for name, fn in steps.items() if fn is not None}
        if max_wait_s > 0:
            print(f"waiting for a quiet machine: others at {wait_quiet(max_wait_s)} %", flush=True)
        load = OthersLoad()
        load.start()
        times = time_interleaved(steps, rounds)
        others = load.stop()
        best_fused, best_direct = min(times["torch_fused"]), min(times["torch_fused_adamw_direct"])
        for name, us in times.items():
            us = sorted(us)
            best, median = us[0], us[len(us) // 2]
            rows.append({
                "kernel": name, "params": params, "k": k, "us_median": round(median, 1), "us_best": round(best, 1),
                "gbps": round(BYTES_PER_PARAM * params * k / (best * 1e-6) / 1e9, 1),
                "speedup_vs_torch_fused": round(best_fused / best, 2),
                "speedup_vs_fused_adamw_direct": round(best_direct / best, 2), "others_cpu_pct": others, **cond,
            })  # fmt: skip
            print(f"{name:26s} params={params:>9,} k={k:>2}  median {median:9.1f} us  best {best:9.1f} us", flush=True)
        print(f"  (other processes used {others} % of the CPUs meanwhile)", flush=True)
    return rows


def write(rows: list[dict], out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    (out / "kernels.md").write_text(markdown(out / "kernels.csv"))


def markdown(csv_path: Path) -> str:
    """The markdown table, made from the CSV only."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    c = rows[0]
    lines = [
        "# AdamW step kernels, CPU",
        "",
        f"{c['device']}, {c['cores']} cores, {c['threads']} threads, lrfast._C isa {c['isa'] or 'n/a'}; "
        f"torch {c['torch']}, lrfast {c['lrfast']} @ {c['commit']}, {c['date']}. "
        "Generated by `python -m benchmarks.bench_kernels` from kernels.csv.",
        "",
        "One AdamW step over K candidates of `params` fp32 parameters, each at its own lr: us per step, median and "
        "best of interleaved rounds; GB/s = 28 B/param/candidate at the best time; speedups = that contestant's "
        "best / this best. `others %` = CPU share other processes took during the case (the machine is shared).",
        "",
        "| kernel | params | K | us median | us best | GB/s | speedup vs torch fused | vs `_fused_adamw_` direct "
        "| others % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {int(r['params']):,} | {r['k']} | {r['us_median']} | {r['us_best']} | {r['gbps']} "
            f"| {r['speedup_vs_torch_fused']} | {r['speedup_vs_fused_adamw_direct']} | {r['others_cpu_pct']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=41, help="interleaved rounds per case (default 41)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"folder for kernels.csv/.md (default {RESULTS})")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument(
        "--wait-quiet", type=float, default=120.0, metavar="S",
        help="before each case wait up to S s for other processes to use < 15 %% of the CPUs (0: don't wait)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    print(f"lrfast C++ backend: {cpu.BACKEND} ({cpu.WHY or 'built'}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    rows = run(args.rounds, max_wait_s=args.wait_quiet)
    if not args.no_write:
        write(rows, args.out)
        print(f"wrote {args.out / 'kernels.csv'} and kernels.md")
    return 0


# pytest-benchmark: `pytest benchmarks/bench_kernels.py --benchmark-enable`


if pytest is not None:

    @pytest.mark.parametrize("params, k", CASES, ids=[f"{p}x{k}" for p, k in CASES])
    @pytest.mark.parametrize("kernel", KERNELS)
    def test_bench_adamw_step(benchmark, kernel, params, k):
        fn = make_step(kernel, params, k)
        if fn is None:
            pytest.skip(f"lrfast._C not available: {cpu.WHY}")
        fn()
        benchmark(fn)


if __name__ == "__main__":
    sys.exit(main())
