"""Optimizer updates after a step's backward: the fused kernels run through Arena.update; torch.optim-only optimizers
with K > 1 get one private instance per candidate, over leaf views of that candidate's row of the arena."""

from __future__ import annotations

import torch

from lrfast.engine.arena import Arena


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
