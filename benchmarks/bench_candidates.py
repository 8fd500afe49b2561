"""Time vs K: K candidate LRs in one lrfast pass against K sequential lrfast K = 1 runs, K sequential torch-lr-finder
runs and the compute floor, for K in 1, 2, 4, 8, 16, 32 (Adam, 100 steps unless the workload says fewer):
- mlp: digits MLP 64-256-256-10 (lrfast.data.mlp on digits()), batch 64;
- lenet: LeNet-5 on digits upscaled to 28x28 (lrfast.data.lenet5 on digits(28)), batch 64;
- cnn: a small BatchNorm CNN (benchmarks/workloads.bn_cnn, width 8) on CIFAR-shaped generated images, batch 64;
- chargpt_small: a 2-layer, 128-wide char GPT (context 64, batch 32; 20 steps on CPU, K <= 16: ~80 ms a step);
- lstm: a byte-level LSTM (width 128, context 32, batch 32), K <= 16;
- resnet18, chargpt (by name only: K = 32 of them takes minutes a step on 2 cores): see benchmarks/workloads.py;
- loader: the digits MLP fed by a map-style Dataset whose __getitem__ does deterministic per-sample CPU work (a few
  numpy blur passes per 8x8 image), calibrated at start to cost ~10x the K = 1 MLP step per batch of 64, as JPEG
  decoding + augmentation does for a small model.
lrfast runs strategy="grid" (K fixed LRs, geomspace 1e-4 -> 1e-2), early stop off, so every run does the same S steps;
torch-lr-finder runs its exp range test 1e-4 -> 1e-2 over S steps (compare.run_torch_lr_finder), early stop off. For
the digits MLP on CPU a fourth contestant, `handwritten`, trains the same K candidates on the same batches with that
one model written out by hand (explicit batched GEMMs, no vmap, no autograd, lrfast's C++ Adam): what this machine
gives K candidates of that model without lrfast's generality. ms/step is the wall-clock of the whole call(s) (set-up,
steps, restore) divided by S: for the sequential contestants the sum over the K runs. Every run gets a fresh model
with the same seed and a fresh seeded loader (compare.fresh). Within each K the contestants are interleaved round by
round, best of N (the 2-core machines swing up to 2x minute to minute: shared/PERF-NOTES.md). The floor is K x the
FLOPs of one forward + backward at the workload's batch (torch.utils.flop_counter) at the fp32 matmul rate measured in
this process (1024 x 1024 matmul); it ignores the loader and the optimizer step.

With --device cuda every model, lrfast run and torch-lr-finder run is on the GPU (lrfast with its CUDA defaults:
torch.compile and CUDA-graph capture inside each timed call) and the floor is the GPU's fp32 matmul rate.

Rows go to benchmarks/results/<device>/candidates.csv (one per workload and K; written after every workload), and
candidates.md / candidates.png are rendered from that CSV.

--early-stop: lrfast's default early stop (the smoothed loss above 4x its best) on both lrfast contestants and a
grid up to LR 1 (geomspace 1e-4 -> 1), so the high LRs stop within a few steps: each of the K sequential runs ends
at its stop, and the one pass leaves its stopped candidates out. No torch-lr-finder (its sweep is not a grid) and
no K = 1 row; rows go to candidates_early_stop.csv / .md / .png.

    python -m benchmarks.bench_candidates [--device cpu|cuda] [--workloads mlp,lenet,cnn,chargpt_small,lstm,loader]
        [--ks 1,2,4,8,16,32] [--steps 100] [--repeats 2] [--early-stop] [--quick] [--render-only] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

import lrfast
from benchmarks import report
from benchmarks import workloads as W
from benchmarks.contestants import Settings, for_workload, fresh, missing, run_torch_lr_finder
from lrfast.data import digits, mlp

OUT = Path(__file__).parent / "results" / "cpu"
KS = (1, 2, 4, 8, 16, 32)
# the default: ResNet-18 and the full char-GPT at K = 32 take minutes a step on 2 cores
WORKLOADS = ("mlp", "lenet", "cnn", "chargpt_small", "lstm", "loader")
CHOICES = (*WORKLOADS, "resnet18", "chargpt")
NAMES = {"mlp": "digits_mlp_64-256-256-10", "lenet": "digits28_lenet5", "loader": "loader_bound_digits_mlp",
         "cnn": "bn_cnn_8_cifar_like32", "chargpt": "chargpt_4x256_ctx128", "chargpt_small": "chargpt_2x128_ctx64",
         "lstm": "char_lstm_128_ctx32"}  # fmt: skip
MAX_K = {"chargpt_small": 16, "lstm": 16, "chargpt": 8, "resnet18": 8}  # on CPU: K = 32 of them is minutes a round
MIN_LR, MAX_LR, BATCH = 1e-4, 1e-2, 64
EARLY_STOP, EARLY_STOP_MAX_LR = 4.0, 1.0  # --early-stop: lrfast's default threshold, and a grid that reaches it
LOADER_FACTOR = 10.0  # the loader-bound workload's per-batch cost, in K = 1 MLP steps
# torch-lr-finder is skipped at a K whose estimated sequential time (from the previous K) passes this, per round
TLF_BUDGET_S = 90.0
CONTESTANTS = ("one_pass", "sequential", "torch_lr_finder", "handwritten")


class SlowDigits(Dataset):
    """digits with per-sample CPU work in __getitem__ (not a TensorDataset, so no batched fast path applies): `rounds`
    passes of a 5-point blur on the 8x8 image, the result mixed half and half with the image. Deterministic: sample i
    is always the same tensors."""

    def __init__(self, rounds: int):
        base = digits()
        self.x, self.y, self.rounds = base.tensors[0].numpy(), base.tensors[1], rounds

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        img = self.x[i].reshape(8, 8)
        a = img
        for _ in range(self.rounds):
            a = (np.roll(a, 1, 0) + np.roll(a, -1, 0) + np.roll(a, 1, 1) + np.roll(a, -1, 1) + 4 * a) / 8
        return torch.from_numpy((0.5 * img + 0.5 * a).reshape(-1).astype(np.float32)), self.y[i]


def loader_ms_per_batch(rounds: int, batches: int = 8) -> float:
    _, loader = fresh(SlowDigits(rounds), mlp, Settings(batch_size=BATCH))
    best = float("inf")
    for _ in range(3):  # digits holds 28 batches of 64: a fresh epoch each round
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        best = min(best, (time.perf_counter() - t0) / batches)
    return 1e3 * best


def calibrate_rounds(target_ms: float) -> tuple[int, float]:
    """Blur rounds whose batch of 64 costs about target_ms (the cost is linear in rounds plus a fixed collate part)."""
    base, per = loader_ms_per_batch(0), (loader_ms_per_batch(8) - loader_ms_per_batch(0)) / 8
    rounds = max(1, round((target_ms - base) / max(per, 1e-6)))
    return rounds, loader_ms_per_batch(rounds)


def dataset_and_model(workload: str, rounds: int = 0) -> tuple[Dataset, W.Workload]:
    """(dataset, workload) from benchmarks/workloads.py; `loader` is its digits MLP fed by SlowDigits(rounds)."""
    if workload == "loader":
        return SlowDigits(rounds), W.get("mlp")
    if workload not in CHOICES:
        raise ValueError(f"--workloads: unknown workload {workload!r}; choose from {', '.join(CHOICES)}")
    wl = W.get(workload)
    return wl.dataset(), wl


# ---------------------------------------------------------------------------------------------- contestants
# Each returns (wall seconds, loss curves [runs, steps] or None, info of the last lrfast run).


def lrfast_run(dataset, wl: W.Workload, lrs, steps, device="cpu", threshold=None):
    model, loader = fresh(dataset, wl.model, Settings(batch_size=wl.batch_size, device=device))
    gc.collect()
    t0 = time.perf_counter()
    res = lrfast.find(model, loader, optimizer=wl.optimizer, loss_fn=wl.loss, strategy="grid", lrs=list(lrs),
                      steps=steps, early_stop_threshold=threshold, progress=False)  # fmt: skip
    wall = time.perf_counter() - t0
    return wall, np.atleast_2d(np.asarray(res.losses, dtype=float)), {**res.info, "timings": res.timings}


def one_pass(dataset, wl: W.Workload, lrs, steps, device="cpu", threshold=None):
    return lrfast_run(dataset, wl, lrs, steps, device, threshold)


def sequential(dataset, wl: W.Workload, lrs, steps, device="cpu", threshold=None):
    total, curves, info = 0.0, [], {}
    for lr in lrs:
        t, c, info = lrfast_run(dataset, wl, [lr], steps, device, threshold)
        total += t
        curves.append(c[0])
    return total, np.stack(curves), info


def torch_lr_finder(dataset, wl: W.Workload, lrs, steps, device="cpu", threshold=None):
    s = for_workload(wl, Settings(min_lr=MIN_LR, max_lr=MAX_LR, early_stop=None, device=device), steps)
    total = 0.0
    for _ in lrs:
        model, loader = fresh(dataset, wl.model, s)
        gc.collect()
        t0 = time.perf_counter()
        run_torch_lr_finder(model, loader, s)
        total += time.perf_counter() - t0
    return total, None, {}


def handwritten(dataset, wl: W.Workload, lrs, steps, device="cpu", threshold=None):
    """The digits MLP's K-candidate grid written out by hand for this one model (mlp only, no early stop): the fresh
    model's weights copied K times into one [K, N] buffer, forward and backward as explicit batched GEMMs on the
    shared batch in the features x batch layout (the first layer one GEMM over the K weights stacked [K * 256, 64],
    the others bmm / baddbmm), grads written in place into a [K, N] buffer, cross-entropy's gradient written out,
    Adam by lrfast's fused C++ kernel over the whole buffer; no vmap, no autograd, no module calls, the S batches
    taken as lrfast takes them. What a person writing K candidates of this model by hand gets from this machine:
    lrfast's one pass against it is what lrfast's generality (any model, identity restore, auto choice) costs."""
    from lrfast.batches import take
    from lrfast.kernels import cpu as kernels

    model, loader = fresh(dataset, wl.model, Settings(batch_size=wl.batch_size, device=device))
    gc.collect()
    t0 = time.perf_counter()
    params = list(model.parameters())  # Linear 64->256, 256->256, 256->10: weight, bias each
    sizes = [p.numel() for p in params]
    k = len(lrs)
    p = torch.cat([q.detach().reshape(-1) for q in params]).repeat(k, 1)
    g, m, v = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    w1, b1, w2, b2, w3, b3 = (t.view(k, *q.shape) for t, q in zip(p.split(sizes, 1), params))
    gw1, gb1, gw2, gb2, gw3, gb3 = (t.view(k, *q.shape) for t, q in zip(g.split(sizes, 1), params))
    lr, hp = torch.tensor(np.asarray(lrs, dtype=np.float64)), kernels.AdamParams()
    losses = torch.empty(steps, k)
    for t, (x, y) in enumerate(take(loader, steps)):
        batch = x.shape[0]
        idx = y.view(1, 1, batch).expand(k, 1, batch)
        h1 = torch.addmm(b1.reshape(-1, 1), w1.reshape(-1, x.shape[1]), x.mT).view(k, -1, batch).relu_()
        h2 = torch.baddbmm(b2[:, :, None], w2, h1).relu_()
        z = torch.baddbmm(b3[:, :, None], w3, h2)  # [K, classes, batch]
        logp = torch.log_softmax(z, 1)
        picked = logp.gather(1, idx)
        losses[t] = -picked.mean((1, 2))
        d3 = logp.exp_().scatter_add_(1, idx, torch.full_like(picked, -1.0)).div_(batch)
        torch.bmm(d3, h2.mT, out=gw3)
        torch.sum(d3, 2, out=gb3)
        d2 = torch.bmm(w3.mT, d3).mul_(h2 > 0)
        torch.bmm(d2, h1.mT, out=gw2)
        torch.sum(d2, 2, out=gb2)
        d1 = torch.bmm(w2.mT, d2).mul_(h1 > 0)
        gw1.copy_(torch.mm(d1.view(-1, batch), x).view(gw1.shape))
        torch.sum(d1, 2, out=gb1)
        kernels.adam_step(p, g, m, v, lr, t + 1, hp)
    return time.perf_counter() - t0, losses.T.numpy().astype(float), {}


RUNNERS = {"one_pass": one_pass, "sequential": sequential, "torch_lr_finder": torch_lr_finder,
           "handwritten": handwritten}  # fmt: skip
HANDWRITTEN = ("mlp",)  # the workloads the handwritten contestant is written for (on CPU, without early stop)


# ---------------------------------------------------------------------------------------------- floor


def matmul_gflops(n: int = 1024, repeats: int = 10, device: str = "cpu") -> float:
    """The device's fp32 matmul rate, best of `repeats` n x n x n products."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def step_flops(dataset, wl: W.Workload) -> int:
    """FLOPs of one forward + backward (the workload's loss) at its batch, as torch's flop counter counts them
    (matmuls, convolutions, attention)."""
    torch.manual_seed(0)
    model = wl.model()
    x, y = (torch.stack(t) for t in zip(*(dataset[i] for i in range(wl.batch_size))))
    with FlopCounterMode(display=False) as counter:
        wl.loss(model(x), y).backward()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- driver


