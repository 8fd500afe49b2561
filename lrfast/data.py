"""Embedded demo workloads: data that ships with a package (scikit-learn's digits) or that the user already has
(Fashion-MNIST / MNIST IDX files), and the models of the seed workload. No downloads."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def digits(image_size: int | None = None) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as a TensorDataset of (float32 x, int64 y).

    image_size=None gives flat [N, 64] features scaled to [0, 1]; image_size=28 gives [N, 1, 28, 28] images
    (bilinear upscale), the shape of the MNIST-style seed workload."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in the demo and test extras
        raise ImportError("the digits workload needs scikit-learn: pip install scikit-learn (or lrfast[demo])") from e
    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    if image_size is not None:
        x = x.view(-1, 1, 8, 8)
        if image_size != 8:
            x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = (x - 0.5) / 0.5
    return TensorDataset(x.contiguous(), y)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST / Fashion-MNIST format), gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {data.size} values")
    return data.reshape(shape)


def fashion_mnist(directory: str | os.PathLike, train: bool = True) -> TensorDataset:
    """(Fashion-)MNIST from the IDX files the user has in `directory` (as distributed, .gz or not), normalized
    as the seed workload did: x in [-1, 1], shape [N, 1, 28, 28]."""
    prefix = "train" if train else "t10k"
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for name in (f"{prefix}-{kind}", f"{prefix}-{kind}.gz"):
            if os.path.exists(os.path.join(directory, name)):
                found[kind] = os.path.join(directory, name)
                break
        else:
            raise FileNotFoundError(
                f"--data {directory}: no {prefix}-{kind}[.gz] there; point it at a folder with the (Fashion-)MNIST "
                "IDX files"
            )
    images = read_idx(found["images-idx3-ubyte"])
    labels = read_idx(found["labels-idx1-ubyte"])
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return TensorDataset((x - 0.5) / 0.5, torch.from_numpy(labels.astype(np.int64)))


def mlp(in_features: int = 64, hidden: int = 256, classes: int = 10) -> nn.Sequential:
    """The digits MLP of the benchmarks: 64-256-256-10 with ReLU."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def lenet5(classes: int = 10) -> nn.Sequential:
    """LeNet-5 of the seed workload (61,706 parameters for 28x28 inputs): conv 1->6 5x5 pad 2, pool, conv 6->16
    5x5, pool, 400 -> 120 -> 84 -> 10, ReLU."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, classes),
    )  # fmt: skip


def loader(dataset: TensorDataset, batch_size: int = 64, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A DataLoader with its own seeded generator, so the batch order does not depend on the global RNG."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=True)
