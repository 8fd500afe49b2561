"""The benchmark workloads, one definition for compare.py and bench_candidates.py: data generated here or shipped
with a package (no downloads), the model, the loss, batch size, optimizer, precision and the steps of a full run.

- mlp: scikit-learn's digits, MLP 64-256-256-10;
- lenet: digits upscaled to 28x28, LeNet-5 (the seed workload), batch 64;
- resnet18: CIFAR-shaped 32x32x3 images, 10 classes (a fixed smooth pattern per class + noise, seed 0), the
  BasicBlock ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), batch 128;
- chargpt: a 4-layer, 256-wide GPT over bytes (vocabulary 256, context 128, batch 32) on the concatenated sources of
  a fixed list of standard-library modules (they ship with Python; their text depends on the Python version);
- gpt2: GPT-2-small-shaped (12 layers, 768 wide, 12 heads, vocabulary 50257, tied embedding: 124M params), context
  1024, batch 8, the same bytes as tokens, AdamW, bf16 autocast: GPU only unless asked for by name.
`quick=True` shrinks every model and batch to a tiny config of the same code (the suite's smoke test).
"""

from __future__ import annotations

import importlib.util
import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("mlp", "lenet", "resnet18", "chargpt", "gpt2")
GPU_ONLY = ("gpt2",)
# fixed: the same text on every machine with the same Python (~560 KB on 3.11)
STDLIB_SOURCES = ("argparse.py", "inspect.py", "typing.py", "dataclasses.py", "pathlib.py", "functools.py",
                  "collections/__init__.py", "textwrap.py")  # fmt: skip
# steps of a full run on 2 CPU cores: ResNet-18 at batch 128 is ~2 s a step there, char-GPT ~0.5 s
CPU_STEPS = {"resnet18": 10, "chargpt": 20}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}  # lrfast's names for torch's optimizers


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    dataset: Callable[[], TensorDataset]
    model: Callable[[], nn.Module]
    batch_size: int
    steps: int  # of a full run on this device
    optimizer: str = "adam"  # "adam" | "adamw": torch defaults, lrfast's name for it
    precision: str = "fp32"  # "fp32" | "bf16" (autocast around the forward, fp32 weights)
    loss: Callable = F.cross_entropy
    heavy: bool = False  # long runs on this device (seconds per step, or 124M params): fewer repeats
    candidates: bool = True  # K = 16 / 32 rows make sense (not for K copies of a 124M model)


