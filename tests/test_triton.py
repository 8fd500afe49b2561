"""The Triton K-candidate kernels (lrfast/kernels/triton_optim.py) against kernels/reference.py and torch.optim.

On CPU they run under the Triton interpreter (TRITON_INTERPRET=1, set here for the import only; fp32 and small
shapes, as it runs each program in numpy), on CUDA compiled.

Tolerance: ULPS ulp of the largest magnitude among the values compared and the grads (the operands: a rounding
difference is an ulp of what is combined, also where the result cancels towards 0). The kernels copy torch's ops and
ATen's FMAs one by one (tl.fma), so what is left is torch's sqrt, which calls MKL on long rows (1 ulp off in ~0.6 %
of elements), and, under Triton 3.6's interpreter, tl.fma emulated as a multiply then an add (two roundings; 3.9's
interpreter rounds once). Measured over these tests (3 steps, values ~N(0, 1)), worst case in ulp of the operands:
Triton 3.9 interpreted: Adam p 1.0, m 0.125, v 0.002, SGD p and buf 0 (bitwise); Triton 3.6 interpreted: Adam p 2.0,
m 0.5, v 1.0, SGD p 1.0, buf 1.0. Frozen candidates and the LR table / device step path are compared bitwise."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close_in_ulps, triton_kernels

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

from lrfast.kernels import reference as ref  # noqa: E402
from lrfast.kernels.reference import AdamParams, SGDParams  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


T = triton_kernels()
ULPS = 2  # 1 for torch's MKL sqrt + 1 for Triton 3.6's twice-rounded interpreted fma: see the docstring

ADAMS = {
    "adam": AdamParams(),
    "adam_wd": AdamParams(weight_decay=0.1),
    "adamw": AdamParams(weight_decay=0.01, decoupled=True),
    "adamw_betas": AdamParams(beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.1, decoupled=True),
    "adam_beta1_0": AdamParams(beta1=0.0),
}
SGDS = {
    "plain": SGDParams(),
    "wd": SGDParams(weight_decay=1e-2),
    "momentum": SGDParams(momentum=0.9),
    "dampening": SGDParams(momentum=0.5, dampening=0.3, weight_decay=1e-3),
    "nesterov": SGDParams(momentum=0.9, nesterov=True, weight_decay=1e-2),
}
SHAPES = [(1, 1), (1, 37), (3, 1), (3, 37), (3, 1025), (2, 2049)]  # odd sizes; one and several blocks per row


def _tensors(k, n, seed=0, count=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(k, n, generator=gen).to(DEVICE) for _ in range(count)]


def _lrs(k) -> torch.Tensor:
    return torch.tensor([1e-3, 3e-2, 0.5][:k] if k <= 3 else [1e-2] * k, dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(ADAMS))
def test_adam_kernel_equals_reference_over_steps(name, shape):
    hp = ADAMS[name]
    p, g, m, v = _tensors(*shape)
    m.zero_(), v.zero_()
    want = [t.cpu().clone() for t in (p, g, m, v)]
    lr = _lrs(shape[0])
    for step in (1, 2, 3):
        T.adam_step(p, g, m, v, lr.to(DEVICE), step, hp)
        ref.adam_step(*want, lr, step, hp)
    for got, exp in zip((p, m, v), (want[0], want[2], want[3])):
        assert_close_in_ulps(got.cpu(), exp, ULPS, want[1])
    assert torch.equal(g.cpu(), want[1])  # g is read only


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(SGDS))
def test_sgd_kernel_equals_reference_over_steps(name, shape):
    hp = SGDS[name]
    p, g, buf = _tensors(*shape, count=3)
    want = [t.cpu().clone() for t in (p, g, buf)]
    lr = _lrs(shape[0])
    with_buf = hp.momentum != 0
    for step in (1, 2, 3):
        T.sgd_step(p, g, buf if with_buf else None, lr.to(DEVICE), step, hp)
        ref.sgd_step(want[0], want[1], want[2] if with_buf else None, lr, step, hp)
    assert_close_in_ulps(p.cpu(), want[0], ULPS, want[1])
    if with_buf:
        assert_close_in_ulps(buf.cpu(), want[2], ULPS, want[1])


@pytest.mark.parametrize(
    "make, step_fn",
    [
        (lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.01, foreach=False), "adamw"),
        (lambda ps: torch.optim.Adam(ps, lr=3e-2, betas=(0.8, 0.99), weight_decay=0.1, foreach=False), "adam"),
        (lambda ps: torch.optim.SGD(ps, lr=3e-2, momentum=0.9, nesterov=True, weight_decay=0.1, foreach=False), "sgd"),
    ],
    ids=["adamw", "adam", "sgd_nesterov"],
)
def test_kernels_equal_torch_optim_row_by_row(make, step_fn):
    """Candidate k's row after 4 steps equals torch.optim run on that row alone (K = 3, N = 37)."""
    k, n = 3, 37
    p0, grads = _tensors(k, n, seed=1, count=1)[0].cpu(), [_tensors(k, n, seed=s, count=1)[0] for s in range(2, 6)]
    opts = [make([torch.nn.Parameter(p0[i].clone())]) for i in range(k)]
    p = p0.clone().to(DEVICE)
    state = [torch.zeros_like(p) for _ in range(2)]
    lr = torch.full((k,), 3e-2, dtype=torch.float64, device=DEVICE)
    for step, g in enumerate(grads, start=1):
        hp = _hp_of(opts[0])
        if step_fn == "sgd":
            T.sgd_step(p, g, state[0], lr, step, hp)
        else:
            T.adam_step(p, g, state[0], state[1], lr, step, hp)
        for i, opt in enumerate(opts):
            opt.param_groups[0]["params"][0].grad = g[i].cpu().clone()
            opt.step()
    want = torch.stack([opt.param_groups[0]["params"][0].detach() for opt in opts])
    assert_close_in_ulps(p.cpu(), want, ULPS, *[g.cpu() for g in grads])