def bench_workload(workload: str, ks, steps: int, repeats: int, gflops: float, rounds: int, loader_ms: float,
                   k1_ms: float, device: str = "cpu", early_stop: bool = False):  # fmt: skip
    dataset, wl = dataset_and_model(workload, rounds)
    steps = min(steps, wl.steps)
    if device == "cpu":
        ks = [k for k in ks if k <= MAX_K.get(workload, max(ks))]
    flops = step_flops(dataset, wl)
    tlf_missing = "is left out with --early-stop" if early_stop else missing("torch_lr_finder")  # optional peer
    threshold, max_lr = (EARLY_STOP, EARLY_STOP_MAX_LR) if early_stop else (None, MAX_LR)
    contestants = [c for c in CONTESTANTS if not (c == "torch_lr_finder" and tlf_missing) and not (
        c == "handwritten" and (workload not in HANDWRITTEN or early_stop or device != "cpu"))]  # fmt: skip
    for name in contestants:  # warm-up: imports, vmap tracing caches, thread pools
        RUNNERS[name](dataset, wl, np.geomspace(MIN_LR, max_lr, 2), 5, device, threshold)
    rows, tlf_prev = [], None
    for k in ks:
        lrs = np.geomspace(MIN_LR, max_lr, k) if k > 1 else np.array([1e-3])
        skip_tlf = tlf_prev is not None and tlf_prev[1] * k / tlf_prev[0] > TLF_BUDGET_S
        names = [c for c in contestants if not (c == "torch_lr_finder" and skip_tlf)]
        best = {c: float("inf") for c in names}
        curves, info = {}, {}
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order round by round
                t, c, i = RUNNERS[name](dataset, wl, lrs, steps, device, threshold)
                best[name] = min(best[name], t)
                if c is not None:
                    curves[name] = c
                if name == "one_pass":
                    info = i
        if "torch_lr_finder" in best:
            tlf_prev = (k, best["torch_lr_finder"])
        # stopped steps are NaN on both sides (the runs stop at the same steps but where rounding differs)
        diff = np.abs(curves["one_pass"] - curves["sequential"]) / np.abs(curves["sequential"])
        rel, rel10 = float(np.nanmax(diff)), float(np.nanmax(diff[:, :10]))
        hand = curves.get("handwritten")  # its first steps: another grouping of the same sums, which high LRs amplify
        rel_hand = (float(np.max(np.abs(hand - curves["one_pass"])[:, :10] / curves["one_pass"][:, :10]))
                    if hand is not None else "")  # fmt: skip
        stopped = int(np.sum(np.isnan(curves["one_pass"][:, -1])))
        ms = {c: 1e3 * t / steps for c, t in best.items()}
        tlf = ms.get("torch_lr_finder", float("nan"))
        hw = ms.get("handwritten", float("nan"))
        note = (f"torch-lr-finder skipped: {tlf_prev[1] * k / tlf_prev[0]:.0f} s a round estimated from K = "
                f"{tlf_prev[0]}" if skip_tlf else "")  # fmt: skip
        note = f"torch-lr-finder {tlf_missing}" if tlf_missing else note
        row = {"workload": NAMES.get(workload, workload), "optimizer": wl.optimizer, "batch_size": wl.batch_size,
               "k": k, "steps": steps,
               "forward": info.get("forward", ""), "ms_per_step_one_pass": ms["one_pass"],
               "ms_per_step_sequential": ms["sequential"], "ms_per_step_sequential_torch_lr_finder": tlf,
               "ms_per_step_handwritten": hw, "one_pass_vs_handwritten": ms["one_pass"] / hw,
               "speedup_handwritten_vs_sequential": ms["sequential"] / hw,
               "ms_per_candidate_step_one_pass": ms["one_pass"] / k,
               "setup_ms_one_pass": 1e3 * info["timings"]["setup"],
               "speedup_vs_sequential": ms["sequential"] / ms["one_pass"], "speedup_vs_torch_lr_finder":
               tlf / ms["one_pass"], "floor_ms_per_step": 1e3 * k * flops / (gflops * 1e9),
               "one_pass_vs_floor": ms["one_pass"] / (1e3 * k * flops / (gflops * 1e9)), "flops_per_step_k1": flops,
               "matmul_gflops": gflops, "loader_ms_per_batch": loader_ms if workload == "loader" else "",
               "loader_rounds": rounds if workload == "loader" else "", "mlp_k1_steps_phase_ms_per_step": k1_ms,
               "max_rel_diff_curves": rel, "max_rel_diff_curves_10_steps": rel10,
               "max_rel_diff_handwritten_10_steps": rel_hand,
               "early_stop_threshold": threshold or "", "stopped_candidates": stopped,
               "repeats": repeats, "note": note, **report.conditions(device)}  # fmt: skip
        print(
            f"{workload} K={k}: one pass {ms['one_pass']:.2f} ms/step, sequential {ms['sequential']:.2f}, "
            f"torch-lr-finder {tlf:.2f}, floor {row['floor_ms_per_step']:.3f}",
            flush=True,
        )
        rows.append(row)
    return rows


