"""AdamW step kernels: lrfast's (C++ on CPU, Triton on CUDA) against torch's fused, foreach and raw
`torch._fused_adamw_` steps and a copy of the same bytes, at 10k / 1M / 100M params (K = 1) and K = 16 candidates
of 100k params.

    python -m benchmarks.bench_kernels [--device cpu|cuda] [--quick]   # writes results/<device>/kernels.{csv,md,png}
    pytest benchmarks/ --benchmark-only   # the same steps under pytest-benchmark

Every contestant does the same work per call: one AdamW step (betas 0.9/0.999, eps 1e-8, weight decay 1e-2) over
K candidates of `params` fp32 parameters, each candidate at its own lr: 28 B/param moved (read p, g, m, v; write p,
m, v). torch.optim gets one param group per candidate (its way to give each its own lr); `torch._fused_adamw_` is
called once per candidate. `copy` is `dst.copy_(src)` of a 28 B/param buffer (memcpy on CPU, device-to-device on
CUDA), its GB/s counting read + write (56 B/param) as the kernels count theirs; `fraction_of_copy` = a kernel's
GB/s / the copy's. On CPU a copy into another buffer also pays read-for-ownership of its destination lines, which
an in-place update does not, so an optimizer step can pass 1.0 there. The
Triton kernel is imported only on CUDA (its CPU interpreter is far too slow to time). The CPU machines are shared
and noisy: contestants run interleaved, round after round, and we keep the median and the best round.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import report
from lrfast.kernels import cpu, reference
from lrfast.kernels.reference import AdamParams

BYTES_PER_PARAM = 28  # AdamW fp32: read p, g, m, v; write p, m, v
CASES = [(10_000, 1), (1_000_000, 1), (100_000_000, 1), (100_000, 16)]  # (params per candidate, K)
# on CUDA also the digits MLP's 203,530 params x 8 candidates, and the same padded to a multiple of 16 as the arena
# pads each row (Triton emits 128-bit vector loads only for rows whose length it can prove 16-aligned)
ALIGNMENT_CASES = [(203_530, 8), (203_536, 8)]
QUICK_CASES = [(10_000, 1), (1_000, 4)]
KERNELS = ["lrfast_cpp", "lrfast_triton", "lrfast_reference", "torch_fused", "torch_foreach",
           "torch_fused_adamw_direct", "copy"]  # fmt: skip
BIG = 10_000_000  # from here on: few rounds, and no lrfast_reference (the plain-torch spec, not a contender)
HP = AdamParams(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True)
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["kernel", "params", "k", "us_median", "us_best", "gbps", "copy_gbps", "fraction_of_copy",
           "speedup_vs_torch_fused", "speedup_vs_fused_adamw_direct", "rounds", "others_cpu_pct", "note", "isa",
           *report.CONDITIONS]  # fmt: skip


def why_not(kernel: str, params: int, device: str) -> str | None:
    """Why `kernel` has no row for this case on this device, or None."""
    cuda = device.startswith("cuda")
    if kernel == "lrfast_cpp":
        return "CPU kernel" if cuda else (None if cpu.BACKEND == "cpp" else f"lrfast._C: {cpu.WHY}")
    if kernel == "lrfast_triton":
        if not cuda:
            return "CUDA only (the Triton interpreter on CPU is far too slow to time)"
        from lrfast.kernels import triton_optim  # lazily: only on CUDA

        return None if triton_optim.AVAILABLE else f"lrfast.kernels.triton_optim: {triton_optim.WHY}"
    if kernel == "lrfast_reference" and params * 1 >= BIG:
        return "skipped at this size (the plain-torch spec)"
    return None


def make_step(kernel: str, params: int, k: int, device: str = "cpu", seed: int = 0):
    """A zero-argument callable doing one AdamW step of `kernel` over k candidates of `params` parameters."""
    gen = torch.Generator().manual_seed(seed)
    if kernel == "copy":
        src = torch.empty(BYTES_PER_PARAM * params * k, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    p = torch.randn(k, params, generator=gen).to(device)
    g = (torch.randn(k, params, generator=gen) * 1e-2).to(device)
    lr = torch.logspace(-4, -2, k, dtype=torch.float64) if k > 1 else torch.tensor([1e-3], dtype=torch.float64)
    step = 10  # a mid-run step: bias corrections != 1

    if kernel.startswith("lrfast"):
        m, v = torch.zeros_like(p), torch.zeros_like(p)
    if kernel == "lrfast_cpp":
        return lambda: cpu.adam_step(p, g, m, v, lr, step, HP)
    if kernel == "lrfast_reference":
        return lambda: reference.adam_step(p, g, m, v, lr if p.is_cpu else lr.cpu(), step, HP)
    if kernel == "lrfast_triton":
        from lrfast.kernels import triton_optim

        lr_dev, step_dev = lr.to(device, torch.float32), torch.tensor(step, dtype=torch.int64, device=device)
        return lambda: triton_optim.adam_step(p, g, m, v, lr_dev, step_dev, HP)  # as the CUDA-graph engine calls it

    rows, grads = list(p.unbind(0)), list(g.unbind(0))
    if kernel == "torch_fused_adamw_direct":
        ms, vs = [torch.zeros_like(r) for r in rows], [torch.zeros_like(r) for r in rows]
        steps = [torch.tensor(float(step), device=device) for _ in rows]
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


def time_interleaved(steps: dict, rounds: int, sync, target_s: float = 0.004) -> dict:
    """{name: [us per call, one per round]}: each round times every contestant once, in turn, over a batch of calls
    sized to ~target_s, so that noise from other processes falls on all of them alike."""
    inner = {}
    for name, fn in steps.items():
        for _ in range(3):
            fn()  # warm up: first-call set-up, Triton compile, OpenMP thread start, caches
        sync()
        t = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, min(2000, int(target_s / max(time.perf_counter() - t, 1e-7))))
    out = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            n = inner[name]
            sync()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
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
        self.j0, self.own0 = _busy_jiffies(), _own_cpu_s()

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


def run(rounds: int, cases=CASES, device: str = "cpu", max_wait_s: float = 0.0) -> list[dict]:
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cond = {**report.conditions(device), "isa": cpu._C.isa() if cpu.BACKEND == "cpp" and not cuda else ""}
    rows = []
    for params, k in cases:
        case_rounds = rounds if params * k < BIG else max(3, rounds // 10)
        skipped = {name: why for name in KERNELS if (why := why_not(name, params * k, device))}
        steps = {name: make_step(name, params, k, device) for name in KERNELS if name not in skipped}
        if max_wait_s > 0 and not cuda:
            print(f"waiting for a quiet machine: others at {wait_quiet(max_wait_s)} %", flush=True)
        load = OthersLoad()
        load.start()
        times = time_interleaved(steps, case_rounds, sync)
        others = load.stop()
        del steps
        best = {name: min(us) for name, us in times.items()}
        # the copy reads and writes its 28 B/param buffer: 56 B/param moved, counted as the kernels count theirs
        moved = {name: (2 if name == "copy" else 1) * BYTES_PER_PARAM * params * k for name in best}
        gbps = {name: moved[name] / (us * 1e-6) / 1e9 for name, us in best.items()}
        for name in KERNELS:
            if name in skipped:
                rows.append({"kernel": name, "params": params, "k": k, "note": skipped[name], **cond})
                continue
            us = sorted(times[name])
            rows.append({
                "kernel": name, "params": params, "k": k, "us_median": us[len(us) // 2], "us_best": us[0],
                "gbps": gbps[name], "copy_gbps": gbps["copy"], "fraction_of_copy": gbps[name] / gbps["copy"],
                "speedup_vs_torch_fused": best["torch_fused"] / us[0],
                "speedup_vs_fused_adamw_direct": best["torch_fused_adamw_direct"] / us[0], "rounds": case_rounds,
                "others_cpu_pct": others, "note": "", **cond,
            })  # fmt: skip
            print(f"{name:26s} params={params:>11,} k={k:>2}  median {us[len(us) // 2]:10.1f} us  best {us[0]:10.1f} "
                  f"us  {gbps[name]:7.1f} GB/s", flush=True)  # fmt: skip
        print(f"  (other processes used {others} % of the CPUs meanwhile)", flush=True)
    return rows


def render_markdown(csv_path: Path) -> str:
    """The markdown table, made from the CSV only."""
    rows = report.read_csv(csv_path)
    c, num = rows[0], report.num
    lines = [
        f"# AdamW step kernels, {c['device']}", "",
        f"{c['device']}, {c['cores']} cores, {c['threads']} threads, lrfast._C isa {c['isa'] or 'n/a'}; "
        f"torch {c['torch']}, triton {c['triton'] or '-'}, lrfast {c['lrfast']} @ {c['commit']}, {c['date']}. "
        "Generated by `python -m benchmarks.bench_kernels` from kernels.csv.", "",
        "One AdamW step over K candidates of `params` fp32 parameters, each at its own lr: µs per step, median and "
        "best of interleaved rounds; GB/s = 28 B/param/candidate at the best time; of copy = that GB/s / the GB/s "
        "of `copy_` of a 28 B/param buffer (read + write counted: 56 B/param; memcpy on CPU, device-to-device on "
        "CUDA; on CPU the copy also pays read-for-ownership of its destination, in-place updates do not); "
        "speedups = that contestant's best / this best. `others %` = CPU share other processes took during the "
        "case (the machine is shared).", "",
        "| kernel | params | K | µs median | µs best | GB/s | of copy | speedup vs torch fused "
        "| vs `_fused_adamw_` direct | rounds | others % | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {int(r['params']):,} | {r['k']} | {num(r['us_median'], '.1f')} | "
            f"{num(r['us_best'], '.1f')} | {num(r['gbps'], '.1f')} | {num(r['fraction_of_copy'], '.2f')} | "
            f"{num(r['speedup_vs_torch_fused'], '.2f')} | {num(r['speedup_vs_fused_adamw_direct'], '.2f')} | "
            f"{r['rounds']} | {r['others_cpu_pct']} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def render_png(csv_path: Path) -> None:
    """kernels.png from kernels.csv: GB/s vs params (K = 1) per kernel, the copy as the roof."""
    rows = [r for r in report.read_csv(csv_path) if r["k"] == "1" and r["gbps"]]
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in KERNELS:
        pts = sorted((int(r["params"]), float(r["gbps"])) for r in rows if r["kernel"] == name)
        if pts:
            copy = name == "copy"
            ax.plot(*zip(*pts), marker="o", ls="--" if copy else "-", label="copy_, read + write" if copy else name)
    ax.set(xscale="log", yscale="log", xlabel="params (K = 1)", ylabel="GB/s at 28 B/param")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    c = report.read_csv(csv_path)[0]
    ax.set_title(f"AdamW step, {c['device']}, {c['threads']} threads, torch {c['torch']}, {c['commit']}", fontsize=9)
    report.save_png(fig, csv_path.with_suffix(".png"))


def render(csv_path: Path) -> None:
    csv_path.with_suffix(".md").write_text(render_markdown(csv_path))
    render_png(csv_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rounds", type=int, default=41, help="interleaved rounds per case (default 41; a tenth, at "
                    "least 3, from 10M params on)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smoke run: 10k x 1 and 1k x 4 params, 3 rounds, "
                    "into a temp folder unless --out")  # fmt: skip
    ap.add_argument("--out", type=Path, help="folder for kernels.csv/.md/.png (default results/<device>)")
    ap.add_argument("--render", action="store_true", help="only re-render kernels.md/.png from the CSV")
    ap.add_argument("--wait-quiet", type=float, default=120.0, metavar="S", help="CPU: before each case wait up to "
                    "S s for other processes to use < 15 %% of the CPUs (0: don't wait)")  # fmt: skip
    args = ap.parse_args(None if argv is None else [str(a) for a in argv])
    quick_out = Path(tempfile.gettempdir()) / "lrfast-bench-kernels-quick"
    out = args.out or (quick_out if args.quick else RESULTS / args.device)
    if not args.render:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("--device cuda: torch.cuda.is_available() is False here; nothing run", file=sys.stderr)
            return 2
        print(f"lrfast C++ backend: {cpu.BACKEND} ({cpu.WHY or 'built'}); torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
        cases, rounds = (QUICK_CASES, 3) if args.quick else (CASES, args.rounds)
        if args.device == "cuda" and not args.quick:
            cases = cases + ALIGNMENT_CASES
        rows = run(rounds, cases, args.device, 0.0 if args.quick else args.wait_quiet)
        report.write_csv(rows, out / "kernels.csv", COLUMNS)
    render(out / "kernels.csv")
    print(f"wrote {out / 'kernels.csv'}, kernels.md and kernels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
