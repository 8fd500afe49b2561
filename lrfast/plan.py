"""Plan: every decision of a run, made once, before anything of the user's is touched (but the chunk size, which
needs the first cached batch): the device, K and this rank's candidates, the optimizer path and its kernels, the LR
table and the batch orders, the engine (graphed / compiled / eager, with its one reason) and the chunk size.
Nothing downstream decides again."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lrfast import distributed as _distributed
from lrfast import optimizers, peers, schedule, strategies
from lrfast.engine import memory
from lrfast.engine.arena import backend_for
from lrfast.engine.forward import unbatchable
from lrfast.engine.loop import NotStatic, StaticInputs
from lrfast.options import FindOptions


@dataclass
class Engine:
    """How one chunk's steps run: compiled and / or captured on the device counter (static inputs), or eager."""

    compile: bool = False
    graphs: bool = False
    static: StaticInputs | None = None  # set when the steps run on the device counter (drive_graph)
    notes: list[str] = field(default_factory=list)  # why compile / graphs are off, when asked for


@dataclass
class Plan:
    model: nn.Module  # a DistributedDataParallel model's module
    opts: FindOptions
    device: torch.device
    dist_mode: str  # "ddp" | "candidates" | "off"
    first: int  # this rank runs candidates [first, end)
    end: int
    optimizer: optimizers.OptimizerPlan
    backend: str  # the fused kernels ("cpp" | "reference" | "triton"), or "torch.optim" on the generic path
    table: np.ndarray  # [K, S] LR of candidate k at step t
    orders: np.ndarray  # [K, S] the cached batch candidate k trains on at step t
    compile: bool  # asked for (None resolved: on for CUDA)
    graphs: bool
    why_not_graphs: str  # '' when a fused step on this device can be captured
    check_every: int  # host reads of the alive mask: every step on CPU (cheap), every 10 on CUDA (no sync)
    chunk: int = 0  # candidates per pass (fit)
    memory: dict = field(default_factory=dict)  # the estimate behind the chunk size (fit)
    ops: set = field(default_factory=set)  # the kinds of layer its forward ran (fit; memory.KINDS)
    notes: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.opts.k

    @property
    def steps(self) -> int:
        return self.opts.steps

    @classmethod
    def build(cls, model: nn.Module, opts: FindOptions) -> Plan:
        """Every decision that needs only the model and the options; raises the argument errors that need them."""
        model = _distributed.unwrap(model)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={type(model).__name__} is not a torch.nn.Module; pass the model to train")
        device = _resolve_device(model, opts.device)
        if opts.graphs and device.type != "cuda":
            raise ValueError(f"graphs=True needs a CUDA device (the model is on {device}); pass graphs=None or False, "
                             "or move the model to a GPU")  # fmt: skip
        cuda = device.type == "cuda"
        dist_mode = _distributed.resolve(opts.distributed, opts.timeout)
        first, end = _shard(dist_mode, opts.k, device)
        optimizer = optimizers.resolve(opts.optimizer, model)
        if optimizer.kind == "generic":
            backend, why_not_graphs = "torch.optim", ""
        else:
            backend, why_triton = backend_for(optimizer.kind, device)
            why_not_graphs = _why_not_graphs(device, backend, why_triton)
        notes = list(optimizer.notes)
        lo, hi = _start(opts, optimizer, notes), float(opts.max_lr)
        if opts.strategy == "grid":
            table = schedule.grid(lo, hi, opts.k, opts.steps, opts.lrs)
        elif opts.like is not None:
            table = np.ascontiguousarray(np.broadcast_to(peers.sweep(opts.like, lo, hi, opts.steps, opts.mode),
                                                         (opts.k, opts.steps)))  # fmt: skip
        else:
            table = schedule.table(lo, hi, opts.steps, opts.mode, k=opts.k)
        return cls(model, opts, device, dist_mode, first, end, optimizer, backend, table,
                   strategies.orders(opts.strategy, opts.k, opts.steps, opts.seed),
                   cuda if opts.compile is None else opts.compile, cuda if opts.graphs is None else opts.graphs,
                   why_not_graphs, 10 if cuda else 1, notes=notes)  # fmt: skip

    def fit(self, first_batch, batch_bytes: int = 0) -> None:
        """The chunk size: how many of this rank's candidates one pass may hold (a probe step measures one; K = 1
        without max_memory skips it, and so does a CPU loop: memory.chunk_size), next to the `batch_bytes` of cached
        batches held on the device; a distributed run then agrees on it (api._agree)."""
        mine, o = self.end - self.first, self.opts
        looped = o.forward == "loop" or (o.forward == "auto" and bool(unbatchable(self.model, mine, self.device)))
        self.chunk, self.memory = memory.chunk_size(self.model, self.optimizer, first_batch, o.loss_fn, self.device,
                                                    mine, o.max_memory, batch_bytes, self.ops,
                                                    loop=mine > 1 and looped)  # fmt: skip

    def engine(self, index: np.ndarray | None, why_loop: str, splits: list, host: bool = False) -> Engine:
        """The engine of a chunk whose step t trains on splits[index[t]] (index [S], or [S, K] with one batch per
        candidate; None: per-candidate micro-batches); `why_loop`: why its candidates run as a loop ('' if not);
        `host`: the batches are in host memory (cache="host"), copied into the static buffers before each step."""
        if not (self.compile or self.graphs):
            return Engine()
        why = self._why_eager(index, why_loop)
        static = None
        if not why:
            try:
                static = StaticInputs(splits, torch.tensor(np.ascontiguousarray(index), device=self.device),
                                      host=host)  # fmt: skip
            except NotStatic as e:
                why = f"the batches cannot be replayed: {e}"
        if why:
            return Engine(notes=[f"compile and CUDA graphs off, eager steps: {why}"])
        if self.graphs and self.why_not_graphs:
            return Engine(self.compile, False, static, [f"CUDA graphs off: {self.why_not_graphs}"])
        return Engine(self.compile, self.graphs, static)

    def _why_eager(self, index, why_loop: str) -> str:
        """Why the step cannot run on the device counter ('' when it can)."""
        if self.optimizer.kind == "generic":
            return f"{self.optimizer.optimizer_class} runs through torch.optim (its step reads LRs on the host)"
        if index is None:
            return "seeds with accumulate > 1 give every candidate its own micro-batches"
        return why_loop


