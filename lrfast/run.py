"""Running a plan: the cached batches, the chunks of candidates (halved and retried when a chunk runs out of memory
while it sets up or in its first step), and their typed results, merged over chunks and ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lrfast import batches as _batches
from lrfast.engine import amp, update
from lrfast.engine.arena import Arena
from lrfast.engine.forward import Accumulate, BatchedStep, ModuleStep, stackable, unbatchable
from lrfast.engine.loop import Outcome, Step, drive_eager, drive_graph
from lrfast.engine.memory import oom_message
from lrfast.engine.tracker import Tracker
from lrfast.errors import OutOfMemoryError, first_line, is_oom
from lrfast.plan import Plan
from lrfast.state import Snapshot, capture_rng, restore_rng


@dataclass
class Data:
    """What the run trains and validates on, cached once: splits[t] is step t's batch (with accumulate=N a list of
    N micro-batches); `rng` the RNG state after caching, from which every chunk starts."""

    micro: list
    splits: list
    val: list | None
    rng: dict
    notes: list[str] = field(default_factory=list)
    mode: str = "device"  # where the cached batches live: "device" | "host" (cache=)
    nbytes: int = 0  # their bytes
    device_bytes: int = 0  # the bytes they hold on the device (x2 where the graphed engine stacks them again)
    first: object = None  # micro[0] on the device (the memory probe's batch)

    @classmethod
    def cache(cls, loader, plan: Plan) -> Data:
        o, device = plan.opts, plan.device
        cuda = device.type == "cuda"
        host = o.cache == "host" or (cuda and o.cache == "auto")  # auto on CUDA: cached on the host, then decided
        where = torch.device("cpu") if host else device
        micro = _batches.cache(loader, o.steps * o.accumulate, where, pin=host and cuda)
        size, mode, notes = _batches.nbytes(micro), "host" if o.cache == "host" else "device", []
        if cuda and o.cache == "auto":  # cached on the host first: onto the device when they fit comfortably
            free = torch.cuda.mem_get_info(device)[0]
            if 2 * size <= free // 4:
                micro = [_batches.to_device(m, device) for m in micro]
            else:
                mode = "host"
                notes.append(f"cache='auto': the {len(micro)} cached batches ({size / 2**20:.0f} MiB, twice that "
                             f"once stacked) would take over a quarter of the {free / 2**20:.0f} MiB free on {device}: "
                             "they stay in pinned host memory, each step's batch copied in (cache='device' puts "
                             "them on the device)")  # fmt: skip
        held = 0 if mode == "host" else size * (2 if plan.compile or plan.graphs else 1)
        n = o.accumulate
        splits = micro if n == 1 else [micro[t * n : (t + 1) * n] for t in range(o.steps)]
        rng = capture_rng()
        val, notes = None, []
        if o.val_loader is not None:
            val = _batches.cache(o.val_loader, o.val_batches, plan.device, "val_loader", cycle=False)
            if len(val) < o.val_batches:
                notes.append(f"val_loader has {len(val)} batch(es), fewer than val_batches={o.val_batches}: each is "
                             "scored once")  # fmt: skip
        return cls(micro, splits, val, rng, notes, mode, size, held, _batches.to_device(micro[0], device))


@dataclass
class ChunkResult:
    """The curves of candidates [rows[0], rows[1]) and how they ran."""

    rows: tuple[int, int]
    losses: np.ndarray  # [c, S]
    smoothed: np.ndarray
    val: np.ndarray
    steps_run: int
    forward: list[str]  # per chunk: "module (K=1)", "vmap (K=4)", "loop (K=2): why", with the engine's parts
    path: str  # the optimizer path: "fused cpp" | "fused triton" | "fused reference" | "generic torch.optim"
    loss: str  # how the loss is computed
    compiled: bool
    graphs: bool
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runs: np.ndarray | None = None  # [c] steps each candidate ran (the step it stopped at included)

    def merge(self, other: ChunkResult) -> ChunkResult:
        """This chunk and the next one (its rows follow these): one result over both."""
        if other.rows[0] != self.rows[1]:
            raise ValueError(f"chunks {self.rows} and {other.rows} are not adjacent")
        timings = dict(self.timings)
        for key, value in other.timings.items():
            timings[key] = timings.get(key, 0.0) + value
        return ChunkResult((self.rows[0], other.rows[1]), *(np.concatenate([a, b]) for a, b in (
            (self.losses, other.losses), (self.smoothed, other.smoothed), (self.val, other.val))),
            max(self.steps_run, other.steps_run), self.forward + other.forward, self.path, self.loss,
            self.compiled and other.compiled, self.graphs and other.graphs, timings,
            list(dict.fromkeys(self.notes + other.notes)), np.concatenate([self.runs, other.runs]))  # fmt: skip


def run_chunks(plan: Plan, snap: Snapshot, data: Data, bar, sync=None) -> ChunkResult:
    """This rank's candidates, chunk by chunk (plan.chunk at a time; halved on an out-of-memory error while a chunk
    sets up or runs its first step, down to 1); every chunk starts from the user's weights and the same RNG."""
    lo, chunk, done, notes = plan.first, plan.chunk, None, []
    while lo < plan.end:
        hi = min(plan.end, lo + chunk)
        snap.unlend()  # the next arena copies the user's weights, not the last chunk's
        restore_rng(data.rng)  # every chunk starts from the same RNG state, as a run of its own would
        run = Chunk(plan, snap, data, (lo, hi), bar, sync if plan.dist_mode == "ddp" else None)
        try:
            part, oom = run(), ""
        except Exception as e:
            if not is_oom(e) or run.begun > 1:  # only an OOM while setting up or in the first step
                raise
            oom = _retry_or_raise(e, plan, hi - lo, data.device_bytes)
        if oom:  # outside the except block: the failed chunk's tensors (held by the traceback) are freed
            new = max(1, (hi - lo) // 2)
            notes.append(f"out of memory with {hi - lo} candidates in one pass ({oom}): retried in chunks of {new}")
            if bar is not None:
                bar.total += plan.steps * (math.ceil((plan.end - lo) / new) - math.ceil((plan.end - lo) / chunk))
            chunk = new
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        done = part if done is None else done.merge(part)
        lo = hi
    done.notes = list(dict.fromkeys(notes + done.notes))
    plan.chunk = chunk
    return done


def _retry_or_raise(e: BaseException, plan: Plan, c: int, held: int = 0) -> str:
    if c == 1:
        o = plan.opts
        raise OutOfMemoryError(oom_message(e, plan.device, o.steps, o.accumulate, plan.memory, held)) from e
    if plan.dist_mode == "ddp":
        raise OutOfMemoryError(f"out of memory on {plan.device} with {c} candidates in one pass: distributed='ddp' "
                               "cannot retry with fewer (every rank would have to); pass max_memory=... to run fewer "
                               "at a time") from e  # fmt: skip
    return f"{type(e).__name__}: {first_line(e)}"[:200]


class Chunk:
    """One pass over the steps for candidates rows = [lo, hi): K = 1 on the model itself (ModuleStep), K > 1
    batched (BatchedStep); `begun` counts the steps begun, so the caller knows whether an error came from the
    set-up or the first step."""

    def __init__(self, plan: Plan, snap: Snapshot, data: Data, rows: tuple[int, int], bar, sync):
        self.plan, self.snap, self.data, self.rows, self.bar, self.sync = plan, snap, data, rows, bar, sync
        self.built: list = []  # the forwards made (a compile fallback makes a second)
        self.step: Step | None = None

    @property
    def begun(self) -> int:
        return 0 if self.step is None else self.step.begun

    def __call__(self) -> ChunkResult:
        plan, o, (lo, hi) = self.plan, self.plan.opts, self.rows
        c, steps, model = hi - lo, o.steps, plan.model
        arena = Arena(plan.optimizer, c, plan.device, None if plan.backend == "torch.optim" else plan.backend)
        self.snap.lend(arena.segments, plan.device)
        if self.sync is not None:
            self.sync.broadcast_start(arena, model)
        model.train()
        self.shared = c == 1 or o.strategy != "seeds"
        flat = self.data.splits if o.accumulate == 1 else [s for group in self.data.splits for s in group]
        self.why_loop = "" if self.shared else stackable(flat)
        if o.forward == "loop" and c > 1 and not self.why_loop:
            self.why_loop = "forward='loop'"
        if o.forward == "auto" and c > 1 and not self.why_loop:
            self.why_loop = unbatchable(model, c, plan.device, plan.ops)
        self.arena = arena
        self.scaler = amp.Scaler(c, plan.device) if o.precision == "fp16" else None
        inputs, index = self._inputs(c)
        tracker = Tracker(c, steps, o.smooth, o.early_stop_threshold, plan.device, like=o.like)
        lr_table = torch.tensor(plan.table[lo:hi].T, dtype=torch.float64, device=plan.device).contiguous()  # [S, K]
        engine = plan.engine(index, self.why_loop, self.data.splits, host=self.data.mode == "host")
        self.step = Step(None, arena, update.make(plan.optimizer, arena), tracker, lr_table, self.scaler, self.sync,
                         self.data.val, o.val_every, self.bar, plan.check_every)  # fmt: skip
        if engine.static is not None:
            ran = drive_graph(self.step, engine.static, self._forward, compile=engine.compile, graphs=engine.graphs,
                              buffers=self._buffers)  # fmt: skip
        else:
            self.step.forward = self._forward(False, auto=o.forward == "auto")
            if self.data.mode == "host":
                inputs = _batches.Feed(inputs, plan.device)
            try:
                ran = drive_eager(self.step, inputs)
            finally:
                for built in self.built:
                    if isinstance(built, BatchedStep):
                        built.close()  # the loop's threads, if it ran on any
            inner = self.built[-1]
            if isinstance(inner, BatchedStep) and inner.measured_s:  # forward="auto": the seconds of its measured steps
                ran.timings["forward_choice"] = inner.measured_s
        return self._result(tracker, ran, engine.notes + ran.notes)

    def _inputs(self, c: int) -> tuple[list, np.ndarray | None]:
        """(what the forward takes at each step, the index of the cached batch behind it: [S] or [S, K])."""
        splits, orders, o = self.data.splits, self.plan.orders[self.rows[0] : self.rows[1]], self.plan.opts
        if c == 1:
            return [splits[i] for i in orders[0]], orders[0]
        if self.shared:
            return splits, np.arange(o.steps)
        if o.accumulate == 1:
            return [[splits[i] for i in orders[:, t]] for t in range(o.steps)], orders.T
        # micro-batch m of step t: one per candidate, from that candidate's batch order
        return [[[splits[i][m] for i in orders[:, t]] for m in range(o.accumulate)] for t in range(o.steps)], None

    def _forward(self, compiled: bool, auto: bool = False):
        """The forward of this chunk; `auto`: K > 1 candidates measure vmap and the loop on the first steps (eager
        driver only: nothing may be timed inside a captured graph)."""
        plan, o, c = self.plan, self.plan.opts, self.arena.k
        if c == 1:
            inner = ModuleStep(plan.model, self.arena, o.loss_fn, o.precision, self.scaler, compile=compiled)
        else:
            alive, upd = self.step.tracker.alive, self.step.update
            # the batched call hands the large parameters' grads to the update where nothing else reads the arena's
            # grads: one step each (no micro-batches summed there), no fp16 check of them, no all-reduce of them
            hand = isinstance(upd, update.HostFused) and o.accumulate == 1 and self.scaler is None and self.sync is None
            inner = BatchedStep(plan.model, self.arena, o.loss_fn, randomness="same" if self.shared else "different",
                                why_loop=self.why_loop, precision=o.precision, scaler=self.scaler,
                                compile=compiled, auto=auto, alive=alive if alive.device.type == "cpu" else None,
                                direct=upd.direct if hand else None)  # fmt: skip
        self.built.append(inner)
        return Accumulate(inner, self.arena) if o.accumulate > 1 else inner

    def _buffers(self) -> list[torch.Tensor]:
        """The mutable non-arena tensors of the forward last built (reset after warm-up)."""
        inner = self.built[-1]
        return list(self.plan.model.buffers()) if isinstance(inner, ModuleStep) else list(inner.buffers.values())

    def _result(self, tracker: Tracker, ran: Outcome, notes: list[str]) -> ChunkResult:
        o, c, inner = self.plan.opts, self.arena.k, self.built[-1]
        notes = notes + inner.notes
        if c == 1:
            forward = "module (K=1)"
        else:
            forward = f"vmap (K={c})" if inner.mode == "vmap" else f"loop (K={c}): {inner.why}"
            if inner.mode == "loop" and inner.threads_info:
                forward += f"; {inner.threads_info}"
            if inner.mode == "vmap" and inner.measure:
                forward += (f": forward='auto' decided nothing: the run ended within its measured steps ("
                            f"{inner.calls} calls measured, {len(inner.measure)} more planned; more steps decide)")
            elif inner.mode == "vmap" and inner.choice:
                forward += f": {inner.choice}"
        parts = [forward] + ([f"{o.accumulate} micro-batches per step"] if o.accumulate > 1 else []) + (
            [f"{o.precision} autocast"] if o.precision != "fp32" else []) + (
            ["torch.compile"] if ran.compiled else []) + (["CUDA graph"] if ran.graphs else [])  # fmt: skip
        if self.scaler is not None and bool(self.scaler.skipped.any()):
            notes.append(f"fp16: steps skipped on overflow per candidate: {self.scaler.skipped.tolist()}")
        return ChunkResult(self.rows, tracker.losses.cpu().numpy(), tracker.smoothed.cpu().numpy(),
                           tracker.val.cpu().numpy(), ran.steps_run, [", ".join(parts)], self.step.update.path,
                           inner.loss_desc, ran.compiled, ran.graphs, ran.timings,
                           notes, tracker.steps_run.cpu().numpy())  # fmt: skip
