"""Forward and backward of K > 1 candidates in one call: the model called with its parameter slots holding the arena's stacked
parameter views [K, *shape], vmapped, with per-candidate buffer clones (BatchNorm running stats) [K, *shape]; the
gradients are copied into the arena's flat grad buffer for the fused optimizer. Where vmap cannot serve a model
(data-dependent control flow, .item(), unstackable batches...) a per-candidate loop of functional_call +
autograd.grad runs instead; `mode` and `why` say which ran and why. The user's model is never written: its
parameters and buffers are only swapped for the call (state.Slots: every alias, put back also on an exception).

Randomness (dropout): "same" gives every candidate the same masks at a step (grid: a candidate's curve does not
depend on K); "different" gives each its own, all drawn from the one global generator, so candidate k's masks
depend on K (seeds: deterministic for a given (seed, K))."""

from __future__ import annotations

import contextlib
import math
import re
import warnings

import torch
from torch import nn
from torch.func import grad_and_value, vmap
from torch.utils import _pytree as pytree

from lrfast.batches import Split, explain_arity, resolve_loss, stack, stack_difference
from lrfast.engine.amp import autocast
from lrfast.engine.arena import Arena
from lrfast.state import Slots


class BatchedStep:
    def __init__(self, model: nn.Module, arena: Arena, loss_fn, randomness: str = "same", why_loop: str = "",
                 precision: str = "fp32", scaler=None, compile: bool = False):  # fmt: skip
        self.model, self.arena, self.user_loss_fn, self.randomness = model, arena, loss_fn, randomness
        self.precision, self.scaler = precision, scaler
        self.loss_f, self.loss_desc = None, ""
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = [names[id(p)] for seg in arena.segments for p in seg.params]
        self.slots, self.ids = Slots(model), _ids_by_name(model)
        self.p = [v for seg in arena.segments for v in seg.stacked(seg.p)]
        self.g = [v for seg in arena.segments for v in seg.stacked(seg.g)]
        self.buffers = _clone_buffers(model, arena.k)
        self.mode, self.why = ("loop", why_loop) if why_loop else ("vmap", "")
        self.notes = [f"the {arena.k} candidates run as a per-candidate loop (K module calls per step, slower than "
                      f"one batched call): {why_loop}"] if why_loop else []  # fmt: skip
        self.calls = 0
        self.compile = compile
        self._vf = self._compiled(vmap(grad_and_value(self._scaled_loss), in_dims=(0, 0, None, None, None, 0),
                                       randomness=randomness))  # fmt: skip
        self._vf_each = None  # one batch per candidate: built at the first call (in_dims follow the batch)

    def __call__(self, item) -> torch.Tensor:
        """Zero grads, forward + backward of every candidate, grads into the arena; `item` is one Split shared by
        all candidates or a list of K Splits (one per candidate). Returns the detached losses [K]."""
        self.calls += 1
        if self.mode == "vmap":
            try:
                loss = self._vmap(item)
            except Exception as e:  # noqa: BLE001 - any failure on the first call selects the loop
                if self.calls > 1 or is_oom(e) or self.compile:  # out of memory: the caller retries with fewer
                    raise  # candidates; compiled: the caller retries this vmap eagerly (engine/graphed.py)
                first_line = (str(e).strip().splitlines() or [""])[0]  # whole sentences: the first line of it
                self.mode, self.why = "loop", f"vmap failed on the first step: {type(e).__name__}: {first_line}"
                self.notes.append(f"the {self.arena.k} candidates run as a per-candidate loop (K module calls per "
                                  f"step, slower than one batched call): {self.why}")  # fmt: skip
                self.buffers, self.loss_f = _clone_buffers(self.model, self.arena.k), None
                loss = self._loop_first(item)
        else:
            loss = self._loop_first(item) if self.calls == 1 else self._loop(item)
        if self.calls == 1:
            _check_first(loss)
        return loss

    @torch.no_grad()
    def evaluate(self, splits: list[Split]) -> torch.Tensor:
        """Every candidate's mean loss over the cached validation batches, in eval mode; returns [K]."""
        params = dict(zip(self.names, self.p))
        self.model.eval()
        try:
            total = 0
            for s in splits:
                if self.mode == "vmap":
                    f = vmap(self._loss, in_dims=(0, 0, None, None, None), randomness="same")
                    with _batchable_attention(self.arena.device):
                        total = total + f(params, self.buffers, s.args, s.kwargs, s.target)
                else:
                    total = total + torch.stack([
                        self._loss({n: p[k] for n, p in params.items()}, {n: b[k] for n, b in self.buffers.items()},
                                   s.args, s.kwargs, s.target).reshape(()) for k in range(self.arena.k)])  # fmt: skip
        finally:
            self.model.train()
        return total / len(splits)

    def _loss(self, params: dict, buffers: dict, args: tuple, kwargs: dict, target) -> torch.Tensor:
        split = Split(args, kwargs, target)
        with autocast(self.arena.device, self.precision):
            out = self._call(params, buffers, args, kwargs)
            if self.loss_f is None:
                self.loss_f, self.loss_desc = resolve_loss(self.user_loss_fn, out, split)
            return self.loss_f(out, split).float()

    def _call(self, params: dict, buffers: dict, args: tuple, kwargs: dict):
        """The model with these parameters and buffers (by name) in every slot that holds them."""
        ids = self.ids
        return self.slots.call(self.model, {ids[n]: t for n, t in params.items()},
                               {ids[n]: t for n, t in buffers.items()}, args, kwargs)  # fmt: skip

    def _scaled_loss(self, params, buffers, args, kwargs, target, scale) -> torch.Tensor:
        """The loss times the candidate's fp16 loss scale (1 without one): a power of two, so loss / scale is exact."""
        return self._loss(params, buffers, args, kwargs, target) * scale

    def _scales(self) -> torch.Tensor:
        if self.scaler is not None:
            return self.scaler.scale
        return torch.ones(self.arena.k, device=self.arena.device)

    def _vmap(self, item) -> torch.Tensor:
        """The batched call. The first one records PyTorch's "no batching rule for aten::op" warnings into one note
        (each such op runs once per candidate inside the batched step: a slow path); later calls silence them."""
        first = self.calls == 1
        with _batchable_attention(self.arena.device), warnings.catch_warnings(record=first) as caught:
            if first:
                warnings.simplefilter("always")
            else:
                warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)  # said once, in the notes
            loss = self._vmap_call(item)
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

    def _vmap_call(self, item) -> torch.Tensor:
        params = dict(zip(self.names, self.p))
        if isinstance(item, list):  # one batch per candidate: stacked [K, ...], vmapped too
            s = stack(item)
            if self._vf_each is None:
                dims = pytree.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None,
                                       (s.args, s.kwargs, s.target))  # fmt: skip
                self._vf_each = self._compiled(vmap(grad_and_value(self._scaled_loss), in_dims=(0, 0, *dims, 0),
                                                    randomness=self.randomness))  # fmt: skip
            grads, loss = self._vf_each(params, self.buffers, s.args, s.kwargs, s.target, self._scales())
        else:
            grads, loss = self._vf(params, self.buffers, item.args, item.kwargs, item.target, self._scales())
        torch._foreach_copy_(self.g, [grads[n] for n in self.names])
        return loss.detach() / self._scales()

    def _compiled(self, f):
        return torch.compile(f, dynamic=False) if self.compile else f

    def _loop_first(self, item) -> torch.Tensor:
        """The loop's first call: a failure of the model's call signature says how lrfast splits batches."""
        return explain_arity(self._loop, item[0] if isinstance(item, list) else item, item)

    def _loop(self, item) -> torch.Tensor:
        self.arena.zero_grad()  # unused params get no grad here; vmap returns zeros for them and needs no fill
        losses = []
        for k in range(self.arena.k):
            split = item[k] if isinstance(item, list) else item
            leaves = [p[k].detach().requires_grad_() for p in self.p]
            buffers = {n: b[k] for n, b in self.buffers.items()}
            with autocast(self.arena.device, self.precision):
                out = self._call(dict(zip(self.names, leaves)), buffers, split.args, split.kwargs)
                if self.loss_f is None:
                    self.loss_f, self.loss_desc = resolve_loss(self.user_loss_fn, out, split)
                loss = self.loss_f(out, split)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"loss_fn: the loss must be a scalar tensor, got {shape}; reduce it (e.g. .mean()) "
                                 "or use a loss with reduction='mean'")  # fmt: skip
            scale = 1.0 if self.scaler is None else self.scaler.scale[k]
            grads = torch.autograd.grad(loss.reshape(()).float() * scale, leaves, allow_unused=True)
            for g, view in zip(grads, self.g):
                if g is not None:
                    view[k].copy_(g)
            losses.append(loss.detach().float().reshape(()))
        return torch.stack(losses)


