"""The arena's layout: flat [K, N] rows per (param group, dtype), padded to a multiple of ROW_ALIGN elements so that
every row starts aligned for vector loads; the parameters' views cover the first elements and the padding stays
zero through every kernel."""

import pytest
import torch
from _helpers import make_batches, make_mlp

from lrfast import optimizers
from lrfast.engine import update
from lrfast.engine.arena import ROW_ALIGN, Arena


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adam"])
def test_rows_are_padded_to_the_alignment_and_the_padding_stays_zero(optimizer):
    model = make_mlp()  # 8*16 + 16 + 16*3 + 3 = 195 parameters: not a multiple of 16
    plan = optimizers.resolve(optimizer, model)
    arena = Arena(plan, 3, torch.device("cpu"))
    (seg,) = arena.segments
    used = sum(p.numel() for p in seg.params)
    assert used == 195 and seg.p.shape == (3, 208) and seg.p.shape[1] % ROW_ALIGN == 0
    assert seg.p.stride(0) * seg.p.element_size() % 64 == 0  # every candidate's row starts on 64 bytes
    for view, p in zip(seg.views(seg.p, 1), seg.params):
        assert view.shape == p.shape and torch.equal(view, p.detach())
    lr_table = torch.full((4, 3), 0.1, dtype=torch.float64)
    updater = update.make(plan, arena)
    for step in range(1, 5):
        seg.g.normal_()
        seg.g[:, used:] = 0  # as autograd leaves it: no parameter views the padding
        updater(lr_table, step, None)
    assert not torch.equal(seg.p[:, :used], seg.p[:, :used].new_zeros(3, used))
    assert torch.count_nonzero(seg.p[:, used:]) == 0
    assert all(torch.count_nonzero(t[:, used:]) == 0 for t in seg.state.values())


def test_a_k1_run_on_a_padded_arena_equals_a_plain_loop_bitwise():
    import lrfast

    model, data = make_mlp(), make_batches(n=4)
    plain = make_mlp()
    res = lrfast.find(model, data, optimizer="sgd", min_lr=1e-3, max_lr=1e-1, steps=4, progress=False,
                      early_stop_threshold=None)  # fmt: skip
    opt = torch.optim.SGD(plain.parameters(), lr=1.0, foreach=False)
    losses = []
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(plain(x), y)
        loss.backward()
        opt.param_groups[0]["lr"] = float(res.lrs[0, t])
        opt.step()
        losses.append(loss.item())
    assert res.losses[0].tolist() == losses


@pytest.mark.parametrize("threads, handed", [(2, [False, False, True, False, False, False]),
                                             (8, [False] * 6)])  # fmt: skip
def test_the_update_is_handed_only_grads_whose_own_call_keeps_the_segments_threads(threads, handed):
    """HostFused reads a parameter's grads where autograd left them only where its kernel call runs on as many
    threads as the whole segment's (2^19 elements a thread): at K = 32 the digits MLP's 2.7M elements split over 5
    of 8 threads, its 256 x 256 weight's 2.1M over 4, so on 8 threads nothing is handed and the one call keeps them
    all; on 2 the large weight's call uses both, the first layer's 0.5M would use one: not handed."""
    from _helpers import torch_threads

    from lrfast.kernels import cpu

    if cpu.BACKEND != "cpp":
        pytest.skip(f"the C++ kernels' thread split: {cpu.WHY}")
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))  # fmt: skip
    arena = Arena(optimizers.resolve("adam", model), 32, torch.device("cpu"))
    with torch_threads(threads):
        updater = update.HostFused(arena)
    assert (updater.direct or [False] * 6) == handed