def _hp_of(opt):
    group = opt.param_groups[0]
    if isinstance(opt, torch.optim.SGD):
        return SGDParams(group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"])
    beta1, beta2 = group["betas"]
    return AdamParams(beta1, beta2, group["eps"], group["weight_decay"], isinstance(opt, torch.optim.AdamW))


def test_adam_first_moment_is_the_grad_exactly_at_beta1_0():
    """torch's lerp(m, g, 1) is g - (g - m)*0 = g bitwise; m + 1*(g - m) was an ulp off (issue 13)."""
    p, g, m, v = _tensors(3, 1025, seed=4)
    v.abs_()
    T.adam_step(p, g, m, v, torch.full((3,), 1e-2, device=DEVICE), 2, AdamParams(beta1=0.0))
    assert torch.equal(m, g)


def test_frozen_candidate_is_bitwise_unchanged_by_lr_zero_and_by_mask():
    p, g, m, v = _tensors(3, 37)
    before = [t.clone() for t in (p, m, v)]
    lr = torch.tensor([0.0, 1e-2, 1e-2], device=DEVICE)
    mask = torch.tensor([True, True, False], device=DEVICE)
    T.adam_step(p, g, m, v, lr, 1, AdamParams(weight_decay=0.1, decoupled=True), mask=mask)
    for now, then in zip((p, m, v), before):
        assert torch.equal(now[0], then[0]) and torch.equal(now[2], then[2])
        assert not torch.equal(now[1], then[1])


def test_lr_table_and_device_step_counter_pick_the_row_of_the_step():
    """lr [S, K] with a device step tensor: step t uses row t - 1; equal to passing that row and the int step."""
    k, n, steps = 3, 37, 4
    table = torch.logspace(-3, -1, steps * k, dtype=torch.float64).reshape(steps, k).to(DEVICE)
    p, g, m, v = _tensors(k, n)
    m.zero_(), v.zero_()
    q, mq, vq = p.clone(), m.clone(), v.clone()
    counter = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    hp = AdamParams(weight_decay=0.01, decoupled=True)
    for t in range(1, steps + 1):
        counter += 1
        T.adam_step(p, g, m, v, table, counter, hp)
        T.adam_step(q, g, mq, vq, table[t - 1].contiguous(), t, hp)
    assert torch.equal(p, q) and torch.equal(m, mq) and torch.equal(v, vq)
    assert int(counter) == steps  # read, never written


def test_low_precision_copy_is_the_updated_fp32_master_rounded():
    p, g, m, v = _tensors(2, 37)
    m.zero_(), v.zero_()
    low = torch.zeros(2, 37, dtype=torch.bfloat16, device=DEVICE)
    T.adam_step(p, g.to(torch.bfloat16), m, v, torch.tensor([1e-2, 0.0], device=DEVICE), 1, AdamParams(), low=low)
    want = p[0].to(torch.bfloat16)
    if CUDA:
        assert torch.equal(low[0], want)
    else:  # the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest even: within one bf16 ulp
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()
        assert ((low[0].float() - want.float()).abs() <= ulp).all()
    assert torch.equal(low[1], torch.zeros(37, dtype=torch.bfloat16, device=DEVICE))  # frozen: not written


def test_bf16_grads_are_read_as_fp32():
    p, g, m, v = _tensors(2, 37)
    m.zero_(), v.zero_()
    want = [t.cpu().clone() for t in (p, m, v)]
    g16 = g.to(torch.bfloat16)
    lr = torch.tensor([1e-2, 3e-2], dtype=torch.float64)
    T.sgd_step(p, g16, m, lr.to(DEVICE), 1, SGDParams(momentum=0.9))
    ref.sgd_step(want[0], g16.float().cpu(), want[1], lr, 1, SGDParams(momentum=0.9))
    assert_close_in_ulps(p.cpu(), want[0], ULPS, g16.float().cpu())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(p=torch.zeros(2, 5, dtype=torch.float64)), "p must be an fp32"),
        (dict(m=torch.zeros(2, 4)), "m must have p's shape"),
        (dict(v=torch.zeros(5, 2).t()), "v must be contiguous"),
        (dict(g=torch.zeros(2, 5, dtype=torch.int32)), "g must be fp32, bf16 or fp16"),
        (dict(lr=torch.ones(3)), r"lr must be \[K\] = \[2\]"),
        (dict(step=0), "step must be an int >= 1"),
        (dict(step=torch.ones(1)), "step must be a Python int or a one-element int64"),
        (dict(lr=torch.ones(2, 2), step=3), "past the LR table's 2 rows"),
        (dict(mask=torch.ones(3)), r"mask must be \[K\] = \[2\]"),
        (dict(low=torch.zeros(2, 5)), "low must be bf16 or fp16"),
        (dict(hp=SGDParams()), "hp must be of type AdamParams"),
    ],
)
def test_bad_arguments_name_the_argument(change, match):
    args = dict(p=torch.zeros(2, 5), g=torch.zeros(2, 5), m=torch.zeros(2, 5), v=torch.zeros(2, 5),
                lr=torch.ones(2), step=1, hp=AdamParams())  # fmt: skip
    args.update(change)
    args = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    kw = {name: args.pop(name) for name in ("mask", "low") if name in args}
    with pytest.raises((TypeError, ValueError), match=match):
        T.adam_step(args["p"], args["g"], args["m"], args["v"], args["lr"], args["step"], args["hp"], **kw)