_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching rule"


def _batchable_attention(device: torch.device):
    """On CPU, scaled_dot_product_attention under vmap on its math kernel: the CPU flash kernel has no batching
    rule (vmap runs it once per candidate and warns), the math kernel's ops all batch. Same maths, other rounding;
    measured equal speed at 4 candidates of a 2-head toy attention on the 2-core CPU."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error, host or device, as torch raises it."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _ids_by_name(model: nn.Module) -> dict[str, int]:
    """Parameter and buffer names (each tensor's first name, as named_parameters gives it) -> the tensor's id."""
    return {n: id(t) for named in (model.named_parameters(), model.named_buffers()) for n, t in named}


def _clone_buffers(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    return {n: b.detach().unsqueeze(0).repeat(k, *([1] * b.dim())) for n, b in model.named_buffers()}


def stackable(splits: list[Split]) -> str:
    """'' when the per-candidate batches can be stacked for vmap, else why not."""
    why = stack_difference(splits)
    return f"{why}: seeds run a loop" if why else ""


def _check_first(loss: torch.Tensor) -> None:
    values = loss.detach().cpu()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"the loss is {values.tolist()} at the first step, before any update: the model or the data is broken "
            "(not the learning rate); check the inputs for NaN/inf and the model's initialization"
        )


def estimate_bytes(model: nn.Module, arena: Arena, split: Split, loss_fn) -> dict[str, int]:
    """Bytes one candidate needs: weights, grads, optimizer state (arena), buffers, the grads vmap returns before
    they are copied into the arena, and the activations autograd saves in one probe forward (measured with
    saved_tensors_hooks; the RNG and the model are left as they were)."""
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

    ids = _ids_by_name(model)
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = explain_arity(Slots(model).call, split, model, {ids[n]: t for n, t in leaves.items()},
                            {ids[n]: t for n, t in buffers.items()}, split.args, split.kwargs)  # the first call
        loss_f, _ = resolve_loss(loss_fn, out, split)
        loss = loss_f(out, split)
    grads = sum(v.nbytes for v in leaves.values())
    return {
        "arena": arena.nbytes_per_candidate,
        "buffers": sum(b.nbytes for b in buffers.values()),
        "grads_out": grads,
        "activations": sum(seen.values()) + (loss.nbytes if isinstance(loss, torch.Tensor) else 0),
    }


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
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2


def candidate_optimizers(plan, arena: Arena) -> list[torch.optim.Optimizer]:
    """Generic optimizers with K > 1: one private instance of the user's class per candidate, over leaf views of
    that candidate's row of the arena (params and grads), with the user's param groups and hyper-parameters."""
    opt, out = plan.generic, []
    for k in range(arena.k):
        leaf = {}
        for seg in arena.segments:
            for p, pv, gv in zip(seg.params, seg.views(seg.p, k), seg.views(seg.g, k)):
                t = pv.detach()
                t.grad = gv
                leaf[id(p)] = t
        groups = []
        for g in opt.param_groups:
            hyper = {key: v for key, v in g.items() if key != "params"}
            groups.append({**hyper, "params": [leaf[id(p)] for p in g["params"] if id(p) in leaf]})
        try:
            out.append(type(opt)(groups, **opt.defaults))
        except TypeError as e:
            raise NotImplementedError(
                f"optimizer={type(opt).__name__} with candidates > 1: its constructor does not take (groups, "
                f"**defaults) back ({e}); use optimizer='sgd'/'adam'/'adamw', or candidates=1"
            ) from e
    return out


def fits(per_candidate: int, budget: int) -> int:
    return int(budget // per_candidate) if per_candidate > 0 else math.inf
