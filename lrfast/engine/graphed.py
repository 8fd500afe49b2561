"""The GPU engine: the whole training step of all K candidates (forward + backward, torch.compile-d when asked; the
fused Triton optimizer kernel reading each candidate's LR from the device LR table at the device step counter;
the losses into the device buffer [K, S]; the smoothed loss / best / alive mask; the step counter += 1) is captured
once in a CUDA graph and replayed S times. The host reads the alive mask every `check_every` steps with a
non-blocking copy into pinned memory and stops when every candidate has diverged; no host sync inside the loop.

Batches of all S steps are stacked on the device once; each step copies step t's into static input buffers (an
index_select at the device counter), so every replay trains on its own batch. Warm-up runs on a side stream before
capture (it compiles, and lets autograd and the allocator settle); the arena, buffers, tracker, counter and RNG are
reset afterwards, so warm-up steps do not change the result.

The same `run` serves without capture (graphs=False; CPU tensors too): then each step is called eagerly, with the
same device-side bookkeeping. `why_not_graphs` says when a run cannot be captured; a capture that fails falls back
to eager with the reason."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree

from lrfast.batches import stack, stack_difference
from lrfast.engine import runner
from lrfast.engine.arena import Arena
from lrfast.engine.tracker import Tracker
from lrfast.errors import is_oom
from lrfast.state import capture_rng, restore_rng

WARMUP = 3  # steps before capture: the first compiles, the others let autograd's streams and the allocator settle


class NotStatic(ValueError):
    """The step inputs do not all have one structure and one set of shapes: they cannot be replayed."""


class StaticInputs:
    """The U distinct step inputs stacked on the device, and one set of static buffers that `load(t)` fills with
    step t's input. `index` [S]: step t trains on items[index[t]]; [S, K]: candidate k on items[index[t, k]] (each
    candidate its own batch: the input is then a list of K items)."""

    def __init__(self, items: list, index: torch.Tensor):
        why = stack_difference(items)
        if why:
            raise NotStatic(why)
        self.stacked, self.spec = pytree.tree_flatten(stack(items))
        self.index = index
        rows = index[0].reshape(-1)
        self.buffers = [x.index_select(0, rows).reshape(self._shape(x)) if isinstance(x, torch.Tensor) else x
                        for x in self.stacked]  # fmt: skip
        if index.dim() == 2:  # one item per candidate, views of the [K, ...] buffers
            k = index.shape[1]
            self.item = [self._unflatten([b[j] if isinstance(b, torch.Tensor) else b for b in self.buffers])
                         for j in range(k)]  # fmt: skip
        else:
            self.item = self._unflatten(self.buffers)

    def _shape(self, stacked: torch.Tensor) -> tuple:
        return (*self.index.shape[1:], *stacked.shape[1:])

    def _unflatten(self, leaves: list):
        return pytree.tree_unflatten(leaves, self.spec)

    def load(self, t: torch.Tensor):
        """Copy step t's input (t: one-element int64 tensor on the device) into the static buffers; returns them."""
        rows = self.index.index_select(0, t.reshape(1)).reshape(-1)
        for x, b in zip(self.stacked, self.buffers):
            if isinstance(x, torch.Tensor):
                b.copy_(x.index_select(0, rows).reshape(b.shape))
        return self.item


