"""What every benchmark writes with its rows: the conditions (machine, versions, commit, date) and the CSV itself.
Markdown and plots are made from the CSV by each benchmark's render function, never typed by hand."""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ["device", "cores", "threads", "python", "torch", "triton", "lrfast", "commit", "date"]


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, the CPU model otherwise."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return name


def commit() -> str:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "--short", "HEAD")
    # the measured code is lrfast/: say so when it differs from the commit
    return f"{head}+dirty" if head and git("status", "--porcelain", "--", "lrfast") else head


def conditions(device: str) -> dict:
    return {
        "device": device_name(device),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "triton": version("triton"), "lrfast": version("lrfast"), "commit": commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%MZ"),
    }  # fmt: skip


def write_csv(rows: list[dict], path: Path, columns: list[str]) -> None:
    """rows -> CSV with exactly `columns`; floats to 6 significant digits, None as an empty cell."""

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}" if math.isfinite(v) else str(v)
        return v

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: cell(r.get(k)) for k in columns} for r in rows)


def provenance(rows: list[dict]) -> str:
    """'commit C, DATE' of the rows, or, where some workloads were re-run (bench_candidates --merge), each commit
    with its workloads and its first date."""
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["commit"], []).append(r)
    if len(runs) == 1:
        return f"commit {rows[0]['commit']}, {rows[0]['date']}"
    return "commits " + "; ".join(f"{c} ({', '.join(dict.fromkeys(r['workload'] for r in rs))}, {rs[0]['date']})"
                                  for c, rs in runs.items())  # fmt: skip


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(v, fmt: str) -> str:
    """A CSV cell formatted as a number, or left as it is (empty, a note)."""
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return v or ""


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Lay out, write and close a figure (the PNG next to the CSV it is made from)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def render_or_refuse(args, render) -> int | None:
    """A benchmark's first decision on its parsed arguments: --render only re-renders (exit status 0); --device cuda
    without a CUDA device is refused (2); None: run."""
    if args.render:
        render(args.render)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False here; nothing run", file=sys.stderr)
        return 2
    return None
