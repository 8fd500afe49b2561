"""Batches: take S of them from any iterable (cycling a short loader), move them to the device once, split each
into model inputs and target, and check that they share one structure (lrfast/loss.py turns outputs into losses)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate


def cache(loader: Iterable, n: int, device: torch.device, name: str = "loader", cycle: bool = True,
          pin: bool = False) -> list[Split]:  # fmt: skip
    """The first `n` batches of `loader` (argument `name`), on `device` (`pin`: in pinned host memory, for copies
    to a GPU that do not block), split for the model and checked to share one structure: what a run trains (or
    validates) on. cycle=False: at most one pass (a validation set shorter than `n` gives each of its batches once,
    not batch 0 twice)."""
    splits = [split(to_device(b, device, pin)) for b in take(loader, n, name, cycle)]
    check_consistent(splits, name, _where_batches_come_from(loader, name))
    return splits


def _where_batches_come_from(loader: Iterable, name: str) -> str:
    """What to check when batches differ: a DataLoader's dataset (and its collate_fn, when it has its own)."""
    if isinstance(loader, DataLoader):
        custom = loader.collate_fn is not default_collate
        return f"check the dataset{' and the collate_fn' if custom else ''} of {name}"
    return f"check the batches {name} yields"


def take(loader: Iterable, steps: int, name: str = "loader", cycle: bool = True) -> list[Any]:
    """The first `steps` batches of `loader`, re-iterating it (a new epoch) as often as needed (cycle=False: one
    pass at most, so fewer when the loader is shorter).

    A DataLoader over a TensorDataset with the default collate is read by indexing the dataset's tensors with each
    batch's indices: the same batches, bitwise, and the same RNG draws as iterating it, without the per-sample
    fetch + collate (~0.25 ms per batch of 64 on the 2-core CPU, a third of a digits-MLP step)."""
    if isinstance(loader, (torch.Tensor, Mapping)) or not isinstance(loader, Iterable):
        raise TypeError(
            f"{name}={type(loader).__name__} is not an iterable of batches; pass a DataLoader or a list of "
            "(inputs, targets) batches"
        )
    epoch = _tensor_dataset_epoch if _is_plain_tensor_loader(loader) else iter
    batches: list[Any] = []
    while len(batches) < steps:
        before = len(batches)
        for batch in epoch(loader):
            batches.append(batch)
            if len(batches) == steps:
                break
        if not cycle and batches:
            break
        if len(batches) == before:
            if before == 0:
                raise ValueError(f"{name} is empty: it yielded no batch; pass a loader with at least one batch")
            raise ValueError(
                f"{name} yielded {before} batches once and none when iterated again (a one-shot generator?); "
                f"pass a re-iterable loader (a DataLoader or a list) or one with at least steps={steps} batches"
            )
    return batches


def _is_plain_tensor_loader(loader: Any) -> bool:
    return (
        type(loader) is DataLoader
        and type(loader.dataset) is TensorDataset
        and loader.collate_fn is default_collate
        and loader.batch_sampler is not None
    )


def _tensor_dataset_epoch(loader: DataLoader):
    # The order of RNG draws copies DataLoader.__iter__ (torch/utils/data/dataloader.py, _BaseDataLoaderIter):
    # the batch-sampler iterator is made, then one int64 is drawn for the workers' base seed, then the sampler
    # draws its own seed on the first batch. Same draws -> same shuffle as iterating the loader.
    sampler_iter = iter(loader.batch_sampler)
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    tensors = loader.dataset.tensors
    for indices in sampler_iter:
        index = torch.as_tensor(indices, dtype=torch.int64)
        yield [t[index] for t in tensors]


def to_device(batch: Any, device: torch.device, pin: bool = False) -> Any:
    """The batch with every tensor moved to `device` (structure kept); `pin`: CPU tensors in pinned memory."""
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch.pin_memory() if pin and not batch.is_pinned() else batch
        if device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device).pin_memory() if pin else batch.to(device)
    if isinstance(batch, Split):
        return Split(*(to_device(v, device, pin) for v in (batch.args, batch.kwargs, batch.target)))
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, pin) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, pin) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, pin) for v in batch)
    return batch