def why_not_graphs(device: torch.device, arena: Arena) -> str:
    """'' when a fused-optimizer step can be captured in a CUDA graph, else why not (a torch.optim-only optimizer
    never gets here: it runs eagerly, api._why_eager)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run is on {device})"
    if arena.backend != "triton":
        return f"the fused optimizer is not the Triton kernel ({arena.why_not_triton})"
    return ""


def run(make_step: Callable[[bool], object], compile: bool, arena: Arena, static: StaticInputs,
        lr_table: torch.Tensor, tracker: Tracker, *, graphs: bool, buffers: Callable[[object], list], bar=None,
        check_every: int = 10, val=None, val_every: int = 1, scaler=None, sync=None, warmup: int = WARMUP,
        strict: bool = False) -> dict:  # fmt: skip
    """Run up to S steps (lr_table [S, K] on the device). `make_step(compile)` builds the step (forward + backward
    of every candidate, grads into the arena; see engine/forward.py); a compile that fails falls back to the
    eager step. `buffers(step)`: the step's mutable non-arena tensors (BatchNorm running stats), reset after
    warm-up.
    `sync` (distributed.Sync): grads and losses averaged over the ranks inside the step (NCCL inside the graph).
    `strict`: the replay loop runs under torch.cuda.set_sync_debug_mode("error"), so any host sync raises.
    Returns {"step": the step object, "steps_run", "timings": {compile (or warmup), capture, steps}, "notes": [...],
    "graphs": bool, "compiled": bool}."""
    device = arena.device
    cuda = device.type == "cuda"
    steps = lr_table.shape[0]
    counter = torch.zeros(1, dtype=torch.int64, device=device)  # 0-based index of the step about to run
    out = {"notes": [], "timings": {}, "graphs": False, "compiled": compile}

    def one_step(step) -> None:
        loss = step(static.load(counter))
        if sync is not None:
            loss = sync.average(arena, loss)
        tracker.record(counter, loss)
        counter.add_(1)  # now the 1-based number of this step: the kernels read the LR table's row counter - 1
        mask = tracker.alive
        if scaler is not None:  # fp16: a candidate with an inf/NaN grad skips this step, only it
            ok = scaler.unscale_(arena.segments)
            scaler.update(ok)
            mask = mask & ok
        arena.update(lr_table, counter, mask=mask)

    def state() -> list[torch.Tensor]:  # everything a step writes but the arena (reset from one row per segment)
        return [counter, *tracker.tensors, *buffers(step)] + ([] if scaler is None else scaler.tensors)

    def reset() -> None:
        for x, y in zip(state(), saved):
            x.copy_(y)
        arena.reset(rows)
        restore_rng(rng)

    step = make_step(compile)
    saved, rows, rng = [x.clone() for x in state()], arena.start_rows(), capture_rng()
    need_warmup = compile or graphs
    if need_warmup:
        t0 = time.perf_counter()
        try:
            _on_side_stream(cuda, lambda: one_step(step))  # compiles
            _sync(cuda)
        except Exception as e:  # noqa: BLE001 - any compile failure selects the eager step
            if not compile or is_oom(e):
                raise
            out["notes"].append(f"torch.compile failed, eager forward: {type(e).__name__}: {e}"[:300])
            out["compiled"] = False
            reset()
            step = make_step(False)
            _on_side_stream(cuda, lambda: one_step(step))
            _sync(cuda)
        out["timings"]["compile" if out["compiled"] else "warmup"] = time.perf_counter() - t0
    graph = None
    if graphs:
        t0 = time.perf_counter()
        graph, why = _capture(lambda: one_step(step), warmup - 1)
        if why:
            out["notes"].append(f"CUDA graph capture failed, eager steps: {why}")
        out["timings"]["capture"] = time.perf_counter() - t0
    if need_warmup:
        reset()
    out["graphs"] = graph is not None

    t0 = time.perf_counter()
    with _sync_errors() if strict and cuda else contextlib.nullcontext():
        steps_done = _loop(graph, lambda: one_step(step), step, steps, tracker, lr_table, bar, check_every, val,
                           val_every, sync)  # fmt: skip
    _sync(cuda)
    out["timings"]["steps"] = time.perf_counter() - t0
    out["steps_replayed"] = steps_done
    out["steps_run"] = int(tracker.steps_run.max())
    out["step"] = step
    return out


def _loop(graph, one_step, step, steps, tracker, lr_table, bar, check_every, val, val_every, sync) -> int:
    """Replay (or call) the step up to `steps` times; returns how many ran. No host sync unless a progress bar
    is shown (its postfix reads the best LR every 10 steps)."""
    pending = collections.deque()
    for i in range(steps):
        if graph is not None:
            graph.replay()
        else:
            one_step()
        runner.after_update(i, steps, step, tracker, lr_table, bar, val, val_every, sync)  # eager, between replays
        if (i + 1) % check_every == 0 and i + 1 < steps and _all_stopped(tracker.alive, pending):
            return i + 1
    return steps


def _capture(one_step: Callable[[], None], warmup: int):
    """Warm up on a side stream, then capture one step; returns (graph, '') or (None, why not)."""
    try:
        for _ in range(max(0, warmup)):
            _on_side_stream(True, one_step)
        torch.cuda.synchronize()
        with _sync_errors():  # a host sync inside the step (e.g. .item() in the model) cannot be captured
            _on_side_stream(True, one_step)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_step()
        torch.cuda.synchronize()
        return graph, ""
    except Exception as e:  # noqa: BLE001 - any capture failure selects eager steps
        if is_oom(e):
            raise
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {e}"[:300]


@contextlib.contextmanager
def _sync_errors():
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _on_side_stream(cuda: bool, fn: Callable[[], None]) -> None:
    if not cuda:
        fn()
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _all_stopped(alive: torch.Tensor, pending: collections.deque) -> bool:
    """Queue a non-blocking copy of alive.any() and read the copies that have landed (on CUDA: an event query, no
    wait; the host polls only when it is more than two checks ahead of the device). True when none is alive."""
    if alive.device.type != "cuda":
        return not bool(alive.any())
    flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
    flag.copy_(alive.any().reshape(1), non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    pending.append((event, flag))
    while pending and (len(pending) > 2 or pending[0][0].query()):
        event, flag = pending.popleft()
        while not event.query():  # poll rather than cudaEventSynchronize: the loop never calls a blocking API
            time.sleep(50e-6)
        if not bool(flag[0]):
            return True
    return False
