"""What to train with: an optimizer name, a torch.optim.Optimizer on the model's parameters, or a factory
params -> Optimizer, resolved into param groups with hyper-parameters. SGD / Adam / AdamW take the fused kernels;
every other optimizer (or a flag the kernels do not implement) runs through torch.optim itself."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from lrfast.kernels.reference import AdamParams, SGDParams

NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
# torch.optim's defaults for each name (tests/test_find.py checks them against torch.optim itself)
DEFAULTS = {
    "sgd": ("sgd", SGDParams(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0)),
    "adam": ("adam", AdamParams(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)),
    "adamw": ("adam", AdamParams(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True)),
}


@dataclass
class Group:
    """One param group: its trainable parameters, the fused kernel's hyper-parameters (None on the generic path)
    and its LR relative to the largest group's (the sweep scales every group by the same factor)."""

    params: list[nn.Parameter]
    hp: SGDParams | AdamParams | None
    lr_scale: float = 1.0


@dataclass
class OptimizerPlan:
    """How the run trains: the fused kernel kind and its param groups, or a private torch.optim instance."""

    kind: str  # "sgd" | "adam" (Adam and AdamW) | "generic"
    groups: list[Group]
    optimizer_class: str
    instance: torch.optim.Optimizer | None = None  # generic path: the private torch.optim instance it steps
    scales: list[float] = field(default_factory=list)  # per param group of `generic`
    notes: list[str] = field(default_factory=list)
    lr: float = 1e-3  # the optimizer's own LR (its largest group's; torch's default for a name)

    def equal_lrs(self) -> None:
        """Every param group at the sweep's LR (the peers' way: like=), instead of keeping their ratios."""
        for g in self.groups:
            g.lr_scale = 1.0
        self.scales = [1.0] * len(self.scales)


def resolve(optimizer, model: nn.Module) -> OptimizerPlan:
    """Validate `optimizer` against `model` and plan the run. Never touches a user's optimizer's state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "model has no trainable parameters (every parameter has requires_grad=False); unfreeze the layers "
            "to train (p.requires_grad_(True)) before the range test"
        )
    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name not in NAMES:
            raise ValueError(
                f"optimizer={optimizer!r} is not a known name; use one of: {', '.join(NAMES)}, a torch.optim.Optimizer "
                "built on the model's parameters, or a callable params -> Optimizer"
            )
        # No torch.optim instance here: the first one in a process imports torch._dynamo (~1.7 s on 2 cores).
        kind, hp = DEFAULTS[name]
        return OptimizerPlan(kind, [Group(trainable, hp)], NAMES[name], scales=[1.0])
    if isinstance(optimizer, torch.optim.Optimizer):
        return _plan(optimizer, model, owned=False)
    if callable(optimizer):
        opt = optimizer(trainable)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer: the callable returned {type(opt).__name__}, not a torch.optim.Optimizer; pass a "
                "callable like lambda params: torch.optim.AdamW(params, weight_decay=0.1)"
            )
        return _plan(opt, model, owned=True)
    raise TypeError(
        f"optimizer={type(optimizer).__name__} is not supported; pass a name ({', '.join(NAMES)}), a "
        "torch.optim.Optimizer on the model's parameters, or a callable params -> Optimizer"
    )


def _plan(opt: torch.optim.Optimizer, model: nn.Module, owned: bool) -> OptimizerPlan:
    model_params = {id(p) for p in model.parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in model_params:
                raise ValueError(
                    f"optimizer holds a parameter of shape {tuple(p.shape)} that is not one of the model's; build "
                    "the optimizer on model.parameters() (or pass a callable params -> Optimizer)"
                )
    groups_lr = [float(g["lr"]) for g in opt.param_groups]
    top = max(groups_lr)
    scales = [lr / top if top > 0 else 1.0 for lr in groups_lr]
    kind, hps, why = _fused_kind(opt)
    groups = []
    for g, hp, scale in zip(opt.param_groups, hps, scales):
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            groups.append(Group(params, hp, scale))
    if not groups:
        raise ValueError(
            "optimizer: none of its parameters is trainable (requires_grad=False everywhere); unfreeze the layers "
            "to train before the range test"
        )
    plan = OptimizerPlan(kind, groups, type(opt).__name__, scales=scales, lr=top)
    if kind == "generic":
        plan.notes.append(f"{type(opt).__name__}: generic torch.optim path ({why}); correct, slower than fused")
        plan.instance = opt if owned else _fresh_copy(opt, plan.notes)
    return plan


def _fused_kind(opt: torch.optim.Optimizer) -> tuple[str, list, str]:
    """("sgd" | "adam", one hp per group, "") when the fused kernels implement every group, else ("generic", ...)."""
    cls = type(opt)
    hps = []
    for g in opt.param_groups:
        if g.get("maximize") or g.get("differentiable"):
            return "generic", [None] * len(opt.param_groups), "maximize/differentiable not in the fused kernels"
        if cls is torch.optim.SGD:
            hps.append(SGDParams(float(g["momentum"]), float(g["dampening"]), bool(g["nesterov"]),
                                 float(g["weight_decay"])))  # fmt: skip
        elif cls in (torch.optim.Adam, torch.optim.AdamW):
            if g.get("amsgrad"):
                return "generic", [None] * len(opt.param_groups), "amsgrad not in the fused kernels"
            decoupled = cls is torch.optim.AdamW or bool(g.get("decoupled_weight_decay", False))
            b1, b2 = g["betas"]
            hps.append(AdamParams(float(b1), float(b2), float(g["eps"]), float(g["weight_decay"]), decoupled))
        else:
            return "generic", [None] * len(opt.param_groups), "no fused kernel for this class"
    return ("sgd" if cls is torch.optim.SGD else "adam"), hps, ""


def _fresh_copy(opt: torch.optim.Optimizer, notes: list[str]) -> torch.optim.Optimizer:
    """A new optimizer of the user's class over the same parameters and groups, with fresh state: the user's own
    instance and its state are never stepped."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])} for g in opt.param_groups]
    try:
        return type(opt)(groups, **opt.defaults)
    except TypeError:
        # A class whose constructor does not take its defaults back: copy it, keeping the parameters themselves.
        notes.append(f"{type(opt).__name__}(groups, **defaults) failed: a deep copy runs, starting from its state")
        return copy.deepcopy(opt, memo={id(p): p for g in opt.param_groups for p in g["params"]})


def set_lr(opt: torch.optim.Optimizer, scales: list[float], lr: float) -> None:
    """Generic path: this step's LR on a private optimizer, every param group scaled by its ratio."""
    for g, scale in zip(opt.param_groups, scales):
        g["lr"] = lr * scale
