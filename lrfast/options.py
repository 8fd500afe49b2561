"""FindOptions: every keyword of lrfast.find in one frozen object, checked once, before anything of the user's is
touched. Each field carries its group, its help text and how the command line spells it, so `lrfast find --help`
is generated from here and lists every option find has (but the two that are Python objects: loss_fn and
val_loader, which a target's function returns)."""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from lrfast import peers, schedule, strategies
from lrfast import suggest as _suggest
from lrfast.engine import amp

GROUPS = ("sweep", "stop", "candidates", "validation", "precision", "engine", "distributed")


def _opt(default, group: str, help: str, *, cli: str | None = "", choices=None, parse=None):
    """A field with its group and command-line spelling (cli=None: not on the command line; "" : --name-with-dashes)."""
    meta = {"group": group, "help": help, "cli": cli, "choices": choices, "parse": parse}
    return field(default=default, metadata=meta)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1e-4,1e-3") from e


def _threshold(text: str) -> float | None:
    value = float(text)
    return None if value == 0 else value


@dataclass(frozen=True)
class FindOptions:
    optimizer: Any = _opt("adamw", "sweep", "'sgd' | 'adam' | 'adamw' (torch defaults), a torch.optim.Optimizer on the "
                          "model's parameters, or a callable params -> Optimizer", choices=("sgd", "adam", "adamw"))
    loss_fn: Any = _opt(None, "sweep", "loss_fn(output, target); default: output.loss, cross-entropy for integer "
                        "targets, MSE for float targets", cli=None)
    min_lr: float = _opt(1e-7, "sweep", "first LR of the sweep", parse=float)
    max_lr: float = _opt(10.0, "sweep", "last LR of the sweep", parse=float)
    steps: int = _opt(100, "sweep", "training steps", parse=int)
    mode: str = _opt("exp", "sweep", "LR schedule", choices=schedule.MODES)
    smooth: float = _opt(0.98, "stop", "EMA factor of the loss (debiased; 0: no smoothing)", parse=float)
    early_stop_threshold: float | None = _opt(4.0, "stop", "stop when the smoothed loss exceeds this x the best "
                                              "(command line: 0 = never)", parse=_threshold)
    suggestion: str = _opt("valley", "stop", "suggestion method", choices=tuple(_suggest.METHODS))
    seed: int = _opt(0, "sweep", "seed of every RNG during the run", parse=int)
    like: str | None = _opt(None, "sweep", "reproduce a peer's range test: its schedule, smoothing, stop rule, "
                            "defaults and suggestion (lrfast.peers)", choices=tuple(peers.PEERS))  # fmt: skip
    progress: bool = _opt(True, "sweep", "the progress bar", cli="--no-progress")
    strategy: str = _opt("sweep", "candidates", "sweep: one range test; seeds: K replicas -> median and interval; "
                         "grid: K fixed LRs", choices=strategies.STRATEGIES)
    candidates: int | None = _opt(None, "candidates", "K LR candidates in one pass (seeds and grid; default 8)",
                                  parse=int)
    lrs: Any = _opt(None, "candidates", "grid: the fixed LRs (command line: comma-separated)", parse=_floats)
    tolerance: float = _opt(0.05, "candidates", "grid: the suggestion is the largest LR scoring within this "
                            "(relative) of the best", parse=float)
    forward: str = _opt("auto", "candidates", "how K > 1 candidates run: vmap (one batched call), loop (K calls), "
                        "auto (both measured on the first steps; vmap runs the rest only where it measured faster)",
                        choices=("auto", "vmap", "loop"))  # fmt: skip
    max_memory: int | None = _opt(None, "candidates", "bytes the candidates of one pass may hold (default: a safe "
                                  "fraction of the free memory)", parse=int)
    val_loader: Any = _opt(None, "validation", "validation batches", cli=None)
    val_batches: int = _opt(4, "validation", "validation batches scored", parse=int)
    val_every: int = _opt(10, "validation", "score the validation batches every this many steps", parse=int)
    on: str = _opt("train", "validation", "the curve suggestions use (val: needs validation batches)",
                   choices=("train", "val"))
    precision: str = _opt("fp32", "precision", "fp32, or bf16 / fp16 autocast", choices=tuple(amp.PRECISIONS))
    accumulate: int = _opt(1, "precision", "micro-batches averaged per step", parse=int)
    device: Any = _opt(None, "engine", "torch device (default: where the model is)")
    cache: str = _opt("auto", "engine", "where the cached batches live: device, host (pinned; each step's batch "
                      "copied in), auto (device when they fit in a quarter of its free memory)",
                      choices=("auto", "device", "host"))  # fmt: skip
    compile: bool | None = _opt(None, "engine", "torch.compile the step (default: on for CUDA)",
                                cli="--compile/--no-compile")
    graphs: bool | None = _opt(None, "engine", "capture the step in a CUDA graph and replay it (default: on for CUDA)",
                               cli="--graphs/--no-graphs")
    distributed: str | None = _opt(None, "distributed", "under torchrun: ddp (every rank its own batches, grads "
                                   "averaged), candidates (K split over the ranks) or off; auto (None): ddp with more "
                                   "than one rank", choices=("auto", "ddp", "candidates", "off"))
    timeout: float = _opt(300.0, "distributed", "seconds a rank waits for the others before raising", parse=float)
    k: int = field(init=False, default=1, metadata={"cli": None, "group": "candidates", "help": "K, derived"})
    peer_defaults: dict = field(init=False, default_factory=dict, metadata={"cli": None, "group": "sweep",
                                "help": "like=: the peer's defaults taken, derived"})  # fmt: skip

    def __post_init__(self):
        if self.distributed == "auto":  # the command line's name for None
            object.__setattr__(self, "distributed", None)
        self._take_peer_defaults()
        self._check_sweep()
        self._check_rest()
        object.__setattr__(self, "k", strategies.check(self.strategy, self.candidates, self.lrs, self.tolerance))

    def _take_peer_defaults(self) -> None:
        """like=: the options left at lrfast's defaults take the peer's (min_lr None: torch-lr-finder's start at the
        optimizer's lr, resolved by the plan); `peer_defaults` says which, for the run's notes."""
        if self.like is None:
            return
        peers.check(self.like, self.mode)
        own = {f.name: f.default for f in fields(self)}
        taken = {}
        for name, value in peers.PEERS[self.like].defaults.items():
            if getattr(self, name) == own[name] and value != own[name]:
                taken[name] = value
                object.__setattr__(self, name, None if value is peers.OPTIMIZER_LR else value)
        object.__setattr__(self, "peer_defaults", taken)

    def _check_sweep(self) -> None:
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn={type(self.loss_fn).__name__} is not callable; pass a function (output, target) "
                            "-> loss")  # fmt: skip
        for name in ("min_lr", "max_lr"):
            value = getattr(self, name)
            if value is None and name == "min_lr" and self.peer_defaults.get("min_lr") is peers.OPTIMIZER_LR:
                continue  # like="torch_lr_finder": the optimizer's lr
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite positive number, e.g. {name}=1e-7")
        if self.min_lr is not None and self.min_lr <= 0:
            raise ValueError(f"min_lr={self.min_lr!r} must be > 0 (the sweep is exponential); e.g. min_lr=1e-7")
        if self.min_lr is not None and self.min_lr >= self.max_lr:
            raise ValueError(f"min_lr={self.min_lr!r} must be smaller than max_lr={self.max_lr!r}; swap them or "
                             "widen the range")  # fmt: skip
        _positive_int("steps", self.steps, 2, "(a curve needs points); e.g. steps=100")
        if self.mode not in schedule.MODES:
            raise ValueError(f"mode={self.mode!r} is not a schedule; use one of: {', '.join(schedule.MODES)}")
        if not _is_real(self.smooth) or not 0 <= self.smooth < 1:
            raise ValueError(f"smooth={self.smooth!r} must be in [0, 1) (0: no smoothing); e.g. smooth=0.98")
        t = self.early_stop_threshold
        if t is not None and (not _is_real(t) or not t > 1 or not math.isfinite(t)):
            raise ValueError(
                f"early_stop_threshold={t!r} must be a number > 1 (stop when the smoothed loss exceeds it x the "
                "best), or None to never stop early; e.g. early_stop_threshold=4.0"
            )
        if self.suggestion not in _suggest.METHODS:
            raise ValueError(f"suggestion={self.suggestion!r} is not a method; use one of: "
                             f"{', '.join(_suggest.METHODS)}")  # fmt: skip
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer; e.g. seed=0")
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress={self.progress!r} must be True or False")

    def _check_rest(self) -> None:
        if self.cache not in ("auto", "device", "host"):
            raise ValueError(f"cache={self.cache!r} is not a place for the batches; use 'auto', 'device' (all on the "
                             "device up front) or 'host' (pinned host memory, each step's batch copied "
                             "in)")  # fmt: skip
        if self.forward not in ("auto", "vmap", "loop"):
            raise ValueError(f"forward={self.forward!r} is not a way to run candidates; use 'auto' (measured on the "
                             "first steps), 'vmap' (one batched call) or 'loop' (K calls)")  # fmt: skip
        if self.like is not None and self.strategy == "grid":
            raise ValueError(f"like={self.like!r} reproduces a peer's range test, which grid (K fixed LRs) is not; "
                             "use strategy='sweep' or 'seeds' with like=, or grid without it")  # fmt: skip
        for name in ("val_batches", "val_every"):
            _positive_int(name, getattr(self, name), 1, f"; e.g. {name}=4")
        if self.on not in ("train", "val"):
            raise ValueError(f"on={self.on!r} is not a curve; use 'train' (smoothed training loss) or 'val' (needs "
                             "val_loader)")  # fmt: skip
        if self.on == "val" and self.val_loader is None:
            raise ValueError("on='val' needs validation losses: pass val_loader=... (its first val_batches batches "
                             "are scored every val_every steps)")  # fmt: skip
        if self.precision not in amp.PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported; use one of: "
                             f"{', '.join(amp.PRECISIONS)}")  # fmt: skip
        _positive_int("accumulate", self.accumulate, 1, "(micro-batches averaged per step); e.g. accumulate=4")
        if self.max_memory is not None and (not _is_real(self.max_memory) or not self.max_memory > 0):
            raise ValueError(f"max_memory={self.max_memory!r} must be a positive number of bytes, or None for a safe "
                             "fraction of the free memory; e.g. max_memory=2**30")  # fmt: skip
        for name in ("compile", "graphs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be True, False or None (None: on for CUDA, off elsewhere)")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device={self.device!r} is not a torch device; e.g. device='cpu' or "
                                 "'cuda:0'") from e  # fmt: skip
        if self.distributed is not None and self.distributed not in ("ddp", "candidates", "off"):
            raise ValueError(f"distributed={self.distributed!r} is not a mode; use None (auto: 'ddp' under a process "
                             "group of more than one rank), or one of: 'ddp', 'candidates', 'off'")  # fmt: skip
        if not _is_real(self.timeout) or not 0 < self.timeout < math.inf:
            raise ValueError(f"timeout={self.timeout!r} must be a positive number of seconds (how long a rank waits "
                             "for the others before raising); e.g. timeout=300")  # fmt: skip


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive_int(name: str, value, least: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name}={value!r} must be an integer >= {least} {hint}".replace(" ;", ";"))


