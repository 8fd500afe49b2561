"""The fused optimizer kernels (reference and C++) against torch.optim, candidate by candidate.

Tolerances, in ulp of the largest magnitude among the values compared and the grads (the operands: a rounding
difference is an ulp of what is combined, also where the result cancels towards 0):
- reference: torch.equal. It runs torch.optim's own single-tensor ops on each row with the same Python-float scalars.
- C++ 'avx2' / 'avx512' builds: 1 ulp. They copy the op order and the FMAs of ATen's AVX2/AVX-512 kernels (lerp's
  two branches included), but compute sqrt with the IEEE instruction where torch's sqrt calls MKL's vsSqrt on long
  rows (>~1000 elements), 1 ulp off in ~0.6 % of elements. Measured over this grid after 5 steps (2-core Xeon,
  AVX2): SGD (every variant) p and buf bitwise equal; Adam/AdamW p 1.0 ulp, m 0.25, v 0.25.
- C++ 'default' (x86-64 baseline, no FMA) build: 2 ulp. torch on an AVX2/AVX-512 CPU fuses multiply-adds that this
  build rounds twice; where the add cancels (buf = momentum*buf + g) that is an ulp of the operands. Measured: SGD
  buf 2.0 ulp, p 1.0; Adam p 1.0, m 0.75, v 0.75.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _helpers import assert_close_in_ulps, torch_threads

from lrfast.kernels import cpu, reference
from lrfast.kernels.reference import AdamParams, SGDParams

STEPS = 5
ULPS = {"avx512": 1, "avx2": 1, "default": 2}  # see the docstring

OPTIMIZERS = ["sgd", "sgd_momentum_dampening", "sgd_nesterov", "sgd_wd", "adam", "adam_wd", "adamw"]


def _isas() -> list[str]:
    if cpu.BACKEND != "cpp":
        return ["best"]
    return list(cpu._C.supported_isas())


BACKENDS = ["reference"] + [f"cpp-{isa}" for isa in _isas()]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The grid runs on one thread: when another process holds the second core, every 2-thread torch op (MKL's sqrt
    threads rows > ~1000) and kernel call waits milliseconds for it (measured: the K=16 x 4097 Adam cases 0.01 s ->
    1.1 s each, the file 3 s -> 16 s). test_threaded_split_equals_one_thread covers the kernels' 2-thread path."""
    with torch_threads(1):
        yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(name, sgd_step, adam_step): the reference, or the C++ kernels pinned to one instruction set."""
    name = request.param
    if name == "reference":
        yield name, reference.sgd_step, reference.adam_step
        return
    if cpu.BACKEND != "cpp":
        pytest.skip(f"C++ kernels not available: {cpu.WHY}")
    isa = name.split("-", 1)[1]
    before = cpu._C.isa()
    cpu._C.set_isa(isa)
    try:
        yield name, cpu.sgd_step, cpu.adam_step
    finally:
        cpu._C.set_isa(before)


def _hyper_params(opt: str, rng: torch.Generator):
    """Seeded random hyper-parameters for one optimizer variant."""

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=rng, dtype=torch.float64).item()

    if opt == "sgd":
        return SGDParams()
    if opt == "sgd_momentum_dampening":
        return SGDParams(momentum=u(0.5, 0.99), dampening=u(0.05, 0.5))
    if opt == "sgd_nesterov":
        return SGDParams(momentum=u(0.5, 0.99), nesterov=True)
    if opt == "sgd_wd":
        return SGDParams(momentum=u(0.5, 0.99), dampening=u(0.0, 0.3), weight_decay=u(1e-4, 0.1))
    # beta1 from 0.3: lerp weights 1 - beta1 >= 0.5 take ATen's other lerp formula
    beta1, beta2, eps = u(0.3, 0.99), u(0.9, 0.9999), 10 ** u(-10, -6)
    if opt == "adam":
        return AdamParams(beta1, beta2, eps)
    if opt == "adam_wd":
        return AdamParams(beta1, beta2, eps, weight_decay=u(1e-4, 0.1))
    return AdamParams(beta1, beta2, eps, weight_decay=u(1e-4, 0.1), decoupled=True)


def _torch_optim(param: torch.nn.Parameter, hp):
    if isinstance(hp, SGDParams):
        return torch.optim.SGD(
            [param], lr=1.0, momentum=hp.momentum, dampening=hp.dampening, nesterov=hp.nesterov,
            weight_decay=hp.weight_decay, foreach=False,
        )  # fmt: skip
    cls = torch.optim.AdamW if hp.decoupled else torch.optim.Adam
    return cls([param], lr=1.0, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay, foreach=False)


def _state(p, hp, nonzero: bool = False, gen=None):
    """[K, N] optimizer state for the kernels: {} / {buf} / {m, v}; zeros like torch.optim's unless nonzero."""

    def new():
        return torch.rand(p.shape, generator=gen) if nonzero else torch.zeros_like(p)

    if isinstance(hp, SGDParams):
        return {"buf": new()} if hp.momentum != 0 else {}
    return {"m": new(), "v": new()}


