"""lrfast.find: options -> plan -> snapshot -> cached batches -> chunks of candidates -> result; the user's state is
restored in `finally`, whatever happens inside."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lrfast import distributed as _distributed
from lrfast import suggest as _suggest
from lrfast.errors import OutOfMemoryError  # noqa: F401 - raised by find, importable from here
from lrfast.options import FindOptions
from lrfast.plan import Plan
from lrfast.result import LRFindResult
from lrfast.run import ChunkResult, Data, run_chunks
from lrfast.state import Snapshot, seed_all


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
    like: str | None = None,
    forward: str = "auto",
    cache: str = "auto",
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

    `like` ("lightning" | "fastai" | "torch_lr_finder") reproduces that peer's range test instead of lrfast's own:
    its LR schedule, loss smoothing, curve length (the peers do not stop on a NaN loss), suggestion rule and its
    arithmetic, and its defaults for the options left at lrfast's defaults (min_lr, max_lr, early_stop_threshold,
    smooth, suggestion; a value equal to lrfast's default counts as left; torch-lr-finder starts at the optimizer's
    lr); every param group then trains at the same
    LR, as the peers set them. On the same model, weights, batches and optimizer the curve and suggestion are the
    peer's to float rounding (fastai returns float32 LRs, and so does like="fastai"). result.info["notes"] lists
    the defaults taken; lrfast.peers has the table of what differs.

    `candidates` K > 1 trains K copies side by side on the same cached batches, in one batched pass (vmap over
    stacked weights; a per-candidate loop where vmap can't serve the model: result.info["forward"] says which):
    - strategy="seeds" (default K 8): K replicas of the sweep, replica k seeing the batches in its own order (drawn
      from (seed, k)) and its own dropout masks (drawn from one generator, so they depend on K; deterministic for a
      given (seed, K)). result.suggestion is the median of the replicas' suggestions, result.interval the
      10th-90th percentile; the plot draws the median curve, the band and the interval.
    - strategy="grid" (default K 8): K fixed LRs, log-spaced from min_lr to max_lr or given as `lrs=[...]`, each
      trained `steps` steps from the same weights; score = mean raw loss over the last 10 % of the steps (inf when
      diverged); result.suggestion = the largest LR whose score <= best + `tolerance` x |best|. Candidate k's
      curve is that of a K = 1 run at its LR, whatever K (dropout masks are shared by all candidates at a step),
      within rounding under vmap (a few ulp over the first steps; training can amplify it later: README) and
      bitwise in the per-candidate loop (on its threads: a K = 1 run at the share of torch's threads).
    `forward`: how K > 1 candidates run: "vmap" (one batched call over stacked weights), "loop" (K plain calls of
    the model per step; on CPU side by side on threads, each calling a replica of the model on a share of torch's
    threads, kept where a candidate's step takes 2 ms or more and they measure faster, not for models drawing random
    numbers or with hooks), or "auto" (default): recurrent models and, on CPU, models running convolutions or
    attention and any 2 candidates run as a loop at once (where the batched call measured slower on every benchmark
    model);
    otherwise the run's first steps measure both (a warm-up step of each, then a timed step of each, and one more
    timed pair when the two are within 1.25x; their seconds in
    result.timings["forward_choice"]), and the batched call is kept only when it measured faster, else the rest run
    as a loop, which runs each candidate at the K = 1 step's speed; with K >= 4
    candidates sharing batches (grid, sweep), steps batching the first 1, 2, ... candidates (the others looped) come
    first, and a batched call whose cost a candidate does not fall fast enough to win at K is never run at K; eager only
    (compiled or captured, the batched call runs). result.info["forward"] says which ran and what was measured.
    The two give the same curves to rounding (seeds with dropout: other masks); pass "vmap" or "loop" for results
    that do not depend on a timing.
    A candidate that diverges is frozen (LR 0, losses NaN from then on); the run stops when every one has. On CPU
    a grid's stopped candidates are no longer computed, as K separate runs each end at their stop: the loop skips
    them, the batched call runs the rows up to the last one still running, and "auto" hands a batched call over to
    the loop once that is cheaper (with a note). Seeds compute every replica (leaving one out would change the
    dropout masks of those after it).
    `max_memory` (bytes; default half the host's available memory, 80 % of a GPU's free memory) splits K into
    chunks run one after another when the estimated bytes per candidate (weights, grads, optimizer state,
    activations of one probe step) do not fit; result.info says so. Without max_memory a CPU run whose candidates
    run as a loop (forward="loop", or "auto" where it loops at once) makes no probe step: the loop holds one
    candidate's activations at a time, as a K = 1 run does, so only the candidates' weights, grads, optimizer state
    and buffers count (result.info["memory"] lists no activations). With dropout, seeds' masks then depend on
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

    `cache`: where the S cached batches live. "device": all on the device up front (fastest for small data; the
    graphed engine stacks them once more: about 2 x S x the batch's bytes). "host": in pinned host memory, each
    step's batch copied into the device buffers just before its step (the graphed engine: outside the captured
    step; eager: on a side stream, one step ahead), so the device holds a few batches. "auto" (default): the device
    when twice their bytes fit in a quarter of its free memory, the host otherwise; on CPU the batches are in host
    memory either way. result.info["cache"] says which and how many bytes; the memory estimate behind max_memory
    counts the batches held on the device.
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
    opts = FindOptions(**{name: value for name, value in locals().items() if name not in ("model", "loader", "t0")})
    plan = Plan.build(model, opts)
    snap = Snapshot(plan.model)
    sync = None
    try:
        if plan.dist_mode != "off":
            sync = _distributed.Sync(plan.dist_mode, opts.timeout, plan.device)  # a collective: every rank gets here
        seed_all(opts.seed)
        data = Data.cache(loader, plan)
        plan.fit(data.first, data.device_bytes)
        if sync is not None:
            _agree(plan, data, sync)
        mine = plan.end - plan.first
        if plan.chunk < mine:
            plan.notes.append(f"max_memory: {mine} candidates need ~{plan.memory['per_candidate'] * mine / 2**20:.1f} "
                              f"MiB, {plan.memory['budget'] / 2**20:.1f} MiB allowed: run in chunks of {plan.chunk}")
        t_setup = time.perf_counter()
        shown = opts.progress and (sync is None or sync.rank == 0)
        with _progress_bar(shown, opts.steps * -(-mine // plan.chunk)) as bar:
            done = run_chunks(plan, snap, data, bar, sync)
        if plan.dist_mode == "candidates":  # every rank gets the full [K, S] result, in rank order
            mine_timings = done.timings  # this rank's seconds, not the sum over the ranks
            parts = sync.gather("gathering the candidates' curves", done)
            done = parts[0]
            for part in parts[1:]:
                done = done.merge(part)
            done.timings = mine_timings
    finally:
        try:
            if sync is not None:
                sync.close()  # first: a peer still waiting on this rank gets an error now, not after the timeout
        finally:
            snap.restore()
    timings = {"setup": t_setup - t0, **done.timings}  # steps, and compile / capture apart from them where they ran
    timings["total"] = time.perf_counter() - t0
    return _result(plan, data, done, sync, timings)


def _agree(plan: Plan, data: Data, sync) -> None:
    """Every rank runs the same test; ddp: the smallest chunk any rank can hold; candidates: the same batches."""
    params = sum(p.numel() for g in plan.optimizer.groups for p in g.params)
    seen = data.micro[:1] if plan.dist_mode == "ddp" else data.micro + (data.val or [])
    plan.chunk, notes = sync.agree(plan.k, plan.steps, params, _distributed.fingerprint(seen), plan.chunk)
    plan.notes += notes


def _result(plan: Plan, data: Data, done: ChunkResult, sync, timings: dict) -> LRFindResult:
    o, forward = plan.opts, list(dict.fromkeys(done.forward))
    info = {
        "strategy": o.strategy,
        "candidates": plan.k,
        "device": str(plan.device),
        "optimizer": plan.optimizer.optimizer_class,
        "optimizer_path": done.path,
        "compile": done.compiled,
        "graphs": done.graphs,
        "forward": "; ".join(forward),
        "loss": done.loss,
        "params": sum(p.numel() for g in plan.optimizer.groups for p in g.params),
        "notes": list(dict.fromkeys(plan.notes + data.notes + done.notes)),
        "cache": {"mode": data.mode, "bytes": data.nbytes, "on_device": data.device_bytes},
    }
    if sync is not None:
        info["distributed"] = sync.info()
        if plan.dist_mode == "candidates":
            info["distributed"]["shards"] = [list(_distributed.shard(plan.k, sync.world, r)) for r in range(sync.world)]
    if plan.memory:
        info["memory"], info["chunk"] = plan.memory, plan.chunk
    result = LRFindResult(plan.table, done.losses, done.smoothed, done.steps_run, method=o.suggestion,
                          timings=timings, info=info, strategy=o.strategy, tolerance=float(o.tolerance),
                          val_losses=done.val if o.val_loader is not None else None, on=o.on, runs=done.runs,
                          like=o.like)  # fmt: skip
    why = result.why_no_suggestion()
    if why:
        info["notes"].append(why)
    if o.like is None and o.suggestion in _suggest.POOR_ON_LRFAST_CURVES and o.strategy != "grid":
        info["notes"].append(
            f"suggestion={o.suggestion!r} picks poorly on lrfast's curves: mean regret "
            f"{_suggest.POOR_ON_LRFAST_CURVES[o.suggestion]:.1f} (validation loss over the best's, relative) in "
            "lrfast's benchmarks/results/cpu/quality.md, against 0.34 for valley, the default; like=<its peer> runs "
            "the peer's own test, where the method belongs")
    return result


def _progress_bar(progress: bool, steps: int):
    from tqdm.auto import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal, so logs and CI output stay clean
    return tqdm(total=steps, desc="lrfast", unit="step", leave=False, disable=None if progress else True)