def test_sgd_with_momentum_needs_a_buffer():
    with pytest.raises(ValueError, match="buf must be a"):
        T.sgd_step(torch.zeros(1, 3), torch.zeros(1, 3), None, torch.ones(1), 1, SGDParams(momentum=0.9))


def test_lrfast_imports_and_runs_without_triton():
    """triton is optional at run time: with it unimportable, `import lrfast` and a CPU find work, and the Triton
    module says why it is off."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lrfast\n"
        "from lrfast.kernels import triton_optim as T\n"
        "assert not T.AVAILABLE and 'triton is not installed' in T.WHY, T.WHY\n"
        "m = torch.nn.Linear(4, 2); data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]\n"
        "res = lrfast.find(m, data, steps=5, progress=False)\n"
        "assert res.steps_run == 5 and lrfast.info()['gpu_kernels'] is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.skipif(not CUDA, reason="the compiled kernels exist with a CUDA device only")
def test_compiled_kernels_refuse_cpu_tensors_with_a_clear_message():
    with pytest.raises(ValueError, match="CUDA tensors only"):
        T.adam_step(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1), 1,
                    AdamParams())  # fmt: skip


def test_bias_correction_table_gives_the_int_steps_bitwise():
    """The engine passes Adam's bias corrections as one table [S, 2] made per run (issue 16: bookkeeping): read at
    the device counter's row, three steps equal the same steps with an int step; a row past the table is refused."""
    hp = AdamParams(weight_decay=0.01, decoupled=True)
    p, g, m, v = _tensors(2, 37)
    m.zero_(), v.zero_()
    q, mq, vq = p.clone(), m.clone(), v.clone()
    lr = torch.tensor([1e-2, 3e-2], device=DEVICE)
    table = T.bias_table(hp, 3, q.device)
    assert table.shape == (3, 2) and table[2, 0].item() == 1.0 - hp.beta1**3
    counter = torch.ones(1, dtype=torch.int64, device=DEVICE)
    for step in (1, 2, 3):
        T.adam_step(p, g, m, v, lr, step, hp)
        T.adam_step(q, g, mq, vq, lr, counter, hp, corrections=table)
        counter.add_(1)
    assert torch.equal(p, q) and torch.equal(m, mq) and torch.equal(v, vq)
    with pytest.raises(ValueError, match="past the bias-correction table"):
        T.adam_step(q, g, mq, vq, lr, 4, hp, corrections=table)


@pytest.mark.parametrize("threshold, like", [(4.0, None), (None, None), (4.0, "torch_lr_finder"), (4.0, "lightning")])
def test_the_fused_tracker_records_bitwise_as_its_torch_ops(threshold, like):
    """Tracker.record as one Triton kernel (issue 16: bookkeeping) equals the torch ops on the same losses, for an
    int step and the device counter: NaN, inf, a divergence by threshold, a candidate never stopping, K not a power
    of two."""
    from lrfast.engine.tracker import Tracker

    T = triton_kernels()
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    k, steps = 5, 7
    losses = torch.rand(steps, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    losses[2, 1], losses[4, 2], losses[3, 3] = math.nan, math.inf, 40.0
    losses = losses.to(torch.float32).to(dev)  # a float32 loss, as the forward gives: read as fp64
    for device_step in (False, True):
        want = Tracker(k, steps, 0.8, threshold, dev, fused=False, like=like)
        got = Tracker(k, steps, 0.8, threshold, dev, fused=True, like=like)
        assert got.kernels is T
        counter = torch.zeros(1, dtype=torch.int64, device=dev)
        for t in range(steps):
            step = counter if device_step else t
            want.record(step, losses[t])
            got.record(step, losses[t])
            counter.add_(1)
        for x, y in zip(want.tensors, got.tensors):
            assert torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0)), (x, y)
        assert want.alive.tolist() == [True, False, False, threshold is None, True]
