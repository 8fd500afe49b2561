"""Per-layer cost of K candidates (issue 19, item 2: batched layers at the machine's rate). For the common layers at
the shapes of bench_candidates' workloads, forward + backward of K candidates three ways:

- loop: K plain calls (what forward="loop" runs, and what K separate runs compute);
- vmap: the forward vmapped over stacked parameters, then one autograd backward through the batched ops (what the
  eager batched call runs; CPU attention on its math kernel, as lrfast routes it);
- explicit: the batched form written out: on a shared input one wide GEMM / one convolution with K x out-channels,
  on per-candidate inputs bmm / one grouped convolution (groups=K), pooling and normalization with K folded into
  the batch or channel dim, attention with K folded into the batch (the fused kernel);

each against the compute floor (K x the layer's FLOPs at the 1024^3 fp32 matmul rate measured in the process).
Inputs that are activations (per candidate) get their grads too, as inside a network; a shared input (the data)
does not. The batched call keeps vmap's rules unless an explicit form beats them by more than this machine's noise.

Rows go to benchmarks/results/<device>/layers.csv, rendered to layers.md.

    python -m benchmarks.bench_layers [--device cpu|cuda] [--ks 4,16] [--repeats 20] [--quick] [--render DIR]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import vmap
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import report
from benchmarks.bench_candidates import matmul_gflops
from lrfast.engine.forward import _batchable

OUT = Path(__file__).parent / "results"
FORMS = ("loop", "vmap", "explicit")


@dataclass
class Case:
    """One layer: `f(params, x)` for one candidate; params stacked [K, ...] at `shapes`, the input x (`shared`: one
    tensor for every candidate, else [K, ...]); `batched(P, x)`: every candidate's output [K, ...] at once."""

    name: str
    workload: str
    shapes: list[tuple]  # one candidate's parameter shapes
    x: tuple  # one candidate's input shape
    shared: bool
    f: Callable
    batched: Callable


def cases(K: int) -> list[Case]:
    def wide_linear(P, x):
        w, b = P
        out = torch.addmm(b.reshape(-1), x, w.reshape(-1, w.shape[-1]).t())  # [B, K * out]
        return out.view(x.shape[0], K, -1).transpose(0, 1)

    def wide_conv(P, x):
        w, b = P
        out = F.conv2d(x, w.reshape(-1, *w.shape[2:]), b.reshape(-1), padding=2)  # [B, K * out, H, W]
        return out.view(x.shape[0], K, w.shape[1], *out.shape[2:]).transpose(0, 1)

    def grouped_conv(P, x):
        w, b = P
        xs = x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])  # [B, K * in, H, W]
        out = F.conv2d(xs, w.reshape(-1, *w.shape[2:]), b.reshape(-1), groups=K)
        return out.view(x.shape[1], K, w.shape[1], *out.shape[2:]).transpose(0, 1)

    def folded_bn(P, x):
        w, b = P
        xs = x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])  # [B, K * C, H, W]
        out = F.batch_norm(xs, None, None, w.reshape(-1), b.reshape(-1), training=True)
        return out.view(x.shape[1], K, -1, *x.shape[3:]).transpose(0, 1)

    def sdpa(P, x):
        return F.scaled_dot_product_attention(x[0], x[1], x[2], is_causal=True)

    return [
        Case("linear 64->256, shared input", "mlp", [(256, 64), (256,)], (64, 64), True,
             lambda P, x: F.linear(x, *P), wide_linear),
        Case("linear 256->256", "mlp", [(256, 256), (256,)], (64, 256), False,
             lambda P, x: F.linear(x, *P), lambda P, x: torch.baddbmm(P[1].unsqueeze(1), x, P[0].transpose(1, 2))),
        Case("linear 128->512", "chargpt_small", [(512, 128), (512,)], (2048, 128), False,
             lambda P, x: F.linear(x, *P), lambda P, x: torch.baddbmm(P[1].unsqueeze(1), x, P[0].transpose(1, 2))),
        Case("conv 1->6 5x5, shared input", "lenet", [(6, 1, 5, 5), (6,)], (64, 1, 28, 28), True,
             lambda P, x: F.conv2d(x, *P, padding=2), wide_conv),
        Case("conv 6->16 5x5", "lenet", [(16, 6, 5, 5), (16,)], (64, 6, 14, 14), False,
             lambda P, x: F.conv2d(x, *P), grouped_conv),
        Case("max-pool 2x2", "lenet", [], (64, 6, 28, 28), False,
             lambda P, x: F.max_pool2d(x, 2), lambda P, x: F.max_pool2d(x.flatten(0, 1), 2).unflatten(0, (K, -1))),
        Case("batch-norm 16 ch", "cnn", [(16,), (16,)], (64, 16, 8, 8), False,
             lambda P, x: F.batch_norm(x, None, None, *P, training=True), folded_bn),
        Case("layer-norm 128", "chargpt_small", [(128,), (128,)], (32, 64, 128), False,
             lambda P, x: F.layer_norm(x, (128,), *P),
             lambda P, x: F.layer_norm(x, (128,)) * P[0][:, None, None] + P[1][:, None, None]),
        Case("attention 4 heads, T 64", "chargpt_small", [], (3, 32, 4, 64, 32), False, sdpa,
             lambda P, x: F.scaled_dot_product_attention(*x.transpose(0, 1).flatten(1, 2), is_causal=True)
             .unflatten(0, (K, -1))),
    ]  # fmt: skip