def nbytes(batches: Any) -> int:
    """The bytes of every tensor in `batches` (any nesting of Splits, lists, dicts)."""
    return sum(x.nbytes for x in pytree.tree_leaves(batches) if isinstance(x, torch.Tensor))


@dataclass(frozen=True)
class Split:
    """One batch as the model sees it: model(*args, **kwargs); target for the loss (None when there is none)."""

    args: tuple
    kwargs: dict
    target: Any


# a pytree node, so a step's inputs (a Split, or lists of them) flatten to their tensors (engine/loop.py stacks
# them for replay)
pytree.register_pytree_node(Split, lambda s: ([s.args, s.kwargs, s.target], None), lambda c, _: Split(*c),
                            serialized_type_name="lrfast.batches.Split")  # fmt: skip

def split(batch: Any) -> Split:
    """(x, y) / [x, y] -> model(x), target y; (x1, x2, y) -> model(x1, x2), target y; dict -> model(**batch);
    a tensor -> model(tensor) with no target."""
    if isinstance(batch, torch.Tensor):
        return Split((batch,), {}, None)
    if isinstance(batch, Mapping):
        return Split((), dict(batch), None)
    if isinstance(batch, (list, tuple)) and len(batch) >= 1:
        if len(batch) == 1:
            return Split((batch[0],), {}, None)
        return Split(tuple(batch[:-1]), {}, batch[-1])
    raise TypeError(
        f"a batch of type {type(batch).__name__} is not supported; batches must be (inputs, targets) tuples or lists, "
        "dicts of model keyword arguments, or tensors"
    )


def stack_difference(items: list) -> str:
    """'' when every item (a Split, or lists of them) has the structure, tensor shapes and dtypes and non-tensor
    values of the first, so that the items can be stacked into one tensor per leaf; else the first difference."""
    first, spec = pytree.tree_flatten(items[0])
    for u, item in enumerate(items[1:], start=1):
        leaves, other = pytree.tree_flatten(item)
        if other != spec:
            return f"batch {u} differs in structure from batch 0"
        for a, b in zip(first, leaves):
            if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor) or (
                isinstance(a, torch.Tensor) and (a.shape != b.shape or a.dtype != b.dtype)
            ):
                return f"batch {u} differs in shape or dtype from batch 0 (a short last batch?)"
            if not isinstance(a, torch.Tensor) and a != b:
                return f"batch {u} has a non-tensor value that differs from batch 0's ({b!r} vs {a!r})"
    return ""


def stack(items: list):
    """Items of one structure (stack_difference(items) == '') -> one item of that structure whose tensors are the
    items' stacked along a new dim 0 (non-tensor values are the first item's)."""
    first, spec = pytree.tree_flatten(items[0])
    columns = [pytree.tree_flatten(item)[0] for item in items]
    return pytree.tree_unflatten([torch.stack([c[i] for c in columns]) if isinstance(x, torch.Tensor) else x
                                  for i, x in enumerate(first)], spec)  # fmt: skip


def check_consistent(splits: list[Split], name: str = "loader", advice: str = "") -> None:
    """Before training: every cached batch must have the structure of batch 0 (the same positional / keyword inputs
    and target, nested alike) and, leaf by leaf, the same kind (tensor or not), dtype and number of dims; floating
    point tensors (features, pixels) also the same sizes past dim 0. Dim 0 may differ (a DataLoader's smaller last
    batch), also where it is the length of a list of per-sample items (a list whose items share one structure is
    compared as one item), and so may the later dims of integer / bool tensors (token ids and masks padded per
    batch). A mismatch
    raises a ValueError naming `name`, the batch index and what differs, instead of a shape error mid-run."""
    if len(splits) < 2:
        return
    ref_layout, ref_leaves = _layout(splits[0]), _leaves(splits[0])
    for i, s in enumerate(splits[1:], start=1):
        layout, leaves = _layout(s), _leaves(s)
        why = ""
        if layout != ref_layout:
            why = f"it feeds the model {layout}, batch 0 {ref_layout}"
        elif [path for path, _ in leaves] != [path for path, _ in ref_leaves]:
            why = (f"its nested structure differs: leaves {[path for path, _ in leaves]}, batch 0 "
                   f"{[path for path, _ in ref_leaves]}")  # fmt: skip
        else:
            for (path, x), (_, r) in zip(leaves, ref_leaves):
                why = _leaf_difference(path, x, r)
                if why:
                    break
        if why:
            raise ValueError(
                f"{name}: batch {i} differs from batch 0: {why}; every batch must have the same structure, dtypes and "
                f"sizes except the batch size (dim 0): {advice or 'check the batches ' + name + ' yields'}"
            )


