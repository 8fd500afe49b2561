"""The peers' runs tests/test_peers.py compares like= against, and the committed curves it uses where a peer is not
installed: fastai's Learner.lr_find and torch-lr-finder's LRFinder.range_test, run with their own code.

    python tests/peers/make.py            # needs fastai and / or torch-lr-finder importable; writes the JSONs here

Each run: the model built after torch.manual_seed(0), its batches in order, torch.optim.Adam with torch's defaults
but amsgrad=True (so that lrfast runs the same torch.optim arithmetic: its generic path), the peer's own defaults
otherwise (fastai through OptimWrapper, so that its optimizer is that Adam). fastai 2.8 imports without torchvision
for this (fastai.basics, fastai.callback.schedule; pip install --no-deps fastai fastcore fasttransform
"fastprogress<1.1" "plum-dispatch<2.10", then pandas, scipy, pyyaml, requests).

Only the scripted model's curves are committed: a real model's losses carry the rounding of the CPU's matmul and
convolution kernels (the digits MLP's and LeNet-5's, recorded on an AMD EPYC, differ from an Intel Xeon's from
the 5th step and stop at another step), while the scripted model's loss at each step is a number of its batch,
bitwise the same on every machine, so the committed curve tests the peer's schedule, smoothing, stop rule and
suggestion anywhere. The real models run against the peers live (torch-lr-finder is a test dependency)."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from lrfast import data  # noqa: E402

ADAM = partial(torch.optim.Adam, amsgrad=True)  # not fused by lrfast: torch.optim's own step, on both sides
COMMITTED = ("scripted",)  # the models whose peer curves are committed (the same on every machine)


class Scripted(nn.Module):
    """Returns the loss its batch holds: x [1, 1] -> x + 0 * w. w's grads are zero, so Adam leaves it at 0 and
    each step's loss is its batch's number exactly (no rounding anywhere): a range test's raw curve as data."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0 * self.w


def scripted_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out.sum()


def scripted_losses(n: int = 100) -> list[float]:
    """n raw losses shaped like a range test's: falling from 2.3, flattening near step 0.55 n, then growing 1.6x
    a step from 0.75 n on (every peer's stop rule fires), with noise of +-0.04 from a linear congruential generator;
    Python float arithmetic only (+, -, *, /: the same on every machine), rounded to float32 by the loader."""
    out, state, grow = [], 12345, 0.0
    for i in range(n):
        t = i / (n - 1)
        state = (state * 1103515245 + 12345) % 2**31
        grow = 0.01 if i == int(0.75 * n) else grow * 1.6
        out.append(2.3 - 2.2 * t + 2.0 * t * t + 0.08 * (state / 2**31 - 0.5) + grow)
    return out


def _scripted_data():
    x = torch.tensor(scripted_losses(), dtype=torch.float32).reshape(-1, 1, 1)
    return torch.utils.data.TensorDataset(x, torch.zeros(len(x), 1, dtype=torch.long))


MODELS = {"mlp": (data.mlp, lambda: data.digits(), 64), "lenet": (data.lenet5, lambda: data.digits(image_size=28), 64),
          "scripted": (Scripted, _scripted_data, 1)}  # fmt: skip


def setup(model: str):
    """(the model after torch.manual_seed(0), the loader): the same for the peer and for lrfast."""
    make, dataset, batch = MODELS[model]
    loader = torch.utils.data.DataLoader(dataset(), batch_size=batch, shuffle=False, drop_last=True)
    torch.manual_seed(0)
    return make(), loader


def loss_fn(model: str):
    return scripted_loss if model == "scripted" else F.cross_entropy


def fastai_curve(model: str) -> dict:
    from fastai.basics import DataLoaders, Learner, OptimWrapper
    from fastai.callback.schedule import lr_find  # noqa: F401 - patches Learner.lr_find

    net, loader = setup(model)
    with tempfile.TemporaryDirectory() as tmp:
        learn = Learner(DataLoaders(loader, loader), net, loss_func=loss_fn(model), path=tmp,
                        opt_func=partial(OptimWrapper, opt=ADAM))  # fmt: skip
        with learn.no_bar():
            found = learn.lr_find(show_plot=False)
    return {"lrs": [float(x) for x in learn.recorder.lrs], "losses": [float(x) for x in learn.recorder.losses],
            "suggestion": float(found.valley), "version": md.version("fastai")}  # fmt: skip


def torch_lr_finder_curve(model: str) -> dict:
    from torch_lr_finder import LRFinder

    net, loader = setup(model)
    finder = LRFinder(net, ADAM(net.parameters()), loss_fn(model), device="cpu")
    with contextlib.redirect_stdout(sys.stderr):
        finder.range_test(loader)
        _, suggestion = finder.plot(suggest_lr=True, ax=_axes())
    return {"lrs": finder.history["lr"], "losses": finder.history["loss"], "suggestion": float(suggestion),
            "version": md.version("torch-lr-finder")}  # fmt: skip


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure().add_subplot()


def main() -> int:
    made = 0
    for peer, curve in (("fastai", fastai_curve), ("torch_lr_finder", torch_lr_finder_curve)):
        for model in COMMITTED:
            try:
                got = curve(model)
            except ImportError as e:
                print(f"{peer}: not importable here ({e}); its curves are kept", file=sys.stderr)
                break
            record = {"peer": peer, "model": model, "torch": torch.__version__, **got}
            (HERE / f"{peer}_{model}.json").write_text(json.dumps(record) + "\n")
            print(f"{peer} {model}: {len(got['lrs'])} points, suggestion {got['suggestion']}")
            made += 1
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
