"""The one training step of a range test, and the two ways it is driven.

`Step` holds everything a step touches (the forward, the arena, the updater, the tracker, the fp16 scaler, the
ranks' sync, the LR table, the validation batches, the progress bar) and its body is written once:

    forward + backward of every candidate -> (mean over the ranks) -> record the losses -> (fp16: unscale, skip a
    candidate whose grads overflowed) -> update every live candidate at this step's LR

- `drive_eager`: the body called S times, step t an int. CPU, and whatever cannot be captured.
- `drive_graph`: the step counter and the inputs live on the device (StaticInputs, read at the counter), so
  nothing on the host changes between steps: warm-up (torch.compile's first call; a compile that fails falls back
  to the eager forward), reset of everything the warm-up wrote, capture in a CUDA graph when asked, replay S times.
  Without capture (graphs=False, or CPU tensors with compile=True) the same body is called eagerly on the device
  counter.
Both read the alive mask on the host only every `check_every` steps (on CUDA with a non-blocking copy, polled), and
stop when every candidate has stopped."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from lrfast.batches import stack, stack_difference
from lrfast.engine.arena import Arena
from lrfast.engine.tracker import Tracker
from lrfast.errors import first_line, is_oom
from lrfast.state import capture_rng, restore_rng

WARMUP = 3  # steps before capture: the first compiles, the others let autograd's streams and the allocator settle


@dataclass
class Step:
    forward: Any  # engine/forward.py: ModuleStep | BatchedStep | Accumulate; item -> losses [K]
    arena: Arena
    update: Callable  # engine/update.py: (lr_table, number, mask) -> None
    tracker: Tracker
    lr_table: torch.Tensor  # [S, K] float64 on the device
    scaler: Any = None  # engine/amp.Scaler for fp16
    sync: Any = None  # distributed.Sync (ddp): grads and losses averaged over the ranks
    val: list | None = None  # cached validation batches, scored after every `val_every`-th update and the last
    val_every: int = 1
    bar: Any = None
    check_every: int = 1
    begun: int = 0  # steps begun (warm-up included): an out-of-memory error at 1 or less may be retried smaller

    @property
    def steps(self) -> int:
        return self.lr_table.shape[0]

    def __call__(self, item, t) -> None:
        """Step t (0-based: an int, or the one-element device counter, which this advances by one)."""
        self.begun += 1
        loss = self.forward(item)
        if self.sync is not None:
            loss = self.sync.average(self.arena, loss)
        self.tracker.record(t, loss)
        number = t + 1 if isinstance(t, int) else t.add_(1)  # 1-based: the kernels read LR table row number - 1
        mask = self.tracker.alive
        if self.scaler is not None:  # fp16: a candidate with an inf/NaN grad skips this step, only it
            ok = self.scaler.unscale_(self.arena.segments)
            self.scaler.update(ok)
            mask = mask & ok
        self.update(self.lr_table, number, mask, self.forward.grads)

    def after(self, t: int) -> None:
        """Between step t and the next: score the validation batches (every `val_every`-th step and the last;
        averaged over the ranks with `sync`), and move the progress bar (its postfix reads the best LR on the host
        every 10 steps, only while a bar is shown)."""
        tracker, steps = self.tracker, self.steps
        if self.val is not None and ((t + 1) % self.val_every == 0 or t + 1 == steps):
            scores = self.forward.evaluate(self.val)
            if self.sync is not None:
                scores = self.sync.mean_(scores, "averaging the validation losses over the ranks")
            tracker.val[:, t] = torch.where(tracker.alive, scores.to(torch.float64), tracker._nan)
        if self.bar is not None:
            self.bar.update(1)
            if t % 10 == 9 and not self.bar.disable:
                k = int(torch.argmin(tracker.best))
                lr = float(self.lr_table[int(tracker.best_step[k]), k])
                self.bar.set_postfix_str(f"best loss at lr {lr:.2e}")


@dataclass
class Outcome:
    """What a driver reports: steps run (and replayed), whether compile and capture held, timings and notes."""

    steps_run: int
    steps_replayed: int
    compiled: bool
    graphs: bool
    timings: dict = field(default_factory=dict)  # compile (or warmup), capture, steps: seconds
    notes: list = field(default_factory=list)


def drive_eager(step: Step, inputs: list) -> Outcome:
    """Run up to S steps, inputs[t] at step t, until every candidate has stopped."""
    pending: collections.deque = collections.deque()
    t0 = time.perf_counter()
    for t in range(step.steps):
        step(inputs[t], t)
        if ((t + 1) % step.check_every == 0 or t + 1 == step.steps) and _all_stopped(step.tracker.alive, pending):
            if step.bar is not None:
                step.bar.update(1)
            break
        step.after(t)
    _sync(step.arena.device.type == "cuda")
    return Outcome(int(step.tracker.steps_run.max()), t + 1, False, False, {"steps": time.perf_counter() - t0})


class NotStatic(ValueError):
    """The step inputs do not all have one structure and one set of shapes: they cannot be replayed."""


class StaticInputs:
    """The U distinct step inputs stacked, and one set of static buffers on the device that step t's input is copied
    into. `index` [S]: step t trains on items[index[t]]; [S, K]: candidate k on items[index[t, k]] (each candidate
    its own batch: the input is then a list of K items).

    On the device (cache="device"), `load(t)` copies at the device counter t, inside the captured step. In host
    memory (`host`, cache="host": pinned on CUDA), `fill(t)` copies step t's rows in before the step runs, outside
    any captured graph (non-blocking from pinned memory, ordered on the step's stream), so the device holds the
    static buffers alone."""

    def __init__(self, items: list, index: torch.Tensor, host: bool = False):
        why = stack_difference(items)
        if why:
            raise NotStatic(why)
        self.stacked, self.spec = pytree.tree_flatten(stack(items))
        self.index, self.host = index, host
        rows = index[0].reshape(-1)
        device = index.device
        if host:
            self.stacked = [x.pin_memory() if isinstance(x, torch.Tensor) and device.type == "cuda" else x
                            for x in self.stacked]  # fmt: skip
            self.rows = index.cpu()
        self.buffers = [x.index_select(0, rows.to(x.device)).reshape(self._shape(x)).to(device)
                        if isinstance(x, torch.Tensor) else x for x in self.stacked]  # fmt: skip
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

    def fill(self, t: int) -> None:
        """host: copy step t's input (an int) from host memory into the static buffers (before step t runs)."""
        rows = self.rows[t]
        for x, b in zip(self.stacked, self.buffers):
            if isinstance(x, torch.Tensor):
                src = x[int(rows)] if rows.dim() == 0 else x.index_select(0, rows)  # [S]: a view of pinned memory
                if src.device.type == "cpu" and b.device.type == "cuda" and not src.is_pinned():
                    src = src.pin_memory()
                b.copy_(src.reshape(b.shape), non_blocking=True)

    def load(self, t: torch.Tensor):
        """Copy step t's input (t: one-element int64 tensor on the device) into the static buffers; returns them.
        host: the buffers as fill() left them."""
        if self.host:
            return self.item
        rows = self.index.index_select(0, t.reshape(1)).reshape(-1)
        for x, b in zip(self.stacked, self.buffers):
            if isinstance(x, torch.Tensor):
                b.copy_(x.index_select(0, rows).reshape(b.shape))
        return self.item


def drive_graph(step: Step, static: StaticInputs, make_forward: Callable[[bool], Any], *, compile: bool,
                graphs: bool, buffers: Callable[[], list], warmup: int = WARMUP, strict: bool = False) -> Outcome:
    """Run up to S steps on the device counter. `make_forward(compiled)` builds the forward (a compile that fails
    falls back to the eager one); `buffers()`: the forward's mutable non-arena tensors (BatchNorm running stats),
    reset after warm-up with everything else the warm-up wrote. `strict`: the replay loop runs under
    torch.cuda.set_sync_debug_mode("error"), so any host sync raises."""
    arena, tracker, cuda = step.arena, step.tracker, step.arena.device.type == "cuda"
    counter = torch.zeros(1, dtype=torch.int64, device=arena.device)  # 0-based index of the step about to run
    run = Outcome(0, 0, compile, False)

    def one_step() -> None:
        step(static.load(counter), counter)

    def state() -> list[torch.Tensor]:  # everything a step writes but the arena (reset from one row per segment)
        return [counter, *tracker.tensors, *buffers()] + ([] if step.scaler is None else step.scaler.tensors)

    step.forward = make_forward(compile)
    saved, rows, rng = [x.clone() for x in state()], arena.start_rows(), capture_rng()

    def reset() -> None:
        for x, y in zip(state(), saved):
            x.copy_(y)
        arena.reset(rows)
        restore_rng(rng)
        step.begun = 0  # warm-ups are not steps: an out-of-memory error in the first real one is still retried

    side = torch.cuda.Stream() if cuda else None  # one side stream for every warm-up (the allocator pools per stream)
    sync = step.sync

    def warm() -> None:
        """One warm-up step on the side stream, without the ranks' averaging: a warm-up that fails on one rank
        only must not leave the ranks' collectives out of step (its effects are reset anyway). It runs step 0 (the
        counter is reset before each): with host inputs, step 0's batch is copied in first."""
        step.sync = None
        try:
            if static.host:
                static.fill(0)
            _on_side_stream(side, one_step)
        finally:
            step.sync = sync

    if compile or graphs:
        t0 = time.perf_counter()
        failed = ""
        try:
            warm()  # compiles
            _sync(cuda)
        except Exception as e:  # noqa: BLE001 - any compile failure selects the eager forward
            if not compile or is_oom(e):
                raise
            failed = f"torch.compile failed, eager forward: {type(e).__name__}: {first_line(e)}"
        if compile and sync is not None and not sync.all_true(not failed, "agreeing on torch.compile") and not failed:
            failed = "torch.compile failed on another rank: eager forward on every rank"
        if failed:
            run.notes.append(failed)
            run.compiled = False
            reset()
            step.forward = make_forward(False)
            warm()
            _sync(cuda)
        run.timings["compile" if run.compiled else "warmup"] = time.perf_counter() - t0
    graph = None
    if graphs:
        t0 = time.perf_counter()
        graph, why = _capture(one_step, warmup - 1, reset, warm, static)
        if sync is not None and not sync.all_true(graph is not None, "agreeing on CUDA graph capture") and not why:
            graph, why = None, "it failed on another rank: eager steps on every rank"
        if why:
            run.notes.append(f"CUDA graph capture failed, eager steps: {why}")
        run.timings["capture"] = time.perf_counter() - t0
    if compile or graphs:
        reset()
    run.graphs = graph is not None

    t0 = time.perf_counter()
    with _sync_errors() if strict and cuda else contextlib.nullcontext():
        run.steps_replayed = _replay(step, graph.replay if graph is not None else one_step,
                                     static.fill if static.host else None)
    _sync(cuda)
    run.timings["steps"] = time.perf_counter() - t0
    run.steps_run = int(tracker.steps_run.max())
    return run


def _replay(step: Step, one_step: Callable[[], None], fill: Callable[[int], None] | None = None) -> int:
    """Replay (or call) the step up to S times (`fill(i)` first: host inputs); returns how many ran. No host sync
    unless a progress bar is shown."""
    pending: collections.deque = collections.deque()
    for i in range(step.steps):
        if fill is not None:
            fill(i)
        one_step()
        step.after(i)  # eager, between replays
        if (i + 1) % step.check_every == 0 and i + 1 < step.steps and _all_stopped(step.tracker.alive, pending):
            return i + 1
    return step.steps


def _capture(one_step: Callable[[], None], warmup: int, reset: Callable[[], None], warm: Callable[[], None],
             static: StaticInputs | None = None):
    """Warm up (`warm`: one step on the side stream), then capture one step, the ranks' averaging in it; returns
    (graph, '') or (None, why not). Everything a step writes, the step counter too, is reset before each warm-up,
    so that none reads past the last row of the LR table or of the static inputs whatever S is. A capture that
    fails leaves the stream that was current current again (torch's CUDAGraph.__exit__ calls capture_end before
    it leaves the capture stream)."""
    current = torch.cuda.current_stream()
    try:
        for _ in range(max(0, warmup)):
            reset()
            warm()
        torch.cuda.synchronize()
        reset()
        with _sync_errors():  # a host sync inside the step (e.g. .item() in the model) cannot be captured
            warm()
        torch.cuda.synchronize()
        reset()
        if static is not None and static.host:
            static.fill(0)  # outside the graph: the replays are filled one by one
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_step()
        torch.cuda.synchronize()
        return graph, ""
    except Exception as e:  # noqa: BLE001 - any capture failure selects eager steps
        torch.cuda.set_stream(current)
        if is_oom(e):
            raise
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {first_line(e)}"


@contextlib.contextmanager
def _sync_errors():
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _on_side_stream(side, fn: Callable[[], None]) -> None:
    """fn() on the side stream (None: no GPU, on the current thread as it is), ordered after the current stream."""
    if side is None:
        fn()
        return
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
    if alive.device.type == "cpu":
        return not alive.numpy().any()  # a host read without a torch op (~1 us)
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