# --- the command line, generated from the fields ---


def add_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """One flag per option with a command-line spelling, in argparse groups named after the option groups;
    `defaults` override FindOptions' (the demo's seed workload sweeps 1e-8 -> 1 with Adam)."""
    groups = {g: parser.add_argument_group(f"{g} options") for g in GROUPS}
    for f in fields(FindOptions):
        meta = f.metadata
        if meta["cli"] is None or not f.init:
            continue
        default = defaults.get(f.name, f.default)
        shown = "" if default is None else f" (default {default})"
        group = groups[meta["group"]]
        if meta["cli"] == "--no-progress":
            group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        elif "/" in meta["cli"]:
            group.add_argument(meta["cli"].split("/")[0], dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=meta["help"])  # fmt: skip
        else:
            flag = "--" + f.name.replace("_", "-")
            kind = dict(choices=meta["choices"]) if meta["choices"] else dict(type=meta["parse"] or str)
            group.add_argument(flag, dest=f.name, default=default, help=meta["help"] + shown, **kind)


def kwargs_from_args(args: argparse.Namespace) -> dict:
    """find's keyword arguments from parsed command-line flags (those add_arguments made)."""
    return {f.name: getattr(args, f.name) for f in fields(FindOptions) if f.init and f.metadata["cli"] is not None}
