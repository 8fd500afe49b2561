"""The forward and backward of one training step, grads into the arena's flat grad buffer, for every way the K
candidates can run:

- K = 1 (ModuleStep): the model itself, its parameters pointing into the arena's row 0 and its .grad into the
  arena's flat grad buffer, so backward accumulates straight into the buffer the fused kernel reads (no gather).
- K > 1 (BatchedStep): the model called with its parameter slots holding the arena's stacked parameter views
  [K, *shape] (autograd leaves), vmapped, with per-candidate buffer clones (BatchNorm running stats) [K, *shape];
  one autograd backward of the K losses' sum, the grads copied into the arena. Where vmap cannot serve a model
  (data-dependent control flow, .item(), unstackable batches, recurrent layers...) a per-candidate loop runs
  instead (K calls of the model itself, candidate k's parameters and grads pointed at row k of the arena);
  forward="auto" times both on the run's first steps (MEASURE; after probes, the batched call at K against the
  loop's cost a candidate in them: AT_K) and keeps the batched call only where it measured faster than the loop;
  recurrent models, and on a CPU models running convolutions or attention and any 2 candidates, take the loop at
  once (unbatchable); `mode`, `why` and `notes` say which ran and why. Stopped candidates are left out (`alive`):
  the loop skips them, the batched call runs the rows up to the last live one, and auto's batched call hands over
  to the loop once that is cheaper.
  The user's model is never written: its parameters and buffers are only swapped for the call (state.Slots: every
  alias, put back also on an exception).
- Accumulate: N micro-batches per step, grads and losses averaged.

Randomness (dropout) with K > 1: "same" gives every candidate the same masks at a step (grid: a candidate's curve
does not depend on K); "different" gives each its own, all drawn from the one global generator, so candidate k's
masks depend on K (seeds: deterministic for a given (seed, K))."""

from __future__ import annotations

import contextlib
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch
from torch import nn
from torch._C._functorch import is_batchedtensor
from torch.func import vmap
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from lrfast.batches import Split, stack, stack_difference
from lrfast.engine.amp import autocast
from lrfast.engine.arena import Arena
from lrfast.errors import first_line, is_oom
from lrfast.loss import check_finite, check_scalar, explain_arity, first_loss, resolve_loss
from lrfast.state import Slots, capture_rng, forked_rng, restore_rng


class ModuleStep:
    grads = None  # its grads are the arena's (update.HostFused reads them there)

    def __init__(self, model: nn.Module, arena: Arena, loss_fn, precision: str = "fp32", scaler=None,
                 compile: bool = False):  # fmt: skip
        self.model, self.arena, self.user_loss_fn = model, arena, loss_fn
        self.forward = torch.compile(model, dynamic=False) if compile else model  # training forward (+ backward)
        self.precision, self.scaler = precision, scaler
        self.loss_f = None
        self.loss_desc = ""
        self.copy_grads = False  # set when autograd did not accumulate into the preset .grad views

    def __call__(self, split: Split) -> torch.Tensor:
        """Zero grads, forward, loss, backward; returns the detached loss as a [1] tensor."""
        self.arena.zero_grad()
        first = self.loss_f is None
        with autocast(self.arena.device, self.precision):
            if first:
                out = explain_arity(self.forward, split, *split.args, **split.kwargs)
            else:
                out = self.forward(*split.args, **split.kwargs)
            loss = self._first_loss(out, split) if first else self.loss_f(out, split)
        (loss if self.scaler is None else loss * self.scaler.scale[0]).backward()
        if first:  # autograd accumulates into preset .grad views; check once that it did
            for seg in self.arena.segments:
                for p, view in zip(seg.params, seg.views(seg.g, 0)):
                    if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                        self.copy_grads = True
        if self.copy_grads:
            self._copy_grads()
        return loss.detach().float().reshape(1)

    @property
    def notes(self) -> list[str]:
        return ["grads copied into the arena (autograd replaced the preset .grad)"] if self.copy_grads else []

    @torch.no_grad()
    def evaluate(self, splits: list[Split]) -> torch.Tensor:
        """Mean loss over the cached validation batches in eval mode (no dropout, BatchNorm running stats used,
        not updated), without touching grads or training; returns [1]."""
        self.model.eval()
        try:
            with autocast(self.arena.device, self.precision):
                total = sum(self.loss_f(self.model(*s.args, **s.kwargs), s).detach().float().reshape(1)
                            for s in splits)  # fmt: skip
        finally:
            self.model.train()
        return total / len(splits)

    def _first_loss(self, out, split: Split) -> torch.Tensor:
        self.loss_f, self.loss_desc = resolve_loss(self.user_loss_fn, out, split)
        return first_loss(self.loss_f, self.loss_desc, self.user_loss_fn, out, split)

    def _copy_grads(self) -> None:
        for seg in self.arena.segments:
            for p, view in zip(seg.params, seg.views(seg.g, 0)):
                if p.grad is None:
                    view.zero_()
                elif p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                    p.grad = view


class Accumulate:
    """Gradient accumulation: a step over N micro-batches whose grads and losses are averaged, which equals one
    step on their concatenation for a mean-reduced loss and micro-batches of one size. Wraps ModuleStep or
    BatchedStep (each call of which leaves one micro-batch's grads in the arena)."""

    grads = None

    def __init__(self, step, arena: Arena):
        self.step, self.arena = step, arena
        self.sums = [torch.empty_like(seg.g) for seg in arena.segments]

    def __call__(self, items: list) -> torch.Tensor:
        total = None
        for i, item in enumerate(items):
            loss = self.step(item)
            for acc, seg in zip(self.sums, self.arena.segments):
                acc.copy_(seg.g) if i == 0 else acc.add_(seg.g)
            total = loss if total is None else total + loss
        for acc, seg in zip(self.sums, self.arena.segments):
            torch.div(acc, len(items), out=seg.g)
        return total / len(items)

    def evaluate(self, splits: list) -> torch.Tensor:
        return self.step.evaluate(splits)