def get(name: str, device: str = "cpu", quick: bool = False) -> Workload:
    """The workload `name` as it runs on `device` (full size, or tiny with quick)."""
    cpu = not device.startswith("cuda")
    steps = 20 if quick else (CPU_STEPS.get(name, 100) if cpu else 100)
    if name == "mlp":
        return Workload(name, "digits MLP 64-256-256-10", _digits, lrfast_data().mlp, 64, steps)
    if name == "lenet":
        return Workload(name, "LeNet-5, digits 28x28", partial(_digits, 28), lrfast_data().lenet5, 64, steps)
    if name == "resnet18":
        width, n, batch = (8, 256, 16) if quick else (64, 5120, 128)
        return Workload(name, f"ResNet-18 (width {width}), CIFAR-shaped 32x32 generated", partial(cifar_like, n),
                        partial(resnet18, width=width), batch, steps, heavy=cpu and not quick)  # fmt: skip
    if name == "cnn":  # not in WORKLOADS (compare's): bench_candidates' BatchNorm CNN
        n, width = (256, 4) if quick else (2048, 8)
        return Workload(name, f"BatchNorm CNN (width {width}), CIFAR-shaped 32x32 generated", partial(cifar_like, n),
                        partial(bn_cnn, width=width), 64, steps)  # fmt: skip
    if name == "chargpt_small":  # not in WORKLOADS (compare's): bench_candidates' char GPT, K = 16 in minutes
        layers, width, heads, ctx, batch = (1, 32, 2, 32, 8) if quick else (2, 128, 4, 64, 32)
        return Workload(name, f"char GPT {layers}x{width}, ctx {ctx}, stdlib bytes", partial(stdlib_bytes, ctx),
                        partial(GPT, 256, ctx, layers, width, heads), batch, 20 if cpu else steps,
                        loss=lm_loss)  # fmt: skip
    if name == "lstm":  # not in WORKLOADS (compare's): bench_candidates' LSTM language model
        width, ctx, batch = (32, 16, 8) if quick else (128, 32, 32)
        return Workload(name, f"char LSTM 1x{width}, ctx {ctx}, stdlib bytes", partial(stdlib_bytes, ctx),
                        partial(CharLSTM, 256, width), batch, steps, loss=lm_loss)  # fmt: skip
    if name == "chargpt":
        layers, width, heads, ctx, batch = (1, 32, 2, 32, 8) if quick else (4, 256, 4, 128, 32)
        return Workload(name, f"char GPT {layers}x{width}, ctx {ctx}, stdlib bytes", partial(stdlib_bytes, ctx),
                        partial(GPT, 256, ctx, layers, width, heads), batch, steps, loss=lm_loss,
                        heavy=cpu and not quick)  # fmt: skip
    if name == "gpt2":
        layers, width, heads, vocab, ctx, batch = (2, 64, 2, 512, 32, 4) if quick else (12, 768, 12, 50257, 1024, 8)
        return Workload(name, f"GPT-2-small-shaped {layers}x{width}, vocab {vocab}, ctx {ctx}, bf16",
                        partial(stdlib_bytes, ctx), partial(GPT, vocab, ctx, layers, width, heads), batch, steps,
                        optimizer="adamw", precision="bf16", loss=lm_loss, heavy=not quick,
                        candidates=quick)  # fmt: skip
    raise ValueError(f"--workloads: unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def lrfast_data():
    """lrfast.data; loaded from its file alone when the rest of the package does not import (it needs only torch and
    scikit-learn), so the peers can still be measured on the same data."""
    try:
        from lrfast import data
    except Exception:
        spec = importlib.util.spec_from_file_location("_lrfast_data", ROOT / "lrfast" / "data.py")
        data = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(data)
    return data


def _digits(image_size: int | None = None) -> TensorDataset:
    return lrfast_data().digits(image_size=image_size)


# ---------------------------------------------------------------------------------------------- data


def cifar_like(n: int = 5120, classes: int = 10, seed: int = 0, noise: float = 1.0) -> TensorDataset:
    """n CIFAR-shaped images [3, 32, 32]: class c's fixed smooth pattern (8x8 noise upsampled) + `noise` x unit noise,
    so there is a signal to learn and the loss falls at a good LR (more noise: a harder task, a higher best loss)."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(classes, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear")
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.5 * patterns[y] + noise * torch.randn(n, 3, 32, 32, generator=g)
    return TensorDataset(x, y)


def stdlib_text() -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"\n".join((root / name).read_bytes() for name in STDLIB_SOURCES)


def stdlib_bytes(ctx: int) -> TensorDataset:
    """Non-overlapping windows of ctx + 1 bytes of stdlib_text(): x = the first ctx, y = the next byte of each."""
    data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    n = (len(data) - 1) // ctx
    x = data[: n * ctx].view(n, ctx)
    y = data[1 : n * ctx + 1].view(n, ctx)
    return TensorDataset(x.contiguous(), y.contiguous())


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T, V], y [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


# ---------------------------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(classes: int = 10, width: int = 64) -> nn.Sequential:
    """ResNet-18 (two BasicBlocks per stage, widths w, 2w, 4w, 8w) with the CIFAR stem: 11.2M params at width 64."""
    layers, cin = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
    for i, stride in enumerate((1, 2, 2, 2)):
        cout = width * 2**i
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def bn_cnn(classes: int = 10, width: int = 8) -> nn.Sequential:
    """A small BatchNorm CNN for 3-channel images of any size (benchmarks/quality.py, SGD with momentum): a stride-2
    3x3 conv stem (BN, ReLU), two BasicBlocks (widths 2w and 4w, stride 2), average pool, linear; 18.8k params at
    width 8."""
    stem = [nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    blocks = [BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2)]
    return nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (scaled_dot_product_attention), then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2's layout (learned positions, pre-norm blocks, final LayerNorm, head tied to the token embedding) and
    its init (normal 0.02, residual projections scaled by 1/sqrt(2 x layers))."""

    def __init__(self, vocab: int, ctx: int, layers: int, width: int, heads: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(ctx, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class CharLSTM(nn.Module):
    """A byte-level LSTM language model: embedding (width / 4), one LSTM layer of `width`, a linear head."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width // 4)
        self.lstm = nn.LSTM(width // 4, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        return self.head(self.lstm(self.tok(idx))[0])