def _layout(s: Split) -> str:
    parts = [f"{len(s.args)} positional input{'s' if len(s.args) != 1 else ''}"] if s.args else []
    if s.kwargs:
        parts.append(f"keyword inputs {sorted(map(str, s.kwargs))}")
    parts.append("a target" if s.target is not None else "no target")
    return ", ".join(parts)


def _leaves(s: Split) -> list[tuple[str, Any]]:
    out = []
    named = [(f"input {i}", a) for i, a in enumerate(s.args)] + [(f"input {k!r}", v) for k, v in s.kwargs.items()]
    for prefix, tree in named + [("target", s.target)]:
        leaves, _ = pytree.tree_flatten_with_path(_fold(tree))
        out += [(prefix + pytree.keystr(path), x) for path, x in leaves]
    return out


def _fold(tree: Any) -> Any:
    """`tree` with every list whose items share one structure replaced by its first item's (folded) structure: such
    a list holds one item per sample (a custom collate), and its length is the batch size, which may differ."""
    if isinstance(tree, Mapping):
        return {k: _fold(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return type(tree)(*map(_fold, tree)) if hasattr(tree, "_fields") else tuple(map(_fold, tree))
    if isinstance(tree, list):
        items = [_fold(x) for x in tree]
        specs = {_spec_key(x) for x in items}
        return [items[0]] if len(specs) == 1 else items
    return tree


def _spec_key(tree: Any) -> str:
    leaves, spec = pytree.tree_flatten(tree)
    kinds = ",".join(f"T{x.dim()}{x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves)
    return f"{spec}|{kinds}"


def _leaf_difference(path: str, x: Any, ref: Any) -> str:
    if isinstance(x, torch.Tensor) != isinstance(ref, torch.Tensor):
        return f"{path} is a {type(x).__name__}, in batch 0 a {type(ref).__name__}"
    if not isinstance(x, torch.Tensor):
        return ""
    if x.dtype != ref.dtype:
        return f"{path} is {x.dtype}, in batch 0 {ref.dtype}"
    if x.dim() != ref.dim():
        return f"{path} has {x.dim()} dims {list(x.shape)}, in batch 0 {ref.dim()} dims {list(ref.shape)}"
    if x.is_floating_point() and x.shape[1:] != ref.shape[1:]:
        return f"{path} has shape {list(x.shape)}, in batch 0 {list(ref.shape)} (sizes past dim 0 differ)"
    return ""


class Feed:
    """cache="host" on the eager path: items[t] (host, pinned on CUDA) moved to `device` when step t asks for it.
    On CUDA the next item is copied ahead on a side stream (non-blocking from pinned memory, ordered by an event the
    step's stream waits on; its tensors are marked as used by that stream, so the allocator does not hand their
    memory out early): the device holds the step's batch and the next one. On CPU the items are used as they are."""

    def __init__(self, items: list, device: torch.device):
        self.items, self.device = items, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: tuple | None = None  # (t, item on the device, event)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, t: int):
        if self.stream is None:
            return to_device(self.items[t], self.device)
        t_ahead, item, event = self.ahead if self.ahead is not None and self.ahead[0] == t else self._copy(t)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for x in pytree.tree_leaves(item):
            if isinstance(x, torch.Tensor):
                x.record_stream(current)
        self.ahead = self._copy(t + 1) if t + 1 < len(self.items) else None
        return item

    def _copy(self, t: int) -> tuple:
        with torch.cuda.stream(self.stream):
            item = to_device(self.items[t], self.device)
            event = torch.cuda.Event()
            event.record(self.stream)
        return t, item, event