def _step(sgd_step, adam_step, p, g, state, lr, step, hp):
    if isinstance(hp, SGDParams):
        sgd_step(p, g, state.get("buf"), lr, step, hp)
    else:
        adam_step(p, g, state["m"], state["v"], lr, step, hp)


_TORCH_STATE = {"buf": "momentum_buffer", "m": "exp_avg", "v": "exp_avg_sq"}


@functools.lru_cache(maxsize=None)
def _case(opt: str, k: int, n: int):
    """Seeded inputs for one grid point and torch.optim's result on each row alone (computed once, shared by
    every backend): (hp, p0, grads, lrs, expected) with expected[key][row] for key in p / buf / m / v."""
    rng = torch.Generator().manual_seed(1000 * n + 10 * k + OPTIMIZERS.index(opt))
    hp = _hyper_params(opt, rng)
    p0 = torch.randn(k, n, generator=rng)
    grads = [torch.randn(k, n, generator=rng) for _ in range(STEPS)]
    # every candidate its own lr at every step, 1e-4 .. 1e-1 (log-uniform)
    lrs = [10 ** (-4 + 3 * torch.rand(k, generator=rng, dtype=torch.float64)) for _ in range(STEPS)]
    keys = ["p", *_state(p0, hp)]
    expected = {key: torch.empty(k, n) for key in keys}
    for row in range(k):
        w = torch.nn.Parameter(p0[row].clone())
        opt_row = _torch_optim(w, hp)
        for s in range(STEPS):
            w.grad = grads[s][row].clone()
            opt_row.param_groups[0]["lr"] = lrs[s][row].item()
            opt_row.step()
        expected["p"][row] = w.detach()
        for key in keys[1:]:
            expected[key][row] = opt_row.state[w][_TORCH_STATE[key]]
    return hp, p0, grads, lrs, expected


def _run_case(sgd_step, adam_step, opt, k, n):
    hp, p0, grads, lrs, expected = _case(opt, k, n)
    p = p0.clone()
    state = _state(p, hp)
    for s in range(STEPS):
        _step(sgd_step, adam_step, p, grads[s], state, lrs[s], s + 1, hp)
    return {"p": p, **state}, expected


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("k", [1, 3, 16])
@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
def test_kernels_match_torch_optim_per_candidate(backend, opt, k, n):
    name, sgd_step, adam_step = backend
    actual, expected = _run_case(sgd_step, adam_step, opt, k, n)
    for key in expected:
        if name == "reference":
            assert torch.equal(actual[key], expected[key]), f"{key} differs from torch.optim"
        else:
            grads = _case(opt, k, n)[2]
            assert_close_in_ulps(actual[key], expected[key], ULPS[name.split("-", 1)[1]], *grads)


def _not_called(*args, **kwargs):
    raise AssertionError("the C++ kernels sent these arguments to the reference")


