"""Memory: the bytes one candidate needs (weights, grads, optimizer state, buffers, the grads vmap returns, the
activations of one probe step), the budget a run may use, how many candidates fit in one pass, and what an
out-of-memory error says."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lrfast.batches import Split
from lrfast.engine.arena import Arena
from lrfast.loss import explain_arity, resolve_loss
from lrfast.state import Slots, forked_rng


def estimate_bytes(model: nn.Module, arena: Arena, split: Split, loss_fn, ops: set | None = None) -> dict[str, int]:
    """Bytes one candidate needs: weights, grads, optimizer state (arena), buffers, the grads vmap returns before
    they are copied into the arena, and the activations autograd saves in one probe forward (measured with
    saved_tensors_hooks; the RNG and the model are left as they were). `ops`: a set that gets the kinds of layer
    the forward ran that forward="auto"'s cost model looks at (KINDS: "convolutions", "attention")."""
    seen: dict[int, int] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    leaves = {names[id(p)]: v.detach().clone().requires_grad_()
              for seg in arena.segments for p, v in zip(seg.params, seg.views(seg.p, 0))}  # fmt: skip
    own = {v.data_ptr() for v in leaves.values()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    seen_ops = _Kinds(ops) if ops is not None else contextlib.nullcontext()
    with forked_rng(arena.device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen_ops:
        out = explain_arity(Slots(model).call, split, model, leaves, buffers, split.args, split.kwargs)  # 1st call
        loss_f, _ = resolve_loss(loss_fn, out, split)
        loss = loss_f(out, split)
    grads = sum(v.nbytes for v in leaves.values())
    return {
        "arena": arena.nbytes_per_candidate,
        "buffers": sum(b.nbytes for b in buffers.values()),
        "grads_out": grads,
        "activations": sum(seen.values()) + (loss.nbytes if isinstance(loss, torch.Tensor) else 0),
    }


# torch functions by the kind of layer they are (estimate_bytes' `ops`)
KINDS = {f: "convolutions" for f in (torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d,
                                    torch.conv_transpose2d, torch.conv_transpose3d)}  # fmt: skip
KINDS.update({nn.functional.scaled_dot_product_attention: "attention",
              nn.functional.multi_head_attention_forward: "attention"})  # fmt: skip


class _Kinds(TorchFunctionMode):
    """Adds to `ops` the KINDS of the torch functions called under it."""

    def __init__(self, ops: set):
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = KINDS.get(func)
        if kind:
            self.ops.add(kind)
        return func(*args, **(kwargs or {}))


def available_bytes(device: torch.device) -> int:
    """A safe budget: half of the host's available memory (MemAvailable), 80 % of a GPU's free memory."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2


def chunk_size(model, plan, split, loss_fn, device, k, max_memory, batch_bytes: int = 0,
               ops: set | None = None, loop: bool = False) -> tuple[int, dict]:  # fmt: skip
    """How many candidates one pass may hold next to the `batch_bytes` of cached batches the device holds (they come
    out of the budget). K = 1 without max_memory: no probe (the fast path stays as it was). `ops`: estimate_bytes'.
    `loop`: the K candidates will run as a per-candidate loop on a CPU (forward='loop', or auto's cost model says so
    whatever the probe would see: a recurrent model, 2 candidates). Without max_memory that needs no probe either: the
    loop holds one candidate's activations at a time (one per thread), as a K = 1 run does, so only the arena's K rows
    and the buffer clones grow with K, and those are known without a forward (the probe's was 5-25 ms of set-up on
    the char LSTM and GPT, a K = 2 run's whole margin over 2 K = 1 runs)."""
    if k == 1 and max_memory is None:
        return 1, {}
    arena = Arena(plan, 1, device)
    if loop and max_memory is None and device.type == "cpu":
        parts = {"arena": arena.nbytes_per_candidate, "buffers": sum(b.nbytes for b in model.buffers())}
    else:
        parts = estimate_bytes(model, arena, split, loss_fn, ops)
    per = sum(parts.values())
    budget = int(max_memory) if max_memory is not None else available_bytes(device)
    fit = min(k, (budget - batch_bytes) // per)
    if fit < 1:
        detail = ", ".join(f"{name} {v / 2**20:.2f} MiB" for name, v in parts.items())
        held = (f" next to the {batch_bytes / 2**20:.1f} MiB of cached batches on {device} (cache='host' keeps them "
                "in host memory)" if batch_bytes else "")  # fmt: skip
        raise ValueError(f"max_memory={max_memory!r}: one candidate needs ~{per} bytes ({detail}), more than the "
                         f"{budget} bytes allowed{held}; pass max_memory >= {per + batch_bytes}, or None for a safe "
                         "fraction of the free memory")  # fmt: skip
    return int(fit), {**parts, "per_candidate": per, "budget": budget, "batches": batch_bytes}


def oom_message(e: BaseException, device, steps: int, accumulate: int, memory: dict, held: int | None = None) -> str:
    """`held`: the bytes of cached batches on the device (default: the estimate's)."""
    estimate = (f" (estimated ~{memory['per_candidate'] / 2**20:.1f} MiB per candidate)" if memory.get("per_candidate")
                else "")  # fmt: skip
    held = memory.get("batches", 0) if held is None else held
    where = (f"The batches of all steps ({steps * accumulate} now, {held / 2**20:.1f} MiB) are cached on {device} up "
             "front: pass cache='host' to keep them in pinned host memory (each step's batch is copied in), fewer "
             "steps or smaller batches" if held else
             "The batches are in host memory (only a few on the device): pass smaller batches")  # fmt: skip
    return (
        f"out of memory on {device} with a single candidate{estimate}: {type(e).__name__}: {str(e)[:300]}; nothing "
        f"fits, not even one candidate at a time. {where}, use a smaller model, or free memory on the device "
        "(max_memory only caps the candidates run together, and 1 is the floor)"
    )