def _start(opts: FindOptions, optimizer: optimizers.OptimizerPlan, notes: list[str]) -> float:
    """The sweep's first LR. like=: the peer sets every param group to the same LR (their ratios are dropped, and
    the notes say so), and the notes list the peer defaults taken; torch-lr-finder starts at the optimizer's lr."""
    if opts.like is None:
        return float(opts.min_lr)
    peer, taken = peers.PEERS[opts.like], dict(opts.peer_defaults)
    lo = opts.min_lr
    if lo is None:
        lo = taken["min_lr"] = optimizer.lr
        if not lo < opts.max_lr:
            raise ValueError(f"like={opts.like!r} starts at the optimizer's lr ({lo!r}), which is not below "
                             f"max_lr={opts.max_lr!r}; pass min_lr=... or a larger max_lr")  # fmt: skip
    if any(g.lr_scale != 1.0 for g in optimizer.groups):
        optimizer.equal_lrs()
        notes.append(f"like={opts.like!r}: every param group trains at the same LR, as {peer.title} sets them "
                     "(lrfast's own test keeps the groups' LR ratios)")  # fmt: skip
    values = ", ".join(f"{k}={v!r}" for k, v in taken.items())
    notes.append(f"like={opts.like!r}: {peer.title}'s range test (schedule, smoothing, stop rule, suggestion"
                 + (", with float32 LRs" if opts.like == "fastai" else "") + ")"
                 + (f"; its defaults {values} (options left at lrfast's defaults take the peer's)" if taken else ""))
    return float(lo)


def _why_not_graphs(device: torch.device, backend: str, why_triton: str | None) -> str:
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run is on {device})"
    if backend != "triton":
        return f"the fused optimizer is not the Triton kernel ({why_triton})"
    return ""


def _shard(dist_mode: str, k: int, device: torch.device) -> tuple[int, int]:
    if dist_mode != "off":
        _distributed.check_backend(dist_mode, device)
    if dist_mode != "candidates":
        return 0, k
    rank, world = _distributed.rank_world()
    if k < world:
        raise ValueError(f"distributed='candidates' with {k} candidate(s) on {world} ranks: every rank needs at "
                         f"least one; pass candidates >= {world}, or distributed='ddp' to share the batches "
                         "instead")  # fmt: skip
    return _distributed.shard(k, world, rank)


def _resolve_device(model: nn.Module, device) -> torch.device:
    first = next(model.parameters(), None)
    model_device = first.device if first is not None else torch.device("cpu")
    if device is None:
        return model_device
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    if device != model_device:
        raise ValueError(
            f"device={str(device)!r} but the model is on {model_device}; move the model first "
            f"(model.to({str(device)!r})) or pass device=None to run where the model is"
        )
    return device