def _columns(t: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """t's values as columns [left, left + N) of a wider [K, left + N + right] buffer (rows at its stride)."""
    k, n = t.shape
    wide = torch.full((k, left + n + right), 7.0)
    wide[:, left : left + n] = t
    return wide[:, left : left + n]


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("k, n", [(1, 7), (3, 1), (3, 1000), (16, 4097)])
def test_column_slices_of_wider_rows_update_as_contiguous_rows_do(backend, opt, k, n, monkeypatch):
    """One parameter's columns of the arena (p and the state at the arena's row stride) with its grad at another
    (autograd's, HostFused's lent grads): bitwise the contiguous call's result, the columns around left as they
    were; the C++ kernels take them as they are (no fall back to the reference)."""
    name, sgd_step, adam_step = backend
    if name != "reference":
        for fn in ("sgd_step", "adam_step"):
            monkeypatch.setattr(reference, fn, _not_called)
    hp, p0, grads, lrs, _ = _case(opt, k, n)
    p, state = p0.clone(), _state(p0, hp)
    wide_p = _columns(p0, 5, 3)
    wide_state = {key: _columns(t, 5, 3) for key, t in state.items()}
    for s in range(STEPS):
        _step(sgd_step, adam_step, p, grads[s], state, lrs[s], s + 1, hp)
        _step(sgd_step, adam_step, wide_p, _columns(grads[s], 2, 0), wide_state, lrs[s], s + 1, hp)
    for key, got in {"p": wide_p, **wide_state}.items():
        assert torch.equal(got, {"p": p, **state}[key]), key
        around = torch.cat([got._base[:, :5], got._base[:, 5 + n :]], dim=1)
        assert torch.equal(around, torch.full((k, 8), 7.0)), f"{key}: columns around the slice written"


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_frozen_candidates_are_left_bitwise_unchanged(backend, opt):
    _, sgd_step, adam_step = backend
    k, n = 16, 4097  # 8 live rows x 4097 = 32776 elements: the C++ kernels split them over threads
    gen = torch.Generator().manual_seed(7)
    hp = _hyper_params(opt, gen)
    p = torch.randn(k, n, generator=gen)
    state = _state(p, hp, nonzero=True, gen=gen)
    lr = torch.full((k,), 3e-2, dtype=torch.float64)
    lr[1::2] = 0.0
    before = {"p": p.clone(), **{key: t.clone() for key, t in state.items()}}
    for s in range(1, 4):
        _step(sgd_step, adam_step, p, torch.randn(k, n, generator=gen), state, lr, s, hp)
    after = {"p": p, **state}
    for key in after:
        assert torch.equal(after[key][1::2], before[key][1::2]), f"frozen rows of {key} changed"
        moved = (after[key][0::2] != before[key][0::2]).any(dim=1)
        assert moved.all(), f"live rows of {key} did not move"


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_kernels_leave_grad_unchanged(backend, opt):
    _, sgd_step, adam_step = backend
    gen = torch.Generator().manual_seed(3)
    hp = _hyper_params(opt, gen)
    p = torch.randn(3, 4097, generator=gen)
    state = _state(p, hp, nonzero=True, gen=gen)
    g = torch.randn(3, 4097, generator=gen)
    g0 = g.clone()
    lr = torch.tensor([1e-2, 0.0, 1e-1], dtype=torch.float64)
    for s in (1, 2):
        _step(sgd_step, adam_step, p, g, state, lr, s, hp)
    assert torch.equal(g, g0)


def test_adam_with_overflowing_second_moment_matches_reference(backend):
    """|g| = 1e30 makes (1 - beta2)*g*g = inf in fp32: v = inf, denom = inf, and torch.optim leaves p as it was
    (plus decay). The C++ kernel's division by the bias correction (reciprocal + one FMA correction) must keep
    that inf (without its guard it gave NaN)."""
    _, _, adam_step = backend
    g = torch.randn(2, 64, generator=torch.Generator().manual_seed(9))
    g[:, ::5] = 1e30
    hp = AdamParams(weight_decay=0.1, decoupled=True)
    lr = torch.tensor([1e-2, 3e-3], dtype=torch.float64)
    p, m, v = torch.ones(2, 64), torch.zeros(2, 64), torch.zeros(2, 64)
    ref = [p.clone(), m.clone(), v.clone()]
    for s in (1, 2):
        adam_step(p, g, m, v, lr, s, hp)
        reference.adam_step(ref[0], g, ref[1], ref[2], lr, s, hp)
    assert torch.isinf(v[:, ::5]).all() and torch.isfinite(p).all()
    for a, b in zip((p, m, v), ref):
        assert_close_in_ulps(a, b, ULPS["default"], g)
    assert torch.equal(p[:, ::5], ref[0][:, ::5])


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_first_moment_is_the_grad_exactly_at_beta1_0(backend, decoupled):
    """beta1 = 0: the lerp weight is 1, and torch's m.lerp_(g, 1) takes the branch g - (g - m)*0, so m is g
    bitwise (the other branch, m + 1*(g - m), is an ulp off for some m, g)."""
    _, _, adam_step = backend
    gen = torch.Generator().manual_seed(11)
    p, g, m, v = (torch.randn(3, 1025, generator=gen) for _ in range(4))
    v.abs_()
    hp = AdamParams(beta1=0.0, weight_decay=0.0 if not decoupled else 0.1, decoupled=decoupled)
    adam_step(p, g, m, v, torch.full((3,), 1e-2, dtype=torch.float64), 2, hp)
    assert torch.equal(m, g)


def test_cpu_runs_float64_through_the_reference_bitwise():
    gen = torch.Generator().manual_seed(5)
    hp = AdamParams(weight_decay=0.01, decoupled=True)
    p = torch.randn(3, 100, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 100, generator=gen, dtype=torch.float64)
    lr = torch.tensor([1e-3, 1e-2, 0.0], dtype=torch.float64)
    a = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    b = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    cpu.adam_step(a[0], g, a[1], a[2], lr, 1, hp)
    reference.adam_step(b[0], g, b[1], b[2], lr, 1, hp)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_empty_shapes_are_a_no_op(backend):
    _, sgd_step, adam_step = backend
    for k, n in ((0, 5), (3, 0)):
        p = torch.zeros(k, n)
        lr = torch.full((k,), 1e-2, dtype=torch.float64)
        adam_step(p, p.clone(), torch.zeros_like(p), torch.zeros_like(p), lr, 1, AdamParams())
        sgd_step(p, p.clone(), torch.zeros_like(p), lr, 1, SGDParams(momentum=0.9))


def _adam_args(k=3, n=10):
    return {
        "p": torch.zeros(k, n), "g": torch.zeros(k, n), "m": torch.zeros(k, n), "v": torch.zeros(k, n),
        "lr": torch.full((k,), 1e-3, dtype=torch.float64), "step": 1, "hp": AdamParams(),
    }  # fmt: skip


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"g": torch.zeros(3, 10, dtype=torch.float64)}, TypeError, r"^g must have p's dtype"),
        ({"m": torch.zeros(3, 11)}, ValueError, r"^m must have p's shape"),
        ({"v": torch.zeros(10, 3).t()}, ValueError, r"^v must have contiguous rows"),
        ({"p": torch.zeros(3, 10, dtype=torch.int32)}, TypeError, r"^p must be a floating tensor"),
        ({"p": torch.zeros(30)}, ValueError, r"^p must be 2-D"),
        ({"g": None}, TypeError, r"^g must be a torch.Tensor"),
        ({"lr": torch.full((3,), 1e-3)}, TypeError, r"^lr must be float64"),
        ({"lr": torch.full((4,), 1e-3, dtype=torch.float64)}, ValueError, r"^lr must have shape \[K\]"),
        ({"lr": 1e-3}, TypeError, r"^lr must be a float64 CPU tensor"),
        ({"step": 0}, ValueError, r"^step must be >= 1"),
        ({"step": 1.0}, TypeError, r"^step must be an int"),
        ({"hp": SGDParams()}, TypeError, r"^hp must be of type AdamParams"),
    ],
)
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_adam_step_rejects_bad_arguments_naming_them(impl, change, error, match):
    args = {**_adam_args(), **change}
    fn = cpu.adam_step if impl == "cpu" else reference.adam_step
    with pytest.raises(error, match=match):
        fn(**args)


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_sgd_step_rejects_bad_arguments_naming_them(impl):
    fn = cpu.sgd_step if impl == "cpu" else reference.sgd_step
    p, lr = torch.zeros(2, 5), torch.full((2,), 0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^buf must be a \[K, N\] momentum buffer"):
        fn(p, p.clone(), None, lr, 1, SGDParams(momentum=0.9))
    with pytest.raises(ValueError, match=r"^buf must have p's shape"):
        fn(p, p.clone(), torch.zeros(2, 4), lr, 1, SGDParams(momentum=0.9))
    with pytest.raises(TypeError, match=r"^g must have p's dtype"):
        fn(p, p.half(), None, lr, 1, SGDParams())
    with pytest.raises(ValueError, match=r"^step must be >= 1"):
        fn(p, p.clone(), None, lr, -1, SGDParams())


def test_hyper_parameters_are_checked_once_at_construction():
    with pytest.raises(ValueError, match="beta1"):
        AdamParams(beta1=1.0)
    with pytest.raises(ValueError, match="eps"):
        AdamParams(eps=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGDParams(momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        SGDParams(momentum=-0.1)


def test_backend_says_why_it_is_not_cpp():
    assert cpu.BACKEND in ("cpp", "reference")
    assert (cpu.WHY is None) == (cpu.BACKEND == "cpp")


@pytest.mark.parametrize("opt", ["sgd_nesterov", "adamw"])
@pytest.mark.parametrize("k, n", [(1, 1_200_007), (3, 600_001), (16, 160_009)])
def test_threaded_split_equals_one_thread(opt, k, n, monkeypatch):
    """The C++ kernels split the live rows' elements over threads (cut mid-row, frozen rows left out): with 2
    threads every element must be updated exactly once, i.e. bitwise as with 1 thread. The sizes give each of 2
    threads more than the 2^19 elements a thread needs (8 live rows x 160,009 = 1,280,072)."""
    if cpu.BACKEND != "cpp":
        pytest.skip(f"C++ kernels not available: {cpu.WHY}")
    gen = torch.Generator().manual_seed(11)
    hp = _hyper_params(opt, gen)
    p0 = torch.randn(k, n, generator=gen)
    state0 = _state(p0, hp, nonzero=True, gen=gen)
    g = torch.randn(k, n, generator=gen)
    lr = torch.full((k,), 1e-2, dtype=torch.float64)
    lr[1::2] = 0.0
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # passed to lrfast._C per call
        try:
            p, state = p0.clone(), {key: t.clone() for key, t in state0.items()}
            for s in (1, 2):
                _step(cpu.sgd_step, cpu.adam_step, p, g, state, lr, s, hp)
                assert cpu._C.last_threads() == threads
            results.append({"p": p, **state})
        finally:
            torch.set_num_threads(1)
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    assert not torch.equal(results[0]["p"][0], p0[0])
    if k > 1:  # the same split over a parameter's columns of wider rows (row strides other than N)
        for fn in ("sgd_step", "adam_step"):
            monkeypatch.setattr(reference, fn, _not_called)
        torch.set_num_threads(2)
        try:
            p, state = _columns(p0, 16, 0), {key: _columns(t, 16, 0) for key, t in state0.items()}
            for s in (1, 2):
                _step(cpu.sgd_step, cpu.adam_step, p, _columns(g, 3, 0), state, lr, s, hp)
                assert cpu._C.last_threads() == 2
        finally:
            torch.set_num_threads(1)
        for key, got in {"p": p, **state}.items():
            assert torch.equal(got, results[0][key]), key


@pytest.mark.parametrize("torch_threads", [1, 2, 3])
def test_cpu_kernel_threads_follow_torch_num_threads(torch_threads):
    """lrfast._C runs no thread pool of its own: a large step takes torch.get_num_threads() threads (each with at
    least 2^19 elements), a small one a single thread, so torch.set_num_threads(1) governs lrfast too."""
    if cpu.BACKEND != "cpp":
        pytest.skip(f"C++ kernels not available: {cpu.WHY}")
    hp = AdamParams(weight_decay=0.01, decoupled=True)
    for n, want in ((3 << 19, torch_threads), (1000, 1), (1 << 20, min(torch_threads, 2)), (300_000, 1)):
        p, g, m, v = torch.zeros(1, n), torch.ones(1, n), torch.zeros(1, n), torch.zeros(1, n)
        torch.set_num_threads(torch_threads)
        try:
            cpu.adam_step(p, g, m, v, torch.full((1,), 1e-3, dtype=torch.float64), 1, hp)
        finally:
            torch.set_num_threads(1)
        assert cpu._C.last_threads() == want == cpu._C.threads_for(n, torch_threads)
        one = [torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1, 1)]
        reference.adam_step(*one, torch.full((1,), 1e-3, dtype=torch.float64), 1, hp)
        assert torch.equal(p, one[0].expand(1, n))  # every element updated, once
