"""What lrfast.RangeTest costs a training loop: the same loop (forward, loss, backward, Adam step, zero_grad) with
and without the range test around it (the LR set on every group before each batch, the loss recorded, the stop
flag read), on the same model, weights and cached batches. Rounds alternate the two and restore the weights in
between, so both train the same steps; the LR stays tiny (1e-6 -> 1e-5) so nothing diverges.

    python -m benchmarks.bench_rangetest [--device cpu|cuda] [--workloads mlp,lenet] [--rounds 15] [--quick]

Writes results/<device>/rangetest.csv and .md: ms per step (median and best over rounds), the overhead in percent
of the best (the 2-core machines swing by 20 % round to round: shared/PERF-NOTES.md), and RangeTest's own cost per
step measured alone (its generator, the LR set on every group, record, the stop check; no model)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import report
from benchmarks import workloads as W

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["workload", "contestant", "steps_per_round", "rounds", "ms_per_step", "ms_best", "overhead_pct",
           "bookkeeping_us", "enter_exit_ms", *report.CONDITIONS]  # fmt: skip


def _loop(model, opt, batches, loss_fn, device, rt=None) -> None:
    source = rt.batches(batches) if rt is not None else batches
    for x, y in source:
        loss = loss_fn(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rt is not None:
            rt.record(loss)


def measure(name: str, device: str, rounds: int, steps: int, quick: bool) -> list[dict]:
    import lrfast

    w = W.get(name, device, quick)
    torch.manual_seed(0)
    model = w.model().to(device)
    data = w.dataset()
    loader = torch.utils.data.DataLoader(data, batch_size=w.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    batches = [(x.to(device), y.to(device)) for _, (x, y) in zip(range(steps), loader)]
    opt = W.OPTIMIZERS[w.optimizer](model.parameters(), lr=1e-6)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def plain() -> float:
        t0 = time.perf_counter()
        _loop(model, opt, batches, w.loss, device)
        sync()
        return time.perf_counter() - t0

    def with_range_test() -> float:
        """The steps' seconds inside the `with` block; entering and leaving it (saving and restoring the model and
        the optimizer, the result and its suggestion) are a cost per range test, measured apart."""
        t_enter = time.perf_counter()
        with lrfast.RangeTest(opt, min_lr=1e-6, max_lr=1e-5, steps=len(batches), early_stop_threshold=None,
                              restore=model) as rt:  # fmt: skip
            t0 = time.perf_counter()
            _loop(model, opt, batches, w.loss, device, rt)
            sync()
            steps = time.perf_counter() - t0
        fixed.append(time.perf_counter() - t_enter - steps)
        return steps

    fixed: list[float] = []

    times = {"loop": [], "loop + RangeTest": []}
    fns = {"loop": plain, "loop + RangeTest": with_range_test}
    for i in range(rounds + 1):
        order = list(fns) if i % 2 == 0 else list(fns)[::-1]
        for key in order:
            model.load_state_dict(saved)
            opt.state.clear()
            sync()
            seconds = fns[key]()
            if i:  # round 0 warms up (first-call set-up, allocator, caches)
                times[key].append(seconds / len(batches) * 1e3)
    cond = report.conditions(device)
    base, own = min(times["loop"]), bookkeeping_us(opt, device)
    rows = []
    for key, ms in times.items():
        med, best = statistics.median(ms), min(ms)
        rows.append({"workload": name, "contestant": key, "steps_per_round": len(batches), "rounds": rounds,
                     "ms_per_step": med, "ms_best": best, "overhead_pct": 100 * (best / base - 1),
                     "bookkeeping_us": own if key != "loop" else None,
                     "enter_exit_ms": 1e3 * min(fixed) if key != "loop" else None, **cond})  # fmt: skip
        print(f"{name:8s} {key:18s} {med:8.3f} ms/step (best {best:.3f})  {100 * (best / base - 1):+6.2f} %",
              flush=True)  # fmt: skip
    return rows


def bookkeeping_us(opt, device: str, steps: int = 2000) -> float:
    """RangeTest's own microseconds per step: its generator, the LR set on the optimizer's groups, record of a
    loss on `device` and the stop check, with no model (best of 3)."""
    import lrfast

    loss = torch.tensor(2.3, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(3):
        with lrfast.RangeTest(opt, steps=steps, min_lr=1e-6, max_lr=1e-5, early_stop_threshold=None) as rt:
            sync()
            t0 = time.perf_counter()
            for _ in rt.batches(range(steps)):
                rt.record(loss)
            sync()
            best = min(best, (time.perf_counter() - t0) / steps * 1e6)
    return best


def render(csv_path: Path) -> str:
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    lines = [f"RangeTest around a training loop vs the same loop, {first['device']}, {first['threads']} threads, "
             f"torch {first['torch']}, commit {first['commit']}, {first['date']}: median ms per step over "
             f"{first['rounds']} alternating rounds of {first['steps_per_round']} steps; overhead of the best; "
             "RangeTest's own cost per step measured alone (no model); entering and leaving the `with` block (save, "
             "restore, result, suggestion) once per range test.", "",
             "| workload | contestant | ms/step (median) | best | overhead | RangeTest alone | enter + exit |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        own = f"{float(r['bookkeeping_us']):.1f} us" if r["bookkeeping_us"] else ""
        fixed = f"{float(r['enter_exit_ms']):.1f} ms" if r["enter_exit_ms"] else ""
        lines.append(f"| {r['workload']} | {r['contestant']} | {float(r['ms_per_step']):.3f} | "
                     f"{float(r['ms_best']):.3f} | {float(r['overhead_pct']):+.2f} % | {own} | {fixed} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    csv_path.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--workloads", default="mlp,lenet")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=100, help="steps per round (default 100)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds of 10 steps, into a temp folder")
    ap.add_argument("--out", type=Path, help="folder for rangetest.csv/.md (default results/<device>)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; nothing run", file=sys.stderr)
        return 2
    rounds, steps = (3, 10) if args.quick else (args.rounds, args.steps)
    out = args.out or (Path(tempfile.gettempdir()) / "lrfast-bench-rangetest" if args.quick else
                       RESULTS / args.device)  # fmt: skip
    rows = [r for name in args.workloads.split(",") for r in measure(name, args.device, rounds, steps, args.quick)]
    report.write_csv(rows, out / "rangetest.csv", COLUMNS)
    print(render(out / "rangetest.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
