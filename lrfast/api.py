"""lrfast.find: validate -> snapshot -> batches -> arena -> run -> result; the user's state restored in `finally`."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from lrfast import batches as _batches
from lrfast import distributed as _distributed
from lrfast import optimizers, schedule, strategies
from lrfast import suggest as _suggest
from lrfast.engine import amp, graphed, runner, update
from lrfast.engine import memory as _memory
from lrfast.engine.arena import Arena
from lrfast.engine.forward import Accumulate, BatchedStep, ModuleStep, stackable
from lrfast.engine.tracker import Tracker
from lrfast.errors import OutOfMemoryError, is_oom
from lrfast.result import LRFindResult
from lrfast.state import Snapshot, capture_rng, restore_rng, seed_all


def find(
    model: nn.Module,
    loader: Iterable,
    *,
    optimizer="adamw",
    loss_fn: Callable | None = None,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    steps: int = 100,
    mode: str = "exp",
    smooth: float = 0.98,
    early_stop_threshold: float | None = 4.0,
    suggestion: str = "valley",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    candidates: int | None = None,
    strategy: str = "sweep",
    lrs=None,
    tolerance: float = 0.05,
    max_memory: int | None = None,
    accumulate: int = 1,
    val_loader: Iterable | None = None,
    val_batches: int = 4,
    val_every: int = 10,
    on: str = "train",
    precision: str = "fp32",
    distributed: str | None = None,
    timeout: float = 300.0,
    compile: bool | None = None,
    graphs: bool | None = None,
) -> LRFindResult:
    """Run an LR range test on `model` with batches from `loader` and return the curve and a suggested LR.

    The LR grows from `min_lr` to `max_lr` over `steps` steps (`mode` "exp" or "linear", both endpoints hit); the
    loss is smoothed by a debiased EMA (`smooth`) and the test stops when the smoothed loss exceeds
    `early_stop_threshold` x its best (None: never) or is not finite. `optimizer` is "sgd" / "adam" / "adamw"
    (torch defaults), a torch.optim.Optimizer on the model's parameters (its class, hyper-parameters and param
    groups are used, its state is not touched), or a callable params -> Optimizer. Without `loss_fn`, the loss is
    the model output's `.loss`, or cross-entropy for integer targets, MSE for float targets. `suggestion` picks the
    method of `result.suggestion` (see lrfast.suggest). `seed` seeds every RNG during the run (shuffling,
    dropout) so the same call gives the same curve.

    `candidates` K > 1 trains K copies side by side on the same cached batches, in one batched pass (vmap over
    stacked weights; a per-candidate loop where vmap can't serve the model: result.info["forward"] says which):
    - strategy="seeds" (default K 8): K replicas of the sweep, replica k seeing the batches in its own order (drawn
      from (seed, k)) and its own dropout masks (drawn from one generator, so they depend on K; deterministic for a
      given (seed, K)). result.suggestion is the median of the replicas' suggestions, result.interval the
      10th-90th percentile; the plot draws the median curve, the band and the interval.
    - strategy="grid" (default K 8): K fixed LRs, log-spaced from min_lr to max_lr or given as `lrs=[...]`, each
      trained `steps` steps from the same weights; score = mean raw loss over the last 10 % of the steps (inf when
      diverged); result.suggestion = the largest LR whose score <= best + `tolerance` x |best|. Candidate k's
      curve is that of a K = 1 run at its LR, whatever K (dropout masks are shared by all candidates at a step).
    A candidate that diverges is frozen (LR 0, losses NaN from then on); the run stops when every one has.
    `max_memory` (bytes; default half the host's available memory, 80 % of a GPU's free memory) splits K into
    chunks run one after another when the estimated bytes per candidate (weights, grads, optimizer state,
    activations of one probe step) do not fit; result.info says so. With dropout, seeds' masks then depend on
    the chunk size too. A chunk of K > 1 that runs out of memory while it sets up or in its first step is run
    again in chunks of half the size, down to 1 (the same curves; result.info["notes"] says so); when even one
    candidate does not fit, lrfast.api.OutOfMemoryError (a torch.OutOfMemoryError and a MemoryError) says what to
    change.

    `val_loader`: the first `val_batches` batches are cached and every candidate is scored on them (eval mode, no
    grad, training unchanged) after the update of every `val_every`-th step; `result.val_losses` holds them and
    `on="val"` makes the suggestion use them instead of the smoothed training loss.
    `precision`: "fp32", or "bf16" / "fp16" autocast around the forward (fp32 weights and optimizer state); fp16
    keeps one dynamic loss scale per candidate, so an overflow skips only that candidate's step.
    `accumulate=N` averages the grads and losses of N micro-batches per step (N x steps batches are taken): the
    same as one step on their concatenation for a mean-reduced loss.

    `distributed` (under torchrun or after torch.distributed.init_process_group; a DistributedDataParallel model's
    module is used): "ddp" (default when the group has more than one rank) trains the same candidates on every rank,
    each on its own batches (shard the loader, e.g. a DistributedSampler), averaging grads and losses over the ranks
    every step: the curve of the global batch, the same result on every rank. "candidates" splits the K candidates
    over the ranks (at least one each), every rank reading the same batches, and gathers the full [K, S] result on
    every rank. "off" ignores the group. A rank waits at most `timeout` seconds for the others; when one raises or
    stalls, the others raise lrfast.distributed.DistributedError. With "ddp" an out-of-memory error is not retried
    with fewer candidates (every rank would have to): pass max_memory. result.info["distributed"] says the mode,
    world size and rank.

    `compile` (default: True on CUDA): torch.compile the forward + backward (a compile that fails falls back to eager,
    said in result.info["notes"]). `graphs` (default: True on CUDA; needs CUDA and Triton): the whole step of all K
    candidates (forward + backward, fused Triton optimizer kernel reading the LR table at a device step counter, loss
    bookkeeping) is captured once in a CUDA graph and replayed; the host reads the alive mask every 10 steps without
    blocking. Where capture can't serve (a host sync in the model, a torch.optim-only optimizer, batches of different
    shapes), the run is eager, and result.info["notes"] says why. result.timings holds compile and capture apart from
    the steady-state "steps".

    The model's parameters, grads, buffers, training flags, the optimizer and the torch / numpy / python RNG states
    are bitwise unchanged afterwards, also after an exception or Ctrl-C. No file is written."""
    t0 = time.perf_counter()
    model = _distributed.unwrap(model)
    _check_args(model, loss_fn, min_lr, max_lr, steps, mode, smooth, early_stop_threshold, suggestion, seed, progress)
    k = strategies.check(strategy, candidates, lrs, tolerance)
    _check_val(val_loader, val_batches, val_every, on)
    if precision not in amp.PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; use one of: {', '.join(amp.PRECISIONS)}")
    if isinstance(accumulate, bool) or not isinstance(accumulate, numbers.Integral) or accumulate < 1:
        raise ValueError(f"accumulate={accumulate!r} must be an integer >= 1 (micro-batches averaged per step); "
                         "e.g. accumulate=4")  # fmt: skip
    if max_memory is not None and (not _is_real(max_memory) or not max_memory > 0):
        raise ValueError(f"max_memory={max_memory!r} must be a positive number of bytes, or None for a safe "
                         "fraction of the free memory; e.g. max_memory=2**30")  # fmt: skip
    device = _resolve_device(model, device)
    compile, graphs = _check_engine(compile, graphs, device)
    dist_mode = _distributed.resolve(distributed, timeout)
    first, end = 0, k  # the candidates this rank runs
    if dist_mode != "off":
        _distributed.check_backend(dist_mode, device)
    if dist_mode == "candidates":
        rank, world = _distributed.rank_world()
        if k < world:
            raise ValueError(f"distributed='candidates' with {k} candidate(s) on {world} ranks: every rank needs at "
                             f"least one; pass candidates >= {world}, or distributed='ddp' to share the batches "
                             "instead")  # fmt: skip
        first, end = _distributed.shard(k, world, rank)
    plan = optimizers.resolve(optimizer, model)
    if strategy == "grid":
        table = schedule.grid(float(min_lr), float(max_lr), k, steps, lrs)
    else:
        table = schedule.table(float(min_lr), float(max_lr), steps, mode, k=k)
    orders = strategies.orders(strategy, k, steps, seed)

    snap = Snapshot(model)
    notes, forward, engine, engine_time = [], [], [], {}
    losses, smoothed, val_losses = (np.full((k, steps), np.nan) for _ in range(3))
    steps_run, sync = 0, None
    try:
        if dist_mode != "off":
            sync = _distributed.Sync(dist_mode, timeout, device)  # a collective: every rank gets here
        seed_all(seed)
        micro = _batches.cache(loader, steps * accumulate, device)
        # splits[t]: what step t trains on: one batch, or with accumulate=N a list of N micro-batches
        splits = micro if accumulate == 1 else [micro[t * accumulate : (t + 1) * accumulate] for t in range(steps)]
        rng = capture_rng()
        val = None if val_loader is None else _batches.cache(val_loader, val_batches, device, "val_loader", cycle=False)
        if val is not None and len(val) < val_batches:
            notes.append(f"val_loader has {len(val)} batch(es), fewer than val_batches={val_batches}: each is scored "
                         "once")  # fmt: skip
        mine = end - first
        chunk, memory = _memory.chunk_size(model, plan, micro[0], loss_fn, device, mine, max_memory)
        if sync is not None:
            params = sum(p.numel() for g in plan.groups for p in g.params)
            # ddp: the first batch tells whether the ranks read shards; candidates: every batch must be the same
            seen = micro[:1] if dist_mode == "ddp" else micro + (val or [])
            chunk, more = sync.agree(k, steps, params, _distributed.fingerprint(seen), chunk)
            notes += more
        if chunk < mine:
            notes.append(f"max_memory: {mine} candidates need ~{memory['per_candidate'] * mine / 2**20:.1f} MiB, "
                         f"{memory['budget'] / 2**20:.1f} MiB allowed: run in chunks of {chunk}")  # fmt: skip
        t_setup = time.perf_counter()
        shown = progress and (sync is None or sync.rank == 0)
        with _progress_bar(shown, steps * math.ceil(mine / chunk)) as bar:
            lo = first
            while lo < end:
                hi = min(end, lo + chunk)
                snap.unlend()  # the next arena copies the user's weights, not the last chunk's
                restore_rng(rng)  # every chunk starts from the same RNG state, as a run of its own would
                started = [0]
                try:
                    out = _run_chunk(model, plan, snap, splits, table[lo:hi], orders[lo:hi], strategy, loss_fn,
                                     device, smooth, early_stop_threshold, bar, accumulate, val, val_every,
                                     precision, started, sync if dist_mode == "ddp" else None, compile,
                                     graphs)  # fmt: skip
                    oom = ""
                except Exception as e:
                    if not is_oom(e) or started[0] > 1:  # only an OOM while setting up or in the first step
                        raise
                    if hi - lo == 1:
                        raise OutOfMemoryError(_memory.oom_message(e, device, steps, accumulate, memory)) from e
                    if dist_mode == "ddp":
                        raise OutOfMemoryError(f"out of memory on {device} with {hi - lo} candidates in one pass: "
                                               "distributed='ddp' cannot retry with fewer (every rank would have "
                                               "to); pass max_memory=... to run fewer at a time") from e  # fmt: skip
                    oom = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                if oom:  # outside the except block: the failed chunk's tensors (held by the traceback) are freed
                    new = max(1, (hi - lo) // 2)
                    notes.append(f"out of memory with {hi - lo} candidates in one pass ({oom}): retried in chunks "
                                 f"of {new}")  # fmt: skip
                    bar.total += steps * (math.ceil((end - lo) / new) - math.ceil((end - lo) / chunk))
                    chunk = new
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                losses[lo:hi], smoothed[lo:hi], val_losses[lo:hi] = out["losses"], out["smoothed"], out["val"]
                steps_run = max(steps_run, out["steps_run"])
                forward.append(out["forward"])
                engine.append(out)
                for key, value in out["timings"].items():
                    engine_time[key] = engine_time.get(key, 0.0) + value
                notes += [n for n in out["notes"] if n not in notes]
                lo = hi
        t_steps = time.perf_counter()
        if dist_mode == "candidates":
            part = {
                "rows": (first, end),
                "losses": losses[first:end],
                "smoothed": smoothed[first:end],
                "val": val_losses[first:end],
                "steps_run": steps_run,
                "forward": forward,
                "notes": notes,
            }
            forward, notes = [], []
            for got in sync.gather("gathering the candidates' curves", part):  # rank order: the same on every rank
                a, b = got["rows"]
                losses[a:b], smoothed[a:b], val_losses[a:b] = got["losses"], got["smoothed"], got["val"]
                steps_run = max(steps_run, got["steps_run"])
                forward += got["forward"]
                notes += [n for n in got["notes"] if n not in notes]
    finally:
        try:
            if sync is not None:
                sync.close()  # first: a peer still waiting on this rank gets an error now, not after the timeout
        finally:
            snap.restore()

    info = {
        "strategy": strategy,
        "candidates": k,
        "device": str(device),
        "optimizer": plan.optimizer_class,
        "optimizer_path": "generic torch.optim" if plan.kind == "generic" else f"fused {engine[0]['backend']}",
        "compile": all(e["compiled"] for e in engine),
        "graphs": all(e["graphs"] for e in engine),
        "forward": forward[0] if len(set(forward)) == 1 else "; ".join(dict.fromkeys(forward)),
        "loss": out["loss"],
        "params": sum(p.numel() for g in plan.groups for p in g.params),
        "notes": plan.notes + notes,
    }
    if sync is not None:
        info["distributed"] = sync.info()
        if dist_mode == "candidates":
            info["distributed"]["shards"] = [list(_distributed.shard(k, sync.world, r)) for r in range(sync.world)]
    if memory:
        info["memory"] = memory
        info["chunk"] = chunk
    timings = {"setup": t_setup - t0, **engine_time}  # compile / capture apart from the steps, where they ran
    if "steps" not in engine_time:
        timings["steps"] = t_steps - t_setup
    timings["total"] = time.perf_counter() - t0
    result = LRFindResult(table, losses, smoothed, steps_run, method=suggestion, timings=timings, info=info,
                          strategy=strategy, tolerance=float(tolerance),
                          val_losses=val_losses if val_loader is not None else None, on=on)  # fmt: skip
    why = result.why_no_suggestion()
    if why:
        info["notes"].append(why)
    return result


def _run_chunk(model, plan, snap, splits, table, orders, strategy, loss_fn, device, smooth, threshold, bar,
               accumulate, val, val_every, precision, started=None, sync=None, compile=False,
               graphs=False) -> dict:  # fmt: skip
    """One pass over `steps` steps for the candidates of `table` [c, S]: K = 1 on the model itself (ModuleStep),
    K > 1 batched; with accumulate = N, splits[t] is a list of N micro-batches, averaged by Accumulate.
    `started[0]` counts the steps begun, so that the caller knows whether an error came from the first one.
    `sync` (ddp): the arena and buffers start from rank 0's, grads and losses are averaged every step.
    `compile` / `graphs`: the step runs through engine/graphed.py (torch.compile, CUDA graph capture and replay)
    where it can; where it cannot, eagerly through engine/runner.py, with the reason in the notes."""
    c, steps = table.shape
    arena = Arena(plan, c, device)
    snap.lend(arena.segments, device)
    if sync is not None:
        sync.broadcast_start(arena, model)
    model.train()
    notes, generic, built = [], None, []
    scaler = amp.Scaler(c, device) if precision == "fp16" else None
    shared = c == 1 or strategy != "seeds"
    flat = splits if accumulate == 1 else [s for group in splits for s in group]
    why_loop = "" if shared else stackable(flat)

    def make_step(compiled: bool):
        if c == 1:
            inner = ModuleStep(model, arena, loss_fn, precision, scaler, compile=compiled)
        else:
            inner = BatchedStep(model, arena, loss_fn, randomness="same" if shared else "different",
                                        why_loop=why_loop, precision=precision, scaler=scaler,
                                        compile=compiled)  # fmt: skip
        built.append(inner)
        step = Accumulate(inner, arena) if accumulate > 1 else inner
        return step if started is None else _Counted(step, started)

    if c == 1:
        inputs, index = [splits[i] for i in orders[0]], orders[0]
    elif shared:
        inputs, index = splits, np.arange(steps)
    elif accumulate == 1:
        inputs, index = [[splits[i] for i in orders[:, t]] for t in range(steps)], orders.T
    else:  # micro-batch i of step t: one per candidate, from that candidate's batch order
        inputs, index = [[[splits[i][m] for i in orders[:, t]] for m in range(accumulate)] for t in range(steps)], None
    tracker = Tracker(c, steps, smooth, threshold, device)
    lr_table = torch.tensor(table.T, dtype=torch.float64, device=device).contiguous()  # [S, K]: row t contiguous
    static, timings = None, {}
    if compile or graphs:
        why = _why_eager(plan, index, why_loop)
        if not why:
            try:
                static = graphed.StaticInputs(splits, torch.tensor(np.ascontiguousarray(index), device=device))
            except graphed.NotStatic as e:
                why = f"the batches cannot be replayed: {e}"
        if why:
            notes.append(f"compile and CUDA graphs off, eager steps: {why}")
        elif graphs and (why := graphed.why_not_graphs(device, arena)):
            notes.append(f"CUDA graphs off: {why}")
            graphs = False
    if static is not None:
        def buffers(step):  # noqa: E306 - the mutable non-arena tensors of the step last built
            return list(model.buffers()) if c == 1 else list(built[-1].buffers.values())

        out = graphed.run(make_step, compile, arena, static, lr_table, tracker, graphs=graphs, buffers=buffers,
                          bar=bar, check_every=10 if device.type == "cuda" else 1, val=val, val_every=val_every,
                          scaler=scaler, sync=sync)  # fmt: skip
        steps_run, timings, compiled, graphed_ = out["steps_run"], out["timings"], out["compiled"], out["graphs"]
        notes += out["notes"]
    else:
        step = make_step(False)
        if plan.kind == "generic" and c > 1:
            generic = update.candidate_optimizers(plan, arena)
        steps_run = runner.run(step, arena, plan, inputs, lr_table, tracker, bar, generic=generic, val=val,
                               val_every=val_every, scaler=scaler, sync=sync)  # fmt: skip
        compiled = graphed_ = False
    inner = built[-1]
    notes += getattr(inner, "notes", [])
    if c == 1:
        forward = "module (K=1)"
        if inner.copy_grads:
            notes.append("grads copied into the arena (autograd replaced the preset .grad)")
    else:
        forward = f"vmap (K={c})" if inner.mode == "vmap" else f"loop (K={c}): {inner.why}"
    if accumulate > 1:
        forward += f", {accumulate} micro-batches per step"
    if precision != "fp32":
        forward += f", {precision} autocast"
    if compiled:
        forward += ", torch.compile"
    if graphed_:
        forward += ", CUDA graph"
    if scaler is not None and bool(scaler.skipped.any()):
        notes.append(f"fp16: steps skipped on overflow per candidate: {scaler.skipped.tolist()}")
    return {"losses": tracker.losses.cpu().numpy(), "smoothed": tracker.smoothed.cpu().numpy(),
            "val": tracker.val.cpu().numpy(), "steps_run": steps_run, "forward": forward, "loss": inner.loss_desc,
            "notes": notes, "timings": timings, "compiled": compiled, "graphs": graphed_,
            "backend": "torch.optim" if plan.kind == "generic" else arena.backend}  # fmt: skip


def _why_eager(plan, index, why_loop: str) -> str:
    """Why the step cannot run through engine/graphed.py ('' when it can)."""
    if plan.kind == "generic":
        return f"{plan.optimizer_class} runs through torch.optim (its step reads LRs on the host)"
    if index is None:
        return "seeds with accumulate > 1 give every candidate its own micro-batches"
    return why_loop


class _Counted:
    """A step that counts the calls begun into started[0] (one per training step)."""

    def __init__(self, step, started: list):
        self.step, self.started = step, started

    def __call__(self, item):
        self.started[0] += 1
        return self.step(item)

    def evaluate(self, splits):
        return self.step.evaluate(splits)


def _check_engine(compile, graphs, device: torch.device) -> tuple[bool, bool]:
    """compile / graphs resolved: None -> on for CUDA, off elsewhere."""
    for name, value in (("compile", compile), ("graphs", graphs)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be True, False or None (None: on for CUDA, off elsewhere)")
    if graphs and device.type != "cuda":
        raise ValueError(f"graphs=True needs a CUDA device (the model is on {device}); pass graphs=None or False, "
                         "or move the model to a GPU")  # fmt: skip
    cuda = device.type == "cuda"
    return (cuda if compile is None else compile), (cuda if graphs is None else graphs)


def _check_val(val_loader, val_batches, val_every, on) -> None:
    for name, value in (("val_batches", val_batches), ("val_every", val_every)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1; e.g. {name}=4")
    if on not in ("train", "val"):
        raise ValueError(f"on={on!r} is not a curve; use 'train' (smoothed training loss) or 'val' (needs val_loader)")
    if on == "val" and val_loader is None:
        raise ValueError("on='val' needs validation losses: pass val_loader=... (its first val_batches batches are "
                         "scored every val_every steps)")  # fmt: skip


def _check_args(model, loss_fn, min_lr, max_lr, steps, mode, smooth, threshold, suggestion, seed, progress) -> None:
    """Every argument error, before anything of the user's is touched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not a torch.nn.Module; pass the model to train")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn={type(loss_fn).__name__} is not callable; pass a function (output, target) -> loss")
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if not _is_real(value) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite positive number, e.g. {name}=1e-7")
    if min_lr <= 0:
        raise ValueError(f"min_lr={min_lr!r} must be > 0 (the sweep is exponential); e.g. min_lr=1e-7")
    if min_lr >= max_lr:
        raise ValueError(f"min_lr={min_lr!r} must be smaller than max_lr={max_lr!r}; swap them or widen the range")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
        raise ValueError(f"steps={steps!r} must be an integer >= 2 (a curve needs points); e.g. steps=100")
    if mode not in schedule.MODES:
        raise ValueError(f"mode={mode!r} is not a schedule; use one of: {', '.join(schedule.MODES)}")
    if not _is_real(smooth) or not 0 <= smooth < 1:
        raise ValueError(f"smooth={smooth!r} must be in [0, 1) (0: no smoothing); e.g. smooth=0.98")
    if threshold is not None and (not _is_real(threshold) or not threshold > 1 or not math.isfinite(threshold)):
        raise ValueError(
            f"early_stop_threshold={threshold!r} must be a number > 1 (stop when the smoothed loss exceeds it x "
            "the best), or None to never stop early; e.g. early_stop_threshold=4.0"
        )
    if suggestion not in _suggest.METHODS:
        raise ValueError(f"suggestion={suggestion!r} is not a method; use one of: {', '.join(_suggest.METHODS)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer; e.g. seed=0")
    if not isinstance(progress, bool):
        raise TypeError(f"progress={progress!r} must be True or False")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _resolve_device(model: nn.Module, device) -> torch.device:
    first = next(model.parameters(), None)
    model_device = first.device if first is not None else torch.device("cpu")
    if device is None:
        return model_device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device; e.g. device='cpu' or 'cuda:0'") from e
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    if device != model_device:
        raise ValueError(
            f"device={str(device)!r} but the model is on {model_device}; move the model first "
            f"(model.to({str(device)!r})) or pass device=None to run where the model is"
        )
    return device


def _progress_bar(progress: bool, steps: int):
    from tqdm.auto import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal, so logs and CI output stay clean
    return tqdm(total=steps, desc="lrfast", unit="step", leave=False, disable=None if progress else True)