def write_csv(out: Path, rows: list[dict], stem: str = "candidates") -> None:
    columns = list(dict.fromkeys(c for r in rows for c in r))  # merged rows of an older run may lack newer columns
    report.write_csv(rows, out / f"{stem}.csv", columns)


def _merged(kept: list[dict], new: dict[str, list[dict]]) -> list[dict]:
    """--merge: the kept rows with each re-run workload's rows in place of its old ones (new workloads last)."""
    out, done = [], set()
    for r in kept:
        if r["workload"] not in new:
            out.append(r)
        elif r["workload"] not in done:
            out += new[r["workload"]]
            done.add(r["workload"])
    return out + [r for w, rs in new.items() if w not in done for r in rs]


def read_csv(out: Path, stem: str = "candidates") -> list[dict]:
    return report.read_csv(out / f"{stem}.csv")


def _fmt(x: str) -> str:
    try:
        return f"{float(x):.3g}"
    except ValueError:
        return x or "-"


def _shapes(rows: list[dict]) -> str:
    """Steps and batch of each workload ("100 steps, batch 64" when they all share them)."""
    per = {r["workload"]: f"{r['steps']} steps, batch {r['batch_size']}" for r in rows}
    if len(set(per.values())) == 1:
        return next(iter(per.values()))
    return "; ".join(f"{w}: {v}" for w, v in per.items())