def _inputs(case: Case, K: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    P = [torch.randn(K, *s, generator=g, device=device) * 0.1 for s in case.shapes]
    x = torch.randn(*(case.x if case.shared else (K, *case.x)), generator=g, device=device)
    with torch.no_grad():
        out = case.batched(P, x)
    return P, x, torch.randn(out.shape, generator=g, device=device)


def forms(case: Case, K: int, device: str) -> dict[str, Callable]:
    """Each form's forward + backward of the K candidates; each returns the grads [K, ...] of the parameters (and of
    a per-candidate input), the same for every form to rounding (tests/test_bench_smoke.py)."""
    P, x, gout = _inputs(case, K, device)
    leaves = [p.clone().requires_grad_() for p in P]
    xin = x if case.shared else x.clone().requires_grad_()
    wrt = leaves + ([] if case.shared else [xin])

    def loop():
        out = []
        for k in range(K):
            ps = [p[k].detach().requires_grad_() for p in P]
            xk = x if case.shared else x[k].detach().requires_grad_()
            out.append(torch.autograd.grad(case.f(ps, xk), ps + ([] if case.shared else [xk]), gout[k]))
        return [torch.stack(g) for g in zip(*out)]

    vf = vmap(case.f, in_dims=(0, None if case.shared else 0))

    def vmapped():
        with _batchable(torch.device(device)):  # as the engine runs it
            out = vf(leaves, xin)
        return list(torch.autograd.grad(out, wrt, gout))

    def explicit():
        return list(torch.autograd.grad(case.batched(leaves, xin), wrt, gout))

    return {"loop": loop, "vmap": vmapped, "explicit": explicit}


def flops(case: Case, device: str) -> int:
    """One candidate's forward + backward FLOPs (torch's flop counter: matmuls, convolutions, attention); `case`
    from cases(1)."""
    P, x, gout = _inputs(case, 1, device)
    ps = [p[0].clone().requires_grad_() for p in P]
    xk = x if case.shared else x[0].clone().requires_grad_()
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(case.f(ps, xk), ps + ([] if case.shared else [xk]), gout[0])
    return int(counter.get_total_flops())


def best_ms(fn: Callable, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def run(ks: list[int], repeats: int, device: str) -> list[dict]:
    gflops = matmul_gflops(device=device)
    single = {c.name: c for c in cases(1)}  # flops(): one candidate's layer
    rows = []
    for K in ks:
        for case in cases(K):
            fns = forms(case, K, device)
            ms = dict.fromkeys(FORMS, float("inf"))
            for _ in range(3):  # the forms interleaved, the best of each
                for name in FORMS:
                    ms[name] = min(ms[name], best_ms(fns[name], max(1, repeats // 3), device))
            floor = 1e3 * K * flops(single[case.name], device) / (gflops * 1e9)
            best = min(FORMS, key=ms.get)
            rows.append({"layer": case.name, "workload": case.workload, "k": K, "shared_input": case.shared,
                         **{f"ms_{n}": ms[n] for n in FORMS}, "floor_ms": floor or None, "fastest": best,
                         "vmap_vs_loop": ms["loop"] / ms["vmap"], "explicit_vs_vmap": ms["vmap"] / ms["explicit"],
                         "matmul_gflops": gflops, "repeats": repeats, **report.conditions(device)})  # fmt: skip
            print(f"K={K} {case.name}: " + ", ".join(f"{n} {ms[n]:.3f} ms" for n in FORMS) + f", floor {floor:.3f}",
                  flush=True)  # fmt: skip
    return rows


COLUMNS = ["layer", "workload", "k", "shared_input", "ms_loop", "ms_vmap", "ms_explicit", "floor_ms", "fastest",
           "vmap_vs_loop", "explicit_vs_vmap", "matmul_gflops", "repeats", *report.CONDITIONS]  # fmt: skip


def write_md(out: Path) -> None:
    rows = report.read_csv(out / "layers.csv")
    cols = ["layer", "k", "ms_loop", "ms_vmap", "ms_explicit", "floor_ms", "fastest", "vmap_vs_loop",
            "explicit_vs_vmap"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(r[c] if c in ("layer", "k", "fastest") else report.num(r[c], ".3g") or "-"
                                       for c in cols) + " |")  # fmt: skip
    c = rows[0]
    lines.append(f"\n{c['device']}, {c['cores']} cores, {c['threads']} threads, torch {c['torch']}, commit "
                 f"{c['commit']}, {c['date']}. Forward + backward of K candidates, ms, best of {c['repeats']} "
                 "(forms interleaved). vmap_vs_loop > 1: the batched call beats K plain calls; explicit_vs_vmap > 1: "
                 f"the written-out batched form beats vmap's rules. Floor: K x FLOPs at {float(c['matmul_gflops']):.0f}"
                 " GFLOP/s (1024^3 fp32 matmul, same process); none for layers without matmul FLOPs.")  # fmt: skip
    lines.append("\nGenerated from layers.csv by benchmarks/bench_layers.py.")
    (out / "layers.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--ks", default="4,16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smoke run: K = 2, one repeat")
    ap.add_argument("--render", type=Path, default=None, help="only re-render DIR/layers.md from DIR/layers.csv")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    refused = report.render_or_refuse(args, write_md)
    if refused is not None:
        return refused
    if args.quick:
        args.ks, args.repeats = "2", 1
    out = args.out or OUT / args.device
    rows = run([int(k) for k in args.ks.split(",")], args.repeats, args.device)
    report.write_csv(rows, out / "layers.csv", COLUMNS)
    write_md(out)
    print((out / "layers.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