class BatchedStep:
    def __init__(self, model: nn.Module, arena: Arena, loss_fn, randomness: str = "same", why_loop: str = "",
                 precision: str = "fp32", scaler=None, compile: bool = False, auto: bool = False,
                 alive: torch.Tensor | None = None, direct: list[bool] | None = None):  # fmt: skip
        """`alive`: the tracker's alive mask [K] on the host (a CPU arena; None: every candidate runs every step).
        With it the loop runs only the candidates still running (randomness "same": a stopped one draws nothing the
        others depend on), as K separate runs each end at their stop, and a batched call auto chose hands over to
        the loop once the loop over the survivors is faster than the batched call, at the measured speeds.
        `direct`: per parameter, whether the batched call hands its grads to the update as autograd made them
        (`grads`, read by update.HostFused) instead of copying them into the arena (None: it copies them all)."""
        self.model, self.arena, self.user_loss_fn, self.randomness = model, arena, loss_fn, randomness
        self.alive = alive
        self._alive = None if alive is None else alive.numpy()  # a view: the tracker updates alive in place
        self.direct = direct
        self.grads: list | None = None  # the last call's handed grads (per parameter, None: in the arena; `direct`)
        self.precision, self.scaler = precision, scaler
        self.loss_f, self.loss_desc = None, ""
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = [names[id(p)] for seg in arena.segments for p in seg.params]
        self.slots = Slots(model)
        self.p = [v for seg in arena.segments for v in seg.stacked(seg.p)]
        self.g = [v for seg in arena.segments for v in seg.stacked(seg.g)]
        self.buffers = _clone_buffers(model, arena.k)
        self.mode, self.why = ("loop", why_loop) if why_loop else ("vmap", "")
        self.notes = [_loop_note(arena.k, why_loop)] if why_loop else []
        self.calls = 0
        self.compile = compile
        self._vf: dict[bool, object] = {}  # _batched(): the vmapped step per batch kind (shared / one per candidate)
        # autograd leaves over the stacked parameter views (the arena's storage): the batched loss is differentiated
        # with respect to them
        self.leaves = [v.detach().requires_grad_() for v in self.p]
        # forward="auto": the run's first calls are the measurement (_schedule: the mode, whether it is timed, and a
        # probe's rows); the faster mode runs the rest. `choice` says what was measured, `measured_s` how long
        # those calls took
        self.measure = _schedule(arena.k, randomness) if auto and self.mode == "vmap" and not compile else []
        self.probes: list[tuple[int, float, float | None]] = []  # (rows batched, ms a row batched, ms a row looped)
        self.ms: dict[str, list[float]] = {}  # timed calls' milliseconds per mode
        self.ms_row: dict[str, list[float]] = {}  # the same per candidate row the call ran (_rows_run)
        self.choice, self.measured_s = "", 0.0
        self._loop_calls = 0
        self._loop_rows: list | None = None  # _rows(): the loop's views, made at its first call
        self._loop_buffers: list[dict] = []
        self._copy_grads = False  # autograd replaced a preset grad view in the loop: copy every call
        self._nan = torch.tensor(float("nan"), device=arena.device)  # the loss of a stopped candidate left out
        self._loop_ran = 0  # how many candidates the loop's last call ran
        self._dirty: list[bool] | None = None  # the rows whose grads may not be zero (None: any row's), _zero_dirty
        self._measuring = False  # inside one of auto's measured calls
        self._threads: _Threads | None = None  # the loop's threads (_start_threads), with a replica of the model each
        self._replicas: list[tuple[nn.Module, Slots, list]] = []  # (replica, its slots, its _rows())
        self._unthreadable: str | None = None  # why the loop cannot run on threads ('' it can; None: not looked at)
        self._draws: bool | None = None  # the model drew random numbers in the loop's first candidates (None: not run)
        self._rng_before: torch.Tensor | None = None  # the generator's state before them
        self._one_ms: float | None = None  # a candidate's step on all of torch's threads, ms (_threads_for_the_rest)
        self._thread_ms: float | None = None  # a candidate's on the threads, ms (_keep_threads)
        self._after_threads = False  # the last call ended on the loop's threads (a threaded call now starts on time)
        self.threads_info = ""  # the loop's threads kept, and what they measured

    def __call__(self, item) -> torch.Tensor:
        """Zero grads, forward + backward of every candidate, grads into the arena; `item` is one Split shared by
        all candidates or a list of K Splits (one per candidate). Returns the detached losses [K]."""
        self.calls += 1
        self.grads = None
        if self.measure:
            return self._measured(item)
        if self.mode == "vmap" and self.choice and self._live() is not None:
            self._hand_over()
        return self._run(item)

    def _measured(self, item) -> torch.Tensor:
        """forward="auto": one of the run's first calls, in the mode MEASURE gives it (a warm-up of each mode, then
        a timed call of each, interleaved, and one more timed pair when the first is close: within CLOSE). They are
        steps of the run like any other (grads, RNG and buffers as either mode leaves them), so the measurement
        costs the run only the slower mode's extra time on its measured steps. After the last, the batched call is
        kept only when its best timed call was faster than the loop's: the loop runs each candidate at the K = 1
        step's speed, so it is never slower than K separate runs (conv nets and attention on CPU, where vmap's
        convolution, pooling and attention rules lose to K plain calls)."""
        mode, timed, m = self.measure.pop(0)  # m: a probe's batched rows
        self._measuring = True
        try:
            if mode == "probe":
                return self._probe(item, m, timed)
            self.mode = mode
            rows = self._rows_run()
            _sync(self.arena.device)
            t0 = _clock()
            try:
                loss = self._run(item)
            finally:
                self.mode = "vmap" if self.mode == mode else self.mode  # a vmap failure left "loop" (and its note)
        finally:
            self._measuring = False
        _sync(self.arena.device)
        seconds = _clock() - t0
        self.measured_s += seconds
        if self.mode == "loop":  # the batched call failed: the fallback's note says so (_fall_back)
            return loss
        if timed:
            self.ms.setdefault(mode, []).append(1e3 * seconds)
            self.ms_row.setdefault(mode, []).append(1e3 * seconds / rows)
        if not self.measure and self.mode == "vmap":
            self._pick()
        return loss

    def _pick(self) -> None:
        """The faster mode from the timed calls: the batched call's at K against the loop's, timed at K, or after
        the probes from its cost a candidate there (AT_K) for the candidates it would run; close (within CLOSE) after
        the one timed batched call MEASURE and AT_K make, one more timed pair at K decides; slower than the loop
        after that one call, the batched call is timed once more and the best of the two decides. One call the
        machine stalled in would otherwise run the candidates as a loop: the digits MLP at K = 16 on the 2-core EPYC
        measured one batched call at 20.6 ms against its steady ~5.4 and the loop's ~7.9, and ran 0.72x as fast as
        the batched call would have; a batched call that truly loses measures so twice, for one more step at its
        cost."""
        vm, twice = min(self.ms["vmap"]), len(self.ms["vmap"]) > 1
        if "loop" in self.ms:
            loop = min(self.ms["loop"])
            best = (", best of 2 each" if len(self.ms["loop"]) > 1 else  # a timed pair: both timed twice
                    ", the batched call best of 2" if twice else "")  # fmt: skip
            measured = f"measured {loop:.2f} ms a step as a loop, {vm:.2f} ms batched (vmap){best}"
        else:
            live, row = self._live(), min(self.ms_row["loop"])
            n = self.arena.k if live is None else int(live.sum())
            loop = n * row
            measured = (f"measured {vm:.2f} ms a step batched (vmap){', best of 2,' if twice else ''} against "
                        f"~{loop:.2f} as a loop ({n} x its {row:.2f} ms a candidate in the probes)")  # fmt: skip
        if not twice and 1 / CLOSE < vm / loop < CLOSE:  # close: one more timed pair decides
            self.measure = list(TIMED_PAIR)
            return
        if not twice and loop <= vm:  # slower on one call: once more, the best of the two decides
            self.measure = [AT_K[-1]]
            return
        if loop <= vm:
            self.mode, self.why = "loop", f"forward='auto' {measured}"
            self.notes.append(f"the {self.arena.k} candidates run as a per-candidate loop: forward='auto' {measured} "
                              "(the batched call is kept only when it measures faster); forward='vmap' forces the "
                              "batched call")  # fmt: skip
        else:
            self.choice = f"forward='auto' {measured}"
            self.close()  # the loop's threads, if it had any: the batched call runs the rest

    def _run(self, item, rows: int | None = None) -> torch.Tensor:
        """One step in the current mode; `rows`: the batched call runs only the first `rows` candidates (a probe's,
        _probe), unless it fails on the first call, when the loop runs them all."""
        if self.mode == "vmap":
            # forward="auto" measuring the batched call after the first step (a larger one than its probes'): a
            # failure there (out of memory included) selects the loop too, from the state before the call
            first, trial = self.calls == 1, self._measuring and self.calls > 1
            rng = capture_rng() if first or trial else None
            saved = {n: b.clone() for n, b in self.buffers.items()} if trial else None
            self._after_threads = False
            try:
                with self._all_threads():
                    loss = self._vmap(item, rows)
            except Exception as e:  # noqa: BLE001 - any failure on the first call selects the loop
                if self.compile or not (trial or (first and not is_oom(e))):  # out of memory on the first call: the
                    raise  # caller retries with fewer candidates; compiled: it retries this vmap eagerly (drive_graph)
                self._fall_back(e, rng, saved, rows or self.arena.k)
                loss = self._looped(item)
        else:
            loss = self._looped(item)
        if self.calls == 1 and (rows is None or self.mode == "loop"):
            check_finite(loss)
        return loss

    def _fall_back(self, e: Exception, rng, saved: dict | None, rows: int) -> None:
        """The batched call failed (e): the loop runs from here, from the RNG and buffers as they were before it."""
        where = ("on the first step" if saved is None else
                 f"on step {self.calls} (forward='auto' measuring it on {rows} candidates)")  # fmt: skip
        self.mode, self.why = "loop", f"vmap failed {where}: {type(e).__name__}: {first_line(e)}"  # whole sentences
        self.notes.append(_loop_note(self.arena.k, self.why))
        self.measure = []  # forward="auto": nothing more to measure
        if saved is None:
            self.buffers, self.loss_f = _clone_buffers(self.model, self.arena.k), None
            self._loop_rows = None  # the loop's buffer views are of the new clones
        else:
            for n, b in saved.items():
                self.buffers[n].copy_(b)
        restore_rng(rng)  # the failed attempt may have drawn dropout masks: the loop draws them afresh

    def _probe(self, item, m: int, timed: bool) -> torch.Tensor:
        """forward="auto" with shared batches and masks (randomness "same") and K >= PROBE_FROM: a step whose first m
        candidates run in one batched call and the others in the loop, each part timed. The batched call's cost a
        candidate over m = 1, 2, 4, ... tells early whether it can beat the loop at K candidates (_after_probe): a
        conv net's or a transformer's on CPU stays flat or grows with m (activations K times larger fall out of
        cache), an MLP's falls. Where it cannot, the loop runs at once, so the run pays for a few small batched
        calls instead of the full-K ones (the char GPT's at K = 16: 1.7x a looped step each)."""
        device = self.arena.device
        state = _rng_state(device)  # randomness "same": the loop's candidates draw the masks the batched rows drew
        _sync(device)
        t0 = _clock()
        batched = self._run(item, rows=m)
        if self.mode == "loop":  # the batched call failed (_fall_back): the loop ran every candidate
            return batched
        _sync(device)
        t1 = _clock()
        looped = self._looped(item, m, state)
        _sync(device)
        t2 = _clock()
        self.measured_s += t2 - t0
        loss = torch.cat([batched, looped])
        if self.calls == 1:
            check_finite(loss)
        if timed:
            n = self._loop_ran
            probe = (m, 1e3 * (t1 - t0) / m, 1e3 * (t2 - t1) / n if n else None)
            again = bool(self.probes) and self.probes[-1][0] == m  # _after_probe's second timed call at this size
            if again:  # the best of the two
                _, b, lp = self.probes.pop()
                looped = [x for x in (lp, probe[2]) if x is not None]
                probe = (m, min(b, probe[1]), min(looped) if looped else None)
            self.probes.append(probe)
            self._after_probe(again)
        return loss

    def _after_probe(self, again: bool = False) -> None:
        """After a timed probe on m candidates: the batched call's cost a candidate at K, extrapolated from its last
        two sizes (the same factor per doubling); at or above CLOSE x the loop's cost a candidate the loop runs the
        rest, at or below 1 / CLOSE x the full-K measurement (MEASURE) decides, in between the next probe (2m) does;
        with no larger probe left (2m > K / 2: one doubling from K), the loop runs the rest when the extrapolation is
        at or above its cost, else the full-K measurement decides (costs a candidate that stay flat near the loop's,
        the char GPT's, would otherwise run it: 10 of a 20-step run measured at K = 8). The loop is chosen only on
        the best of two timed calls at the last size (`again`: this was the second): one call the machine stalled
        in (the digits MLP at K = 16 in a fresh process, 1 run in 4 or 5 on the 2-core EPYC: 7.3 or 17 ms a
        candidate at 2 against 3.0 at 1 and ~1 for the steady batched call) would otherwise run 16 candidates as a
        loop, 0.88x their K = 1 runs; a cost that truly grows (a conv net's) measures so twice, for one more
        step of the loop's cost and a 2-row batched call."""
        k = self.arena.k
        looped = [lp for *_, lp in self.probes if lp is not None]
        if len(self.probes) < 2 or not looped:  # the first size, or every looped candidate stopped: go on
            return
        (m0, b0, _), (m1, b1, _) = self.probes[-2:]
        loop = min(looped)
        at_k = b1 * (b1 / b0) ** (np.log2(k / m1) / np.log2(m1 / m0))
        last = 2 * m1 > k // 2
        if at_k >= (1 if last else CLOSE) * loop:
            if not again:
                self.measure[:0] = [("probe", True, m1)]
                return
            sizes = " then ".join(str(m) for m, *_ in self.probes)
            costs = " then ".join(f"{b:.2f}" for _, b, _ in self.probes)
            measured = (f"measured the batched call (vmap) on {sizes} candidates at {costs} ms a candidate, "
                        f"extrapolated ~{at_k:.2f} at {k} against the loop's {loop:.2f} ms a candidate")  # fmt: skip
            self.measure = []
            self.mode, self.why = "loop", f"forward='auto' {measured}"
            self.notes.append(f"the {k} candidates run as a per-candidate loop: forward='auto' {measured} (the "
                              "batched call is kept only when it measures faster); forward='vmap' forces the "
                              "batched call")  # fmt: skip
        elif at_k > loop / CLOSE and not last:
            self.measure[:0] = _probe_steps(2 * m1)
        else:  # the batched call at K, against the loop's cost a candidate in the probes (_pick)
            self.measure = list(AT_K)
            self.ms_row["loop"] = [loop]

    def _hand_over(self) -> None:
        """forward='auto' kept the batched call. Once candidates stop, the loop runs only the n still running and the
        batched call the rows up to the last of them (_rows_run): at the per-row costs measured, the loop runs the
        rest once its n rows cost less than those rows (stopped rows before live ones: a grid whose LRs are not
        ascending, or whose middle ones stop first)."""
        k, n, m = self.arena.k, int(self._live().sum()), self._rows_run()
        loop, vm = min(self.ms_row["loop"]), min(self.ms_row["vmap"])
        if n == k or n * loop >= m * vm:
            return
        self.mode, self.why = "loop", (f"{self.choice}, then {k - n} of the {k} candidates stopped: the loop over "
                                       f"the {n} still running (~{n * loop:.2f} ms at its measured {loop:.2f} ms a "
                                       f"candidate, the batched call ~{m * vm:.2f} ms for {m} rows) runs the "
                                       "rest")  # fmt: skip
        self.notes.append(f"the {k} candidates run as a per-candidate loop from call {self.calls}: {self.why}")

    def _live(self):
        """The candidates still running, a bool array [K] (None: not known). Only with randomness "same", where
        every candidate draws what candidate 0 draws: with "different" each draws from the generator in turn, so
        leaving a stopped one out would change the masks of those after it."""
        if self.alive is None or self.randomness != "same":
            return None
        return self._alive

    def _rows_run(self) -> int:
        """How many candidates a call in the current mode runs: the loop the live ones, the batched call the rows
        up to the last live one (its stacked views sliced, no copy; not compiled: a new size would compile again)."""
        live = self._live()
        if live is None:
            return self.arena.k
        if self.mode == "loop":
            return int(live.sum())
        if self.compile or not live.any():
            return self.arena.k
        return int(np.flatnonzero(live)[-1]) + 1

    @torch.no_grad()
    def evaluate(self, splits: list[Split]) -> torch.Tensor:
        """Every candidate's mean loss over the cached validation batches, in eval mode; returns [K] (the loop:
        NaN for a candidate that stopped, which is not scored)."""
        params = dict(zip(self.names, self.p))
        live = self._alive  # eval mode draws nothing: any randomness
        self.model.eval()
        for r, *_ in self._replicas:
            r.eval()
        try:
            total = 0
            for s in splits:
                if self.mode == "vmap":
                    f = vmap(self._loss, in_dims=(0, 0, None, None, None), randomness="same")
                    with _batchable(self.arena.device), self._all_threads():
                        total = total + f(params, self.buffers, s.args, s.kwargs, s.target)
                else:
                    total = total + self._evaluate_loop(s, params, live)
        finally:
            self.model.train()
            for r, *_ in self._replicas:
                r.train()
        return total / len(splits)

    def _evaluate_loop(self, s: Split, params: dict, live) -> torch.Tensor:
        """The loop's validation losses [K] on one batch (NaN for a stopped candidate), on its threads if any."""
        ks = [k for k in range(self.arena.k) if live is None or live[k]]
        losses: dict[int, torch.Tensor] = {}

        def score(k: int, model: nn.Module, slots: Slots, rows: list) -> None:
            losses[k] = self._loss({n: p[k] for n, p in params.items()}, {n: b[k] for n, b in self.buffers.items()},
                                   s.args, s.kwargs, s.target, (model, slots)).reshape(())

        if self._threads is not None and len(ks) > 1:
            self._each(ks, score)
        else:
            for k in ks:
                score(k, self.model, self.slots, self._rows())
        return torch.stack([losses.get(k, self._nan) for k in range(self.arena.k)])

    def _loss(self, params: dict, buffers: dict, args: tuple, kwargs: dict, target, on=None) -> torch.Tensor:
        """`on`: (a replica, its slots) to call instead of the model (a thread of the loop's)."""
        split = Split(args, kwargs, target)
        with autocast(self.arena.device, self.precision):
            out = self._call(params, buffers, args, kwargs, on)
            if self.loss_f is None:
                self.loss_f, self.loss_desc = resolve_loss(self.user_loss_fn, out, split)
            return self.loss_f(out, split).float()

    def _call(self, params: dict, buffers: dict, args: tuple, kwargs: dict, on=None):
        """The model (`on`: (a replica, its slots)) with these parameters and buffers (by name) in every slot that
        holds them."""
        model, slots = on or (self.model, self.slots)
        return slots.call(model, params, buffers, args, kwargs)

    def _vmap(self, item, rows: int | None = None) -> torch.Tensor:
        """The batched call. The first one records PyTorch's "no batching rule for aten::op" warnings into one note
        (each such op runs once per candidate inside the batched step: a slow path); later calls silence them."""
        first = self.calls == 1
        with warnings.catch_warnings(record=first) as caught:
            if first:
                warnings.simplefilter("always")
            else:
                warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)  # said once, in the notes
            loss = self._vmap_call(item, rows)
        if first:
            self._note_batching_rules(caught)
        return loss

    def _note_batching_rules(self, caught: list) -> None:
        ops = []
        for w in caught:
            m = re.search(_NO_BATCHING_RULE + r" for (\S+?)\.? ", str(w.message))
            if m:
                ops.append(m.group(1))
            else:  # not ours: passed on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        if ops:
            self.notes.append(f"vmap has no batching rule for {', '.join(dict.fromkeys(ops))}: PyTorch runs it once "
                              "per candidate inside the batched step (a slow path; the other ops stay batched)")

    def _resolve_loss_eagerly(self, item) -> None:
        """The loss function, from one uncompiled forward of candidate 0 (no grad, on copies of its buffers, the RNG
        put back): resolved inside a compiled call instead, Dynamo guards on `loss_f is None` and compiles the step
        a second time on the next call (2 graphs for K = 3, 13.9 s of Inductor on the 2-core CPU)."""
        split = item[0] if isinstance(item, list) else item
        params = {n: p[0] for n, p in zip(self.names, self.p)}
        buffers = {n: b[0].clone() for n, b in self.buffers.items()}
        with torch.no_grad(), forked_rng(self.arena.device), autocast(self.arena.device, self.precision):
            out = self._call(params, buffers, split.args, split.kwargs)
        self.loss_f, self.loss_desc = resolve_loss(self.user_loss_fn, out, split)

    def _vmap_call(self, item, rows: int | None = None) -> torch.Tensor:
        """One batched step: the forward vmapped over the candidates (compiled with compile=True, as ModuleStep
        compiles the model), then plain autograd backward through the batched ops it ran, the grads copied into the
        arena. No functorch grad transform (vmap(grad_and_value)): its first call in a process imports
        torch._dynamo (~1.5-2 s on the 2-core CPU) and its backward runs through the batching rules again, recording
        a differentiable graph (measured per step on the 2-core CPU: LeNet-5 K = 16 168 ms against 141 ms here).
        `rows`: only the first `rows` candidates, the others' grads and losses left to the caller (a probe's loop)."""
        if self.compile and self.loss_f is None:
            self._resolve_loss_eagerly(item)
        each = isinstance(item, list)  # one batch per candidate: stacked [K, ...], vmapped too
        s = stack(item) if each else item
        k = self.arena.k
        m = rows or (k if each else self._rows_run())  # per-candidate batches are stacked [K, ...]: every row
        leaves, buffers, dst = self.leaves, self.buffers, self.g
        scale = None if self.scaler is None else self.scaler.scale
        if m < k:  # the rows after the last live candidate have stopped: the first m rows only
            leaves = [v[:m].detach().requires_grad_() for v in self.p]
            buffers, dst = {n: b[:m] for n, b in buffers.items()}, [g[:m] for g in dst]
            scale = None if scale is None else scale[:m]
            if rows is None:  # the stopped rows left out keep zero grads, as the loop leaves a stopped candidate's
                self._zero_dirty(m)  # (zeroed once; a probe's loop writes its rows itself)
        if self._dirty is not None:
            self._dirty[:m] = [True] * m  # the grads copied in below
        with _batchable(self.arena.device):  # the forward's ops (the backward runs on what they recorded)
            loss = self._batched(s, each)(dict(zip(self.names, leaves)), buffers, s.args, s.kwargs, s.target)
        if loss.dim() != 1:
            check_scalar(loss[0])
        total = (loss if scale is None else loss * scale).sum()  # candidate k's grad: row k's
        grads = (torch.autograd.grad(total, leaves, allow_unused=True) if total.requires_grad
                 else [None] * len(leaves))  # fmt: skip
        used = []
        handed = [None] * len(dst) if self.direct is not None and rows is None else None  # not a probe's rows
        for i, (g, grad) in enumerate(zip(dst, grads)):
            if grad is None:  # a parameter the loss does not use: zero, as for the loop's zeroed grads
                g.zero_()
            elif handed is not None and self.direct[i] and grad.is_contiguous():
                handed[i] = grad  # read by the update where autograd left it; the arena's columns left as they are
            else:
                used.append((g, grad))
        self.grads = handed
        if used:
            torch._foreach_copy_(*map(list, zip(*used)))
        loss = loss.detach()
        return loss if m == k or rows else torch.cat([loss, self._nan.to(loss.dtype).expand(k - m)])

    def _batched(self, s: Split, each: bool):
        """The vmapped loss for this kind of batch, made at its first call (one batch per candidate: in_dims follow
        the batch's tensors)."""
        if each not in self._vf:
            dims = (pytree.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, (s.args, s.kwargs, s.target))
                    if each else (None, None, None))  # fmt: skip
            self._vf[each] = self._compiled(vmap(self._loss, in_dims=(0, 0, *dims), randomness=self.randomness))
        return self._vf[each]

    def _compiled(self, f):
        return torch.compile(f, dynamic=False) if self.compile else f

    def _looped(self, item, start: int = 0, state: torch.Tensor | None = None) -> torch.Tensor:
        """_loop; on its first call a failure of the model's call signature says how lrfast splits batches."""
        if self._loop_calls:
            return self._loop(item, start, state)
        return explain_arity(self._loop, item[0] if isinstance(item, list) else item, item, start, state)

    def _loop(self, item, start: int = 0, state: torch.Tensor | None = None) -> torch.Tensor:
        """K calls of the model itself, as a K = 1 run makes them: candidate k's parameters (.data) and grads (.grad)
        pointed at row k of the arena, its buffers swapped in, backward accumulating straight into the arena (no
        functional call, no grads to copy). The parameters point at row 0 again afterwards, as lent. `start`: only
        candidates start.. (a probe's, whose batched call ran the others from the generator's `state`); returns
        their losses. On a CPU arena the candidates run side by side on threads where they can (_threaded,
        _threads_for_the_rest)."""
        self._loop_calls += 1
        if start:
            for seg in self.arena.segments:
                seg.g[start:].zero_()
            self._dirty = None
        else:
            self._zero_dirty()  # unused params get no grad here; vmap returns zeros for them and needs no fill
        # randomness "same": every candidate draws the masks candidate 0 draws (as vmap's "same" and a K = 1 run do),
        # by rewinding the device's generator; not inside a CUDA graph capture, where it cannot be set
        device = self.arena.device
        rewind = self.randomness == "same" and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        rows, live = self._rows(), self._live()
        check = self._loop_calls == 1  # autograd accumulates into the preset views: checked on the first call
        ks = [k for k in range(start, self.arena.k) if live is None or live[k]]  # stopped: frozen (LR 0), not run
        self._loop_ran = len(ks)
        if self._dirty is not None:
            for k in ks:
                self._dirty[k] = True
        if rewind and state is None and len(ks) > 1:  # the first candidate draws from the generator as it is
            state = _rng_state(device)
        losses: dict[int, torch.Tensor] = {}
        first = self._draws is None and len(ks) > 1  # its first candidates tell whether the others can run on threads
        if self._draws is False and not self._unthreadable:
            self._start_threads()
        elif first:
            self._rng_before = _rng_state(device) if state is None else state
        threaded = self._threads is not None and len(ks) > 0  # none: every candidate of a probe's loop stopped
        made_ms, at = [], 0  # at: the row the model's parameters point at (row 0 between calls, as lent)
        try:
            if threaded:
                self._threaded(item, ks, losses, check)
            else:
                for i, k in enumerate(ks):
                    if i == 2 and first and self._threads_for_the_rest(made_ms):
                        self._threaded(item, ks[2:], losses, check)  # the others on the threads, on their shares
                        threaded = True
                        break
                    if rewind and (i or start):
                        _set_rng_state(device, state)
                    t0 = _wall() if first and i < 2 else None  # the first two candidates' steps, timed
                    point, at = k != at or check or self._copy_grads, k
                    losses[k] = self._candidate(k, self.model, self.slots, rows, item, check, point)
                    if t0 is not None:
                        made_ms.append(1e3 * (_wall() - t0))
                if first and self._draws is None:  # 2 candidates: the threads, if any, from the next call on
                    self._threads_for_the_rest(made_ms)
        finally:
            if at or first or check or self._copy_grads:  # one candidate, row 0's, left them pointed there
                for p, data, grads in rows:
                    p.data, p.grad = data[0], grads[0]
        self._after_threads = threaded  # the threads just started run their first call late: it is not timed
        return torch.stack([losses[k].float() if k in losses else self._nan for k in range(start, self.arena.k)])

    def _zero_dirty(self, start: int = 0) -> None:
        """Zero the grads of the rows from `start` on that were written since their last zeroing (the loop's and
        the batched call's, which mark what they write; every row when not known: the first call, after a probe):
        a stopped candidate's row is zeroed once, at the call after its last, and stays zero (an early-stopped pass
        of 16 MLP candidates with one still running zeroes 1 row a step, not 16). Nothing reads a stopped row's
        grads but the fp16 scaler's finiteness check, which zero passes."""
        k = self.arena.k
        dirty = [True] * k if self._dirty is None else self._dirty
        if not start and all(dirty):
            self.arena.zero_grad()
        else:
            first = None  # runs of consecutive dirty rows: one slice each
            for j in range(start, k + 1):
                d = j < k and dirty[j]
                if d and first is None:
                    first = j
                elif not d and first is not None:
                    self.arena.zero_grad((first, j))
                    first = None
        dirty[start:] = [False] * (k - start)
        self._dirty = dirty

    def _threads_for_the_rest(self, made_ms: list) -> bool:
        """After the first two candidates of the loop's first call, run one after another on all of torch's threads
        as K = 1 steps run (`made_ms`: their steps, ms; the faster, the second's, warm, is the cost of a candidate one
        after another that the threads must beat): True where the loop's threads now run the rest of the call
        (_start_threads), from the next call on at K = 2. No step is run twice: each is a K = 1 step's at the count
        it ran on (the first call's first two on the full count, the others on their share). A candidate that drew
        random numbers (dropout...) rules the threads out: they would draw them in no fixed order; so does a step
        under THREADS_FROM_MS, decided before any thread or replica is made."""
        self._draws = not torch.equal(_rng_state(self.arena.device), self._rng_before)
        if self._draws:
            if self._threads_wanted() > 1:
                self.notes.append(f"the loop runs the {self.arena.k} candidates one after another, not on threads "
                                  "side by side: the model draws random numbers in its forward (dropout...), which "
                                  "threads would draw in no fixed order")  # fmt: skip
            return False
        if not self._threadable():
            return False
        self._one_ms = min(made_ms)
        if self._one_ms < THREADS_FROM_MS:
            self._unthreadable = f"a candidate's step measured {self._one_ms:.2f} ms"
            self.notes.append(f"the loop runs the {self.arena.k} candidates one after another, not on threads: "
                              f"{self._unthreadable} on all of torch's threads, under the {THREADS_FROM_MS:g} ms "
                              "from which threads pay for the whole step")  # fmt: skip
            return False
        self._start_threads()
        return self._threads is not None  # None: the model could not be replicated (the note says so)

    def _keep_threads(self, ms: float) -> None:
        """The loop's threads measured `ms` a candidate in a call that followed one of theirs (after a batched call
        they start late: _Threads): kept only when faster than a candidate one after another on all of torch's
        threads, measured in the first call (models whose steps are mostly Python, a ~1 ms MLP's, gain nothing on
        threads that take turns at the interpreter)."""
        one, n = self._one_ms, len(self._replicas)
        self._thread_ms = ms
        measured = f"measured {ms:.2f} ms a candidate on {n} threads side by side, {one:.2f} one after another"
        if ms < one:
            self.threads_info = f"on {n} threads ({measured})"
            return
        self._unthreadable = measured
        self.close()
        self.notes.append(f"the loop runs the {self.arena.k} candidates one after another: it {measured}")

    def _threaded(self, item, ks: list, losses: dict, check: bool) -> None:
        """The candidates ks on the loop's threads (_each); then a check that nothing drew random numbers (a model
        whose forward draws only from some step on): where something did, the loop runs one candidate after another
        from the next call on (the note says from which)."""
        before, fair = _rng_state(self.arena.device), self._after_threads
        t0 = _wall()

        def run(k: int, model: nn.Module, slots: Slots, rows: list) -> None:
            losses[k] = self._candidate(k, model, slots, rows, item, check)

        self._each(ks, run)
        if fair and self._thread_ms is None and self._one_ms is not None:
            self._keep_threads(1e3 * (_wall() - t0) / len(ks))
        if not torch.equal(_rng_state(self.arena.device), before):
            self._draws = True
            self.close()
            self.notes.append(f"the loop ran the candidates on threads up to call {self._loop_calls}, where the model "
                              "drew random numbers (in no fixed order across the candidates that call); it runs them "
                              "one after another from there")  # fmt: skip

    def _candidate(self, k: int, model: nn.Module, slots: Slots, rows: list, item, check: bool,
                   point: bool = True) -> torch.Tensor:  # fmt: skip
        """Candidate k's forward and backward through `model` (the user's, or a thread's replica) whose parameters
        `rows` lists, pointed at row k first (`point` False: they already are, grads included); its detached loss."""
        split = item[k] if isinstance(item, list) else item
        if point:
            for p, data, grads in rows:
                p.data, p.grad = data[k], grads[k]
        with autocast(self.arena.device, self.precision):
            if self._loop_buffers:
                out = slots.call(model, {}, self._loop_buffers[k], split.args, split.kwargs)
            else:  # nothing to swap: the model itself, as a K = 1 run calls it
                out = model(*split.args, **split.kwargs)
            if self.loss_f is None:
                self.loss_f, self.loss_desc = resolve_loss(self.user_loss_fn, out, split)
            loss = self.loss_f(out, split)
        check_scalar(loss)
        loss = loss.reshape(())
        (loss.float() if self.scaler is None else loss.float() * self.scaler.scale[k]).backward()
        if check or self._copy_grads:
            for p, _, grads in rows:
                if p.grad is not None and p.grad is not grads[k]:  # autograd replaced the preset view
                    grads[k].copy_(p.grad)
                    self._copy_grads = True
        return loss.detach()

    def _start_threads(self) -> None:
        """The loop's threads, at its first call on a CPU arena with torch set to 2 or more threads (again after a
        batched call auto kept hands over to the loop). Each thread calls its own replica of the model (_replica, as
        nn.DataParallel's) with a share of torch's threads (_Threads), so that n threads together use what one K = 1
        step uses: small layers keep one core busy far better than two (LeNet-5, K = 4, the 2-core CPU: 31-32 ms a
        step on 2 threads of 1 against 39-40 one after another on 2). Not where the model has hooks (they would run
        on a replica, on threads) or cannot be replicated: the note says why."""
        if self._threads is not None or not self._threadable():
            return
        n = self._threads_wanted()
        try:
            replicas = [_replica(self.model) for _ in range(n)]
        except Exception as e:  # noqa: BLE001 - a model that cannot be replicated: one call after another
            self._no_threads(f"the model could not be replicated for them ({type(e).__name__}: {first_line(e)})")
            return
        rows = self._rows()
        self._replicas = [(r, Slots(r), [(params[id(p)], d, g) for p, d, g in rows]) for r, params in replicas]
        self._threads = _Threads(n)

    def _threadable(self) -> bool:
        """Whether the loop may run on threads: torch on 2 or more of them, and nothing ruled them out (the model's
        hooks, looked at once; a measurement); a note says why not where the model rules them out."""
        if self._threads_wanted() < 2 or self._unthreadable:
            return False
        if self._unthreadable is None:
            why = _unthreadable(self.model)
            if why:
                self._no_threads(why)
                return False
            self._unthreadable = ""
        return True

    def _no_threads(self, why: str) -> None:
        self._unthreadable = why
        self.notes.append(f"the loop runs the {self.arena.k} candidates one after another, not on "
                          f"{self._threads_wanted()} threads side by side: {why}")  # fmt: skip

    def _threads_wanted(self) -> int:
        """How many threads the loop would run on (1: none; only on a CPU arena)."""
        return min(self.arena.k, torch.get_num_threads()) if self.arena.device.type == "cpu" else 1

    def _each(self, ks: list, fn) -> None:
        """fn(k, model, slots, rows) for each candidate k in ks, shared out among the loop's n threads (one after
        another within a share, fewer threads on a larger share for fewer than n candidates), each calling its
        replica in the caller's grad mode; or, where that measured dearer (_serial), all one after another on the
        calling thread on all of torch's threads."""
        grad, n = torch.is_grad_enabled(), len(self._replicas)
        m = 1 if self._serial(len(ks)) else min(len(ks), n)

        def share(w: int) -> None:
            model, slots, rows = self._replicas[w]
            with torch.set_grad_enabled(grad):
                for k in ks[w::m]:
                    fn(k, model, slots, rows)

        self._threads.run(share, m)

    def _serial(self, live: int) -> bool:
        """Whether `live` candidates (a count the threads do not divide: some stopped) cost less one after another
        on all of torch's threads than in rounds on the threads, at the costs measured (_keep_threads): a round is
        one candidate's step at the share, n x the threads' cost a candidate, and the last round leaves threads
        idle. The char GPT's early-stop grid of 4 on 2 threads, one stopped at step 3: 3 x 65 ms one after another
        against 2 rounds of ~117 (234 ms a step measured). Not a round's pairs on the threads and the candidate left
        over on all of them: the count switched twice a step, which on oneDNN's LSTM and convolutions cost more than
        it saved (the char LSTM and the BatchNorm CNN at K = 4: 0.78-0.84x their K = 1 runs, against 1.02-1.27x)."""
        n, one, on_threads = len(self._replicas), self._one_ms, self._thread_ms
        if not live % n or one is None or on_threads is None:
            return False
        return live * one < -(-live // n) * n * on_threads

    def _all_threads(self):
        """The calling thread on all of torch's threads for a batched call, where the loop's threads hold it to a
        share (auto measuring both)."""
        return contextlib.nullcontext() if self._threads is None else self._threads.all()

    def close(self) -> None:
        """The loop's threads, if any, stopped (the run's end)."""
        if self._threads is not None:
            self._threads.close()
            self._threads, self._replicas = None, []

    def _rows(self) -> list:
        """[(parameter, its view in each candidate's row, its grad view in each row)], made once, with each
        candidate's buffers by name (self._loop_buffers)."""
        if self._loop_rows is None:
            self._loop_buffers = ([{n: b[k] for n, b in self.buffers.items()} for k in range(self.arena.k)]
                                  if self.buffers else [])  # fmt: skip
            self._loop_rows = []
            for seg in self.arena.segments:
                data = [seg.views(seg.p, j) for j in range(self.arena.k)]  # per candidate: every parameter's view
                grads = [seg.views(seg.g, j) for j in range(self.arena.k)]
                self._loop_rows += [(p, [d[i] for d in data], [g[i] for g in grads]) for i, p in enumerate(seg.params)]
        return self._loop_rows


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loop_note(k: int, why: str) -> str:
    if why.startswith("forward="):  # asked for, or auto's choice: its own reason
        return f"the {k} candidates run as a per-candidate loop (K module calls per step): {why}"
    return (f"the {k} candidates run as a per-candidate loop (K module calls per step, slower than one batched call): "
            f"{why}")


# forward="auto": the modes of the run's first calls, and whether the call is the timed one: a warm-up of each (the
# batched call's first carries one-time costs: imports, vmap's tracing), then a timed call of each, close together
# so that both see the machine's same swings; a timed pair whose ratio is within CLOSE is followed by one more (best
# of 2 each decides). A timed loop call follows a loop call: after a batched call on all of torch's threads, the
# OpenMP threads it woke spin for milliseconds on the cores the loop's threads start on (_Threads)
MEASURE = (("vmap", False, None), ("loop", False, None), ("loop", True, None), ("vmap", True, None))
TIMED_PAIR = (("loop", False, None), *MEASURE[2:])
# after probes that leave the batched call a chance, only it is timed at K (a warm-up, then a timed call) against
# the loop's cost a candidate they measured on K - m candidates each: the digits MLP at K = 16 saves two 15 ms loop
# steps (of ~7 batched) of its 100
AT_K = (("vmap", False, None), ("vmap", True, None))
CLOSE = 1.25
# K >= PROBE_FROM with shared masks: probes first (_probe: m = 1, 2, ... candidates batched, a warm-up and a timed
# call each), so that a batched call that cannot win is not run at full K
PROBE_FROM = 4
# The loop's threads only for candidates whose step takes THREADS_FROM_MS or more (ms, on all of torch's threads):
# below, a whole step measured slower on them though the forward and backward measured faster (the digits MLP,
# ~0.7 ms a candidate on the 2-core Xeon, K = 2: 0.77-0.93x its K = 1 runs on threads, 0.98-1.11x without; LeNet-5,
# 4.4 ms: 1.15-1.18x on threads, 1.01-1.03x without)
THREADS_FROM_MS = 2.0


def _probe_steps(m: int) -> list:
    return [("probe", False, m), ("probe", True, m)]


def _schedule(k: int, randomness: str) -> list:
    """forward="auto"'s measured calls at the start of a run of k candidates: probes on 1 then 2 candidates (more
    where they do not decide: _after_probe) where the others can run in the loop on the same masks, then MEASURE."""
    probes = _probe_steps(1) + _probe_steps(2) if k >= PROBE_FROM and randomness == "same" else []
    return probes + list(MEASURE)


_clock = time.perf_counter  # the measurement's clock (tests give it a fake one)
_wall = time.perf_counter  # the loop threads' measurement's clock (tests give it a fake one)
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching rule"


def _batchable(device: torch.device):
    """The batched call's ops on a CPU arena: scaled_dot_product_attention on its math kernel (the CPU flash kernel
    has no batching rule: vmap runs it once per candidate and warns; the math kernel's ops all batch; same maths,
    other rounding; measured equal speed at 4 candidates of a 2-head toy attention on the 2-core CPU), and linear
    layers and class-index cross-entropy / NLL losses as _Rules computes them (compiled too: Dynamo traces the
    mode)."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    stack.enter_context(_Rules())
    return stack


_LOSS_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


class _Rules(TorchFunctionMode):
    """Two functions computed otherwise inside the batched call on a CPU arena, each to the same values.

    F.cross_entropy and F.nll_loss with class-index targets, no class weights and no label smoothing: as
    log_softmax (cross-entropy) and the ops of torch's own nll_loss_forward decomposition (_nll_loss_forward), which
    vmap runs for nll_loss, without its torch._check, whose first call in a process imports
    torch.fx.experimental.symbolic_shapes and sympy: 0.3 s of a K > 1 run's first step on the 2-core EPYC (a cold
    20-step digits MLP run at K = 8: 0.40 s, 0.04 with this rule; ~0.9 s on the Xeon), which a K = 1 run never pays.
    The same ops on the same values: loss and grads bitwise those of vmap's rule.

    F.linear(x, w, b) with w one of the stacked parameters (batched) and x of 1 or 2 dims, computed as
    (w @ x^T)^T + b. vmap's rule for F.linear runs x @ w^T, whose weight grad comes out transposed
    (memory [K, in, out] for [K, out, in]): its bmm ran at ~55 % of a contiguous one's rate and the grads' copy into
    the arena was a transposing one. As w @ x^T a shared input's layer is one GEMM of x with the K weights stacked
    [K * out, in], every weight grad is one contiguous GEMM, and the next layer's input is contiguous as its x^T.
    The digits MLP, K = 16, batch 64, forward + backward + the grads' copy, 2-core Xeon: 2.95-3.05 ms against
    3.35-3.42 (median of 20 interleaved mins of 10). Inputs of more dims (a transformer's [B, T, C]) are left to
    vmap's rule: their layouts between layers (heads split and merged) would make copies."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.cross_entropy or func is nn.functional.nll_loss:
            out = _class_nll(func is nn.functional.cross_entropy, {**dict(zip(_LOSS_ARGS, args)), **kwargs})
            if out is not None:
                return out
        if func is nn.functional.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dim() in (1, 2) and is_batchedtensor(w):
                out = torch.matmul(w, x.mT if x.dim() == 2 else x)
                out = out.mT if x.dim() == 2 else out
                return out if b is None else out + b
        return func(*args, **kwargs)


def _class_nll(log_softmax: bool, a: dict) -> torch.Tensor | None:
    """_Rules' loss: cross-entropy (`log_softmax`) or NLL of a batched [N, C] or [C] input and an int64 target [N]
    or [] as torch's nll_loss_forward decomposition computes it; None where the call is another kind (class weights,
    label smoothing, probabilities as targets, other target dtypes, autocast, more dims, the legacy size_average /
    reduce), left to vmap's rule."""
    x, t = a.get("input"), a.get("target")
    reduction, ignore = a.get("reduction", "mean"), a.get("ignore_index", -100)
    if not (isinstance(x, torch.Tensor) and isinstance(t, torch.Tensor) and is_batchedtensor(x)):
        return None
    if a.get("weight") is not None or a.get("size_average") is not None or a.get("reduce") is not None:
        return None
    if a.get("label_smoothing", 0.0) != 0.0 or reduction not in ("mean", "sum", "none") or type(ignore) is not int:
        return None
    if x.dim() not in (1, 2) or t.dim() != x.dim() - 1 or t.dtype is not torch.int64:
        return None
    if (x.dim() == 2 and x.shape[0] != t.shape[0]) or torch.is_autocast_enabled(x.device.type):
        return None
    ch = x.dim() - 1
    if log_softmax:
        x = torch.log_softmax(x, ch, x.dtype)  # cross_entropy_loss: nll_loss(log_softmax(input, 1, its dtype))
    valid = t != ignore
    picked = -torch.gather(x, ch, torch.where(valid, t, 0).unsqueeze(ch)).squeeze(ch)
    picked = torch.where(valid, picked, 0)
    if reduction == "none":
        return picked
    return picked.sum() if reduction == "sum" else picked.sum() / valid.sum().to(x)


def _clone_buffers(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    return {n: b.detach().unsqueeze(0).repeat(k, *([1] * b.dim())) for n, b in model.named_buffers()}


def unbatchable(model: nn.Module, k: int, device: torch.device, ops: set = frozenset()) -> str:
    """forward="auto"'s cost model before any measurement: why the batched call cannot serve this model ('' when
    only a measurement can tell). Recurrent layers: aten::lstm / gru / rnn_tanh have no vmap batching rule and, as
    they take a list of weights, no per-candidate fallback either, so the batched call would fail on its first step
    (under a functorch grad transform they decompose into per-candidate kernels instead: the char LSTM of
    bench_candidates took 111-126 ms a step batched against 51-54 ms as a loop at K = 4 on the 2-core CPU).
    2 candidates on a CPU: a batched op costs vmap about twice a plain one's dispatch and 2 candidates halve the ops
    at most, so the batched call measured slower than the loop on every workload of bench_candidates (the digits
    MLP, LeNet-5, the BatchNorm CNN, the char GPT: 1.2-1.9x a step on the 2-core AMD EPYC), and its measurement
    cost a short run more than the loop's K = 1 speed gives back (the MLP's K = 2 run: 0.85x its 2 K = 1 runs).
    Convolutions and attention on a CPU (`ops`: the kinds of layer the memory probe's forward ran): the batched call
    lost to the loop at every K from 2 to 32 on LeNet-5, the BatchNorm CNN and the char GPT, on the 2-core AMD EPYC
    and Xeon alike (vmap's grouped convolutions and batched attention, and K candidates' activations falling out of
    the caches and glibc's heap), and its measurement, the probes' batched calls at 1.2-1.7x a looped step each,
    weighed most in short runs (the char GPT's 20 steps at K = 4: 0.95x its K = 1 runs)."""
    rnn = next((type(m).__name__ for m in model.modules() if isinstance(m, nn.RNNBase)), None)
    if rnn is not None:
        return (f"forward='auto': {rnn} has no vmap batching rule (the batched call would fail on its first step, "
                "its fused kernel taking a list of weights)")
    kinds = [kind for kind in ("convolutions", "attention") if kind in ops]
    if kinds and device.type == "cpu":
        return (f"forward='auto': the model runs {' and '.join(kinds)} on a CPU, where the batched call measured "
                "slower than the loop on every such benchmark model at every K (2-32), run as a loop without "
                "measuring; forward='vmap' forces the batched call")  # fmt: skip
    if k == 2 and device.type == "cpu":
        return ("forward='auto': 2 candidates on a CPU, where a batched call of 2 measured slower than 2 module calls "
                "on every benchmark workload (1.2-1.9x), run as a loop without measuring; forward='vmap' forces "
                "the batched call")
    return ""


def stackable(splits: list[Split]) -> str:
    """'' when the per-candidate batches can be stacked for vmap, else why not."""
    why = stack_difference(splits)
    return f"{why}: seeds run a loop" if why else ""


class _Threads:
    """The calling thread and n - 1 more, for the loop's candidates side by side (a CPU arena), from creation to
    close() each set to 1/n of the threads torch was set to (1/m for a call of m < n candidates), so that together
    they use the cores one K = 1 step uses. The calling thread runs a share of each call, and its own work between
    calls (the optimizer, the tracker) on its share too: left at the full count, its last parallel op before a call
    leaves OpenMP threads spinning on the other cores for milliseconds, which the shares started there wait out
    (measured: the second of 2 threads starting 2-5 ms into a 20 ms LeNet-5 step; 0.3 ms with the calling thread on
    its share).
    torch.set_num_threads in a thread also sets the process-wide count new threads start with: each thread reads its
    own first (initialising it) and sets its share; close() puts the calling thread's and the process's back."""

    def __init__(self, n: int):
        self.total = torch.get_num_threads()
        self.share = share = max(1, self.total // n)
        ready = threading.Barrier(n, timeout=60)

        def start() -> None:
            torch.get_num_threads()  # this thread's count initialised, before set_num_threads changes the default
            torch.set_num_threads(share)
            ready.wait()

        self.pool = ThreadPoolExecutor(n - 1, thread_name_prefix="lrfast-loop")
        torch.set_num_threads(share)
        try:
            started = [self.pool.submit(start) for _ in range(n - 1)]  # each blocks at the barrier: n - 1 threads
            ready.wait()
            for f in started:
                f.result()
        except BaseException:
            self.close()
            raise

    def run(self, fn, n: int) -> None:
        """fn(0) on the calling thread and fn(1) ... fn(n - 1) on the others, side by side, each on 1/n of torch's
        threads (fewer calls than threads, once candidates stop: a larger share each); returns once all are done,
        raising the first failure."""
        share = max(1, self.total // n)

        def on_share(w: int) -> None:
            if torch.get_num_threads() != share:
                torch.set_num_threads(share)
            fn(w)

        others = [self.pool.submit(on_share, w) for w in range(1, n)]
        try:
            on_share(0)
        finally:
            self.share = share  # the calling thread's count until the next call
            wait(others)
        for f in others:
            f.result()

    @contextlib.contextmanager
    def all(self):
        """The calling thread on the full count meanwhile (a batched call between the loop's)."""
        torch.set_num_threads(self.total)
        try:
            yield
        finally:
            torch.set_num_threads(self.share)

    def close(self) -> None:
        torch.set_num_threads(self.total)
        self.pool.shutdown(wait=False, cancel_futures=True)


def _replica(model: nn.Module) -> tuple[nn.Module, dict[int, nn.Parameter]]:
    """A copy of the model for one of the loop's threads, made as nn.DataParallel's replicate makes its replicas:
    each module copied (attributes shared, its own parameter, buffer and child dicts; RNNs their own flat-weight
    lists), each parameter a new Parameter over the same data (the loop points it at a candidate's row), tied ones
    tied again, each buffer the same tensor (the loop swaps a candidate's in for the call). Returns it and
    {id(the model's parameter): the replica's}."""
    copies: dict[int, nn.Module] = {}
    params: dict[int, nn.Parameter] = {}

    def copy(m: nn.Module) -> nn.Module:
        if id(m) not in copies:
            r = copies[id(m)] = m._replicate_for_data_parallel()
            for name, p in m._parameters.items():
                if p is None:
                    r._parameters[name] = None
                    continue
                if id(p) not in params:
                    params[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
                setattr(r, name, params[id(p)])  # setattr: an RNN's flat-weight list follows
            r._modules = {name: None if c is None else copy(c) for name, c in m._modules.items()}
        return copies[id(m)]

    return copy(model), params


def _unthreadable(model: nn.Module) -> str:
    """Why the loop's threads cannot serve this model ('' when they can)."""
    from torch.nn.modules import module as nn_module

    if any((nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks, nn_module._global_backward_hooks,
            nn_module._global_backward_pre_hooks)):  # fmt: skip
        return "module hooks are registered globally (they would run on the threads)"
    for name, m in model.named_modules():
        if type(m).__name__ == "OptimizedModule":  # torch.compile's wrapper calls the module it wraps, not a replica
            return f"{name or 'the model'} is compiled (torch.compile); pass the module itself"
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return f"{name or 'the model'} has hooks (they would run on a replica, on threads)"
    for name, p in model.named_parameters():
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            return f"parameter {name} has hooks (a replica's parameters would not run them)"
    return ""