def _repeats(rows: list[dict]) -> str:
    """The rounds each workload's times are the best of: "2", or "5 (digits_mlp_64-256-256-10), 2 (the others)"
    where --merge re-ran some with another --repeats."""
    per = {r["workload"]: r["repeats"] for r in rows}
    counts = list(per.values())
    usual = max(dict.fromkeys(counts), key=counts.count)  # the most workloads' (a tie: the first seen)
    rest = {n: [w for w, m in per.items() if m == n] for n in dict.fromkeys(counts) if n != usual}
    if not rest:
        return usual
    return ", ".join([f"{n} ({', '.join(ws)})" for n, ws in rest.items()] + [f"{usual} (the others)"])


def write_md(out: Path, stem: str = "candidates") -> None:
    rows = read_csv(out, stem)
    cols = ["workload", "k", "forward", "ms_per_step_one_pass", "ms_per_step_sequential",
            "ms_per_step_sequential_torch_lr_finder", "ms_per_step_handwritten", "floor_ms_per_step",
            "speedup_vs_sequential", "speedup_vs_torch_lr_finder", "speedup_handwritten_vs_sequential",
            "one_pass_vs_handwritten", "one_pass_vs_floor", "max_rel_diff_curves_10_steps",
            "max_rel_diff_curves"]  # fmt: skip
    if not any(r.get("ms_per_step_handwritten") not in (None, "", "nan") for r in rows):
        cols = [c for c in cols if "handwritten" not in c]
    if rows[0].get("early_stop_threshold"):
        cols = [c for c in cols if "torch_lr_finder" not in c] + ["stopped_candidates"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = (r[c] if c in ("workload", "k", "forward") else _fmt(r.get(c, "")) for c in cols)
        lines.append("| " + " | ".join(cells) + " |")
    c = rows[0]
    notes = sorted({f"{r['workload']} K={r['k']}: {r['note']}" for r in rows if r.get("note")})
    if len(notes) == len(rows) and len({r["note"] for r in rows}) == 1:  # one note on every row: said once
        notes = [f"every row: {rows[0]['note']}"]
    loader = [r for r in rows if r.get("loader_ms_per_batch")]
    lines.append(f"\n{c['device']}, {c['cores']} cores, {c['threads']} threads, torch {c['torch']}, lrfast "
                 f"{c['lrfast']}, {report.provenance(rows)}; Adam; {_shapes(rows)}; wall-clock of whole "
                 f"calls, best of {_repeats(rows)}, contestants interleaved within each K. "
                 f"Floor: K x {{fwd+bwd FLOPs}} at {float(c['matmul_gflops']):.0f} GFLOP/s (1024^3 fp32 matmul, "
                 "same process).")  # fmt: skip
    lines.append("max_rel_diff_curves_10_steps, max_rel_diff_curves: the largest relative difference between a "
                 "candidate's loss in the one pass and in its own K = 1 run, over the K candidates and the first 10 "
                 "steps, and over all the steps: a different grouping of the same fp32 sums is a few ULPs a step, "
                 "which training at the highest LRs (1e-2: LeNet-5's and the BatchNorm CNN's curves turn chaotic) "
                 "amplifies step by step (tests/test_candidates.py holds grid candidates to 1e-5 of their K = 1 "
                 "runs over 25 steps).")
    if "ms_per_step_handwritten" in cols:
        lines.append("Handwritten (digits MLP only): K candidates of that one model written out by hand as batched "
                     "GEMMs, no vmap, no autograd, lrfast's C++ Adam (bench_candidates.handwritten); its curves equal "
                     "the one pass's over the first 10 steps to max_rel_diff_handwritten_10_steps in the CSV.")
    if loader:
        lines.append(
            f"Loader-bound: {float(loader[0]['loader_ms_per_batch']):.2f} ms per batch of 64 in "
            f"__getitem__ ({loader[0]['loader_rounds']} blur rounds per sample); the floor leaves it out."
        )
    lines += [f"- {n}" for n in notes]
    if rows[0].get("early_stop_threshold"):
        lines.append(f"Early stop at {rows[0]['early_stop_threshold']}x the best smoothed loss on both lrfast "
                     "contestants (lrfast's default), LRs 1e-4 -> 1: K sequential runs each end at their stop; "
                     "stopped_candidates: how many of the K stopped. max_rel_diff_curves includes the last steps of "
                     "the candidates that diverge, where the two sides' rounding differences grow without bound.")
    lines.append(f"\nGenerated from {stem}.csv by benchmarks/bench_candidates.py.")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def write_png(out: Path, stem: str = "candidates") -> None:
    plt = report.pyplot()
    rows = read_csv(out, stem)
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    series = {"ms_per_step_one_pass": "lrfast, K in one pass", "ms_per_step_sequential": "K x lrfast K=1",
              "ms_per_step_sequential_torch_lr_finder": "K x torch-lr-finder",
              "ms_per_step_handwritten": "K written out by hand",
              "floor_ms_per_step": "compute floor"}  # fmt: skip
    cols = min(3, len(workloads))
    rows_n = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(workloads):]:
        ax.set_visible(False)
    for ax, wl in zip(axes.flat, workloads):
        sub = [r for r in rows if r["workload"] == wl]
        for col, label in series.items():
            pts = [(int(r["k"]), float(r[col])) for r in sub if r.get(col) and np.isfinite(float(r[col]))]
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="--" if col == "floor_ms_per_step" else "-", label=label)
        ax.set(xscale="log", yscale="log", title=wl, xlabel="K (candidate LRs)", ylabel="ms per step")
        ax.set_xticks([int(r["k"]) for r in sub], [r["k"] for r in sub])
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    c = rows[0]
    fig.suptitle(f"Adam, steps and batch per workload in {stem}.md; {c['cores']} cores, torch {c['torch']}, "
                 f"{report.provenance(rows)}", fontsize=9)  # fmt: skip
    report.save_png(fig, out / f"{stem}.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--early-stop", action="store_true", help="lrfast's early stop on, LRs up to 1, no K = 1")
    ap.add_argument("--quick", action="store_true", help="smoke run: K 1,2, 5 steps, 1 repeat, into a temp folder")
    ap.add_argument("--render-only", action="store_true", help="re-render candidates.md/.png from the CSV")
    ap.add_argument("--merge", action="store_true", help="keep the CSV's rows of the workloads not run (each row "
                    "says its commit and date)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.ks, args.steps, args.repeats = "1,2", 5, 1
    out = args.out or (Path(tempfile.gettempdir()) / "lrfast-bench-candidates-quick" if args.quick
                       else OUT.parent / args.device)  # fmt: skip
    stem = "candidates_early_stop" if args.early_stop else "candidates"
    if not args.render_only:
        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("--device cuda: torch.cuda.is_available() is False here; nothing run")
        ks, dev = [int(k) for k in args.ks.split(",") if not (args.early_stop and k == "1")], args.device
        gflops = matmul_gflops(device=dev)
        # the K = 1 step as lrfast's steps phase times it (set-up left out), 50 steps, best of 3
        k1_ms = 1e3 * min(one_pass(digits(), W.get("mlp"), [1e-3], 50, dev)[2]["timings"]["steps"]
                          for _ in range(3)) / 50  # fmt: skip
        if args.quick:
            rounds, loader_ms = 4, loader_ms_per_batch(4)
        else:
            rounds, loader_ms = calibrate_rounds(LOADER_FACTOR * k1_ms)
        print(f"matmul {gflops:.0f} GFLOP/s; K=1 MLP step {k1_ms:.2f} ms; loader {rounds} rounds -> {loader_ms:.2f} "
              "ms/batch", flush=True)  # fmt: skip
        kept = read_csv(out, stem) if args.merge and (out / f"{stem}.csv").exists() else []
        rows, new = [], {}
        for wl in args.workloads.split(","):
            new[NAMES.get(wl, wl)] = bench_workload(
                wl, ks, args.steps, args.repeats, max(gflops, matmul_gflops(device=dev)), rounds, loader_ms, k1_ms,
                dev, args.early_stop,
            )
            rows = _merged(kept, new)
            write_csv(out, rows, stem)
    write_md(out, stem)
    write_png(out, stem)
    print(open(out / f"{stem}.md").read())


if __name__ == "__main__":
    main()
