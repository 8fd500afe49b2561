"""Range tests on torch.distributed: torchrun, or the user's own init_process_group.

- "ddp": every rank trains the same candidates on its own batches (its shard, e.g. from a DistributedSampler, as in
  training). After each backward the arena's flat grad buffer (one per dtype) and the K losses are averaged over the
  ranks, in place on the device with no host read; so every rank applies the same update, tracks the same global
  loss and stops at the same step. The arena starts from rank 0's weights and buffers, as DDP does.
- "candidates": the K candidates are split into contiguous shards, one per rank, each trained on the full batches
  (every rank must read the same ones); the curves are all-gathered at the end.

lrfast's collectives run on a group of its own (new_group with `timeout`), destroyed when find() ends. A rank that
raises destroys it on the way out, which ends its peers' waits at once (gloo: "connection closed by peer"); a rank
that stalls ends them after `timeout`. The ranks that were waiting raise DistributedError, the rank that raised
raises its own error, and every rank restores the user's state (find's `finally`)."""

from __future__ import annotations

import contextlib
import datetime
import math
import numbers

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from lrfast.errors import DistributedError, first_line

MODES = ("ddp", "candidates", "off")


def unwrap(model):
    """A DistributedDataParallel model's module (lrfast averages the grads itself); any other model as it is."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def resolve(distributed, timeout) -> str:
    """The mode: "ddp" / "candidates" / "off"; None means "ddp" when a process group of more than one rank is
    initialized, else "off". Every argument error, before anything is touched."""
    if distributed is not None and distributed not in MODES:
        raise ValueError(f"distributed={distributed!r} is not a mode; use None (auto: 'ddp' under a process group "
                         f"of more than one rank), or one of: {', '.join(map(repr, MODES))}")  # fmt: skip
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds (how long a rank waits for the "
                         "others before raising); e.g. timeout=300")  # fmt: skip
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return "ddp" if initialized and dist.get_world_size() > 1 else "off"
    if distributed != "off" and not initialized:
        raise ValueError(f"distributed={distributed!r} needs an initialized process group: run under torchrun "
                         "(torchrun --nproc_per_node=N train.py) and call torch.distributed.init_process_group() "
                         "before lrfast.find, or pass distributed='off'")  # fmt: skip
    return distributed


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def backend_for(device: torch.device) -> str | None:
    """The default group's backend for `device`'s tensors ("gloo", "nccl"...), None when it has none."""
    config = str(dist.get_backend_config())  # "gloo", or "cpu:gloo,cuda:nccl" when init_process_group() named none
    if ":" in config:
        return dict(part.split(":", 1) for part in config.split(",")).get(device.type)
    return None if config == "nccl" and device.type == "cpu" else config


def check_backend(mode: str, device: torch.device) -> None:
    if backend_for(device) is None:
        raise ValueError(f"distributed={mode!r}: the model is on {device} but the process group has no backend for "
                         f"{device.type} tensors ({dist.get_backend_config()}); init_process_group('gloo') for a "
                         "CPU model, or move the model to the rank's GPU")  # fmt: skip


def shard(k: int, world: int, rank: int) -> tuple[int, int]:
    """Candidates [lo, hi) of `rank`: contiguous, sizes differing by at most one."""
    return rank * k // world, (rank + 1) * k // world


def fingerprint(splits: list) -> list[float]:
    """One number per batch (the float64 sum of its tensors), to tell whether ranks read the same batches."""
    sums = [sum(t.detach().double().sum() for t in pytree.tree_leaves((s.args, s.kwargs, s.target))
                if isinstance(t, torch.Tensor)) for s in splits]  # fmt: skip
    return torch.stack([torch.as_tensor(x, dtype=torch.float64).cpu() for x in sums]).tolist()


class Sync:
    """lrfast's process group and its collectives. Creating one is itself a collective: every rank must."""

    def __init__(self, mode: str, timeout: float, device: torch.device):
        self.mode, self.timeout = mode, float(timeout)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend, self.device = backend_for(device), device
        self.avg = self.backend == "nccl"  # NCCL averages in one op; gloo has no AVG: SUM, then divide in place
        self.group = None
        with self._guard("creating lrfast's process group"):
            self.group = dist.new_group(timeout=datetime.timedelta(seconds=self.timeout))

    def info(self) -> dict:
        return {"mode": self.mode, "world_size": self.world, "rank": self.rank, "backend": self.backend}

    def agree(self, k: int, steps: int, params: int, batches: list[float], chunk: int) -> tuple[int, list[str]]:
        """Check that every rank runs the same test (candidates, steps, parameters; in candidates mode the same
        batches); returns the chunk size to use (ddp: the smallest any rank can hold) and notes."""
        mine = {"candidates": k, "steps": steps, "parameters": params, "batches": batches, "chunk": chunk}
        seen = self.gather("checking that every rank runs the same test", mine)
        for key in ("candidates", "steps", "parameters"):
            for r, other in enumerate(seen):
                if other[key] != seen[0][key]:
                    raise ValueError(f"distributed={self.mode!r}: rank {r} has {key}={other[key]} but rank 0 has "
                                     f"{seen[0][key]}; every rank must call lrfast.find with the same model and "
                                     "arguments")  # fmt: skip
        same = all(other["batches"] == seen[0]["batches"] for other in seen)
        if self.mode == "candidates":
            if not same:
                r = next(r for r, other in enumerate(seen) if other["batches"] != seen[0]["batches"])
                raise ValueError(f"distributed='candidates': rank {r} read other batches than rank 0; in candidates "
                                 "mode every rank trains its candidates on the same full batches: give every rank "
                                 "the same loader (no DistributedSampler), or use distributed='ddp' to train on "
                                 "per-rank shards")  # fmt: skip
            return chunk, []
        notes = []
        if same:
            notes.append(
                f"distributed='ddp': all {self.world} ranks read the same batches, so the curve is that "
                "of one rank's batch size; shard the data (DistributedSampler) to test the global batch"
            )
        return min(other["chunk"] for other in seen), notes

    def broadcast_start(self, arena, model: nn.Module) -> None:
        """Every rank's arena and buffers (the private clones lent to the model) start from rank 0's."""
        with self._guard("broadcasting rank 0's weights and buffers"):
            for t in [seg.p for seg in arena.segments] + list(model.buffers()):
                dist.broadcast(t, src=0, group=self.group)

    def average(self, arena, loss: torch.Tensor) -> torch.Tensor:
        """After a backward: the grads (one call per grad buffer, normally one) and the losses [K] become their
        mean over the ranks, in place, no host read."""
        with self._guard("averaging the grads and losses over the ranks"):
            for buf in arena.grad_buffers.values():
                self._mean(buf)
            return self._mean(loss)

    def mean_(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """`t` becomes its mean over the ranks, in place."""
        with self._guard(what):
            return self._mean(t)

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.avg:
            dist.all_reduce(t, op=dist.ReduceOp.AVG, group=self.group)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            t.div_(self.world)
        return t

    def all_true(self, flag: bool, what: str) -> bool:
        """True on every rank when `flag` is True on every rank (a fallback decided on one rank, taken by all)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        with self._guard(what):
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def gather(self, what: str, obj) -> list:
        """Every rank's `obj` (picklable), in rank order."""
        out = [None] * self.world
        with self._guard(what):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        """Destroy lrfast's group and drop it: a peer still waiting on this rank gets an error now, not after
        the timeout."""
        group, self.group = self.group, None
        if group is not None:
            dist.destroy_process_group(group)

    @contextlib.contextmanager
    def _guard(self, what: str):
        try:
            yield
        except RuntimeError as e:  # DistBackendError, DistStoreError...: a peer closed the connection or timed out
            first = first_line(e)[:300] or type(e).__name__
            raise DistributedError(
                f"lrfast distributed={self.mode!r}, rank {self.rank} of {self.world}: {what} failed after waiting "
                f"at most timeout={self.timeout:g} s: {first}. Another rank most likely raised (its own error is "
                "the cause: check every rank's log) or did not get here in time (a slow loader, other arguments); "
                "the user's state is restored on this rank"
            ) from e
