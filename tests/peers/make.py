"""Regenerate the committed peer curves tests/test_peers.py compares like= against where the peer is not installed:
fastai's Learner.lr_find and torch-lr-finder's LRFinder.range_test, run with their own code on the test models.

    python tests/peers/make.py            # needs fastai and / or torch-lr-finder importable; writes the JSONs here

Each run: the model built after torch.manual_seed(0), the digits in order (batch 64, drop_last), torch.optim.Adam
with torch's defaults but amsgrad=True (so that lrfast runs the same torch.optim arithmetic: its generic path), the
peer's own defaults otherwise (fastai through OptimWrapper, so that its optimizer is that Adam). fastai 2.8 imports
without torchvision for this (fastai.basics, fastai.callback.schedule)."""

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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from lrfast import data  # noqa: E402

MODELS = {"mlp": (data.mlp, None), "lenet": (data.lenet5, 28)}
ADAM = partial(torch.optim.Adam, amsgrad=True)  # not fused by lrfast: torch.optim's own step, on both sides


def setup(model: str):
    """(the model after torch.manual_seed(0), the loader): the same for the peer and for lrfast."""
    make, size = MODELS[model]
    loader = torch.utils.data.DataLoader(data.digits(image_size=size), batch_size=64, shuffle=False, drop_last=True)
    torch.manual_seed(0)
    return make(), loader


def fastai_curve(model: str) -> dict:
    from fastai.basics import DataLoaders, Learner, OptimWrapper
    from fastai.callback.schedule import lr_find  # noqa: F401 - patches Learner.lr_find

    net, loader = setup(model)
    with tempfile.TemporaryDirectory() as tmp:
        learn = Learner(DataLoaders(loader, loader), net, loss_func=F.cross_entropy, path=tmp,
                        opt_func=partial(OptimWrapper, opt=ADAM))  # fmt: skip
        with learn.no_bar():
            found = learn.lr_find(show_plot=False)
    return {"lrs": [float(x) for x in learn.recorder.lrs], "losses": [float(x) for x in learn.recorder.losses],
            "suggestion": float(found.valley), "version": md.version("fastai")}  # fmt: skip


def torch_lr_finder_curve(model: str) -> dict:
    from torch_lr_finder import LRFinder

    net, loader = setup(model)
    finder = LRFinder(net, ADAM(net.parameters()), F.cross_entropy, device="cpu")
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
        for model in MODELS:
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
