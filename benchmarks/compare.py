"""lrfast against its peers on the same workloads: torch-lr-finder, Lightning's `Tuner.lr_find` and a bare eager loop.

Every contestant runs the same range (exp 1e-7 -> 10, 100 steps, Adam with default hyper-parameters, batch 64,
early stopping off), on the same batches (a fresh `lrfast.data.loader` with seed 0, cycled past its 28 batches), in
the same process. Two measures per (workload, contestant):
- first call: the whole range test in a fresh process (`--child`), Python and torch already imported; the model,
  optimizer, trainer and finder set-up are inside the timing, the contestant's own import is its own column; best
  of 5 processes, run round by round (one in three or four fresh processes here runs 10-20x slow while other jobs
  load the second core);
- warm: best of 3 in one process after one warm-up, contestants interleaved round by round (the 2-core machines
  swing up to 2x minute to minute, see shared/PERF-NOTES.md).
Rows go to `benchmarks/results/<device>/compare.csv` (units in column names, conditions on every row); `compare.md`
is rendered from the CSV. Peers are optional imports: a missing one gets a row with a `note`.

    python -m benchmarks.compare [--device cpu|cuda] [--workloads mlp,lenet] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONTESTANTS = ("lrfast", "torch_lr_finder", "lightning", "bare")
WORKLOADS = ("mlp", "lenet")
# the package each contestant brings on top of torch (its import is timed apart from the range test)
MODULES = {"lrfast": "lrfast", "torch_lr_finder": "torch_lr_finder", "lightning": "pytorch_lightning", "bare": None}
DISTRIBUTIONS = {"lrfast": "lrfast", "torch_lr_finder": "torch-lr-finder", "lightning": "pytorch-lightning"}
SUGGESTION_METHOD = {"lrfast": "valley", "torch_lr_finder": "steepest (plot)", "lightning": "steepest", "bare": ""}
COLUMNS = [
    "workload", "contestant", "k", "steps_run", "wall_s_first", "wall_s_warm_best", "ms_per_step_warm",
    "suggestion", "suggestion_method", "impl", "speedup_vs_bare", "speedup_vs_torch_lr_finder", "speedup_vs_lightning",
    "import_s_first", "peak_rss_mb", "note",
    "min_lr", "max_lr", "steps", "batch_size", "early_stop", "repeats", "first_repeats", "device", "cores", "threads",
    "python", "torch", "lightning", "torch_lr_finder", "lrfast", "commit", "date",
]  # fmt: skip


@dataclass(frozen=True)
class Settings:
    min_lr: float = 1e-7
    max_lr: float = 10.0
    steps: int = 100
    batch_size: int = 64
    early_stop: float | None = None  # None: off for every contestant; a number: that threshold where a peer has one
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: torch's default (the cores)


# ---------------------------------------------------------------------------------------------- workloads


def _data():
    """lrfast.data; loaded from its file alone when the rest of the package does not import (it needs only torch and
    scikit-learn), so the peers can still be measured on the same data."""
    try:
        from lrfast import data
    except Exception:
        spec = importlib.util.spec_from_file_location("_lrfast_data", ROOT / "lrfast" / "data.py")
        data = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(data)
    return data


def workload(name: str, s: Settings) -> tuple[torch.utils.data.TensorDataset, callable]:
    """(dataset, model factory): digits flat for the MLP, digits upscaled to 28x28 for LeNet-5."""
    data = _data()

    if name == "mlp":
        return data.digits(), data.mlp
    if name == "lenet":
        return data.digits(image_size=28), data.lenet5
    raise ValueError(f"--workloads: unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def fresh(dataset, make_model, s: Settings, seed: int = 0):
    """The same initial weights and the same batch order for every contestant and every round."""
    torch.manual_seed(seed)
    model = make_model().to(s.device)
    return model, _data().loader(dataset, batch_size=s.batch_size, shuffle=True, seed=seed)


# ---------------------------------------------------------------------------------------------- contestants
# Each returns (k, steps_run, suggestion, impl: the optimizer code that ran); the caller times the whole call.
TORCH_ADAM = "torch.optim.Adam default (for-loop on CPU)"


def run_lrfast(model, loader, s: Settings):
    import lrfast

    r = lrfast.find(
        model, loader, optimizer="adam", min_lr=s.min_lr, max_lr=s.max_lr, steps=s.steps, mode="exp",
        early_stop_threshold=s.early_stop, device=s.device, progress=False,
    )  # fmt: skip
    k = int(np.shape(r.lrs)[0]) if np.ndim(r.lrs) == 2 else 1
    impl = " + ".join(str(r.info[key]) for key in ("optimizer_path", "forward") if key in r.info)
    return k, int(r.steps_run), r.suggestion, impl


def run_torch_lr_finder(model, loader, s: Settings):
    from torch_lr_finder import LRFinder

    optimizer = torch.optim.Adam(model.parameters(), lr=s.min_lr)  # its start_lr is the optimizer's lr
    finder = LRFinder(model, optimizer, nn.CrossEntropyLoss(), device=s.device)
    # diverge_th defaults to 5 x best of its own (undebiased, 0.05) EMA; inf never fires
    diverge_th = math.inf if s.early_stop is None else s.early_stop
    with _quiet():  # it prints and draws a tqdm bar with no switch to turn them off
        finder.range_test(loader, start_lr=s.min_lr, end_lr=s.max_lr, num_iter=s.steps, step_mode="exp",
                          diverge_th=diverge_th)  # fmt: skip
    finder.reset()
    lrs, losses = finder.history["lr"], finder.history["loss"]
    # its suggestion lives in plot(): lrs[10:-5][argmin(np.gradient(losses[10:-5]))], same maths without the figure
    suggestion = None
    if len(lrs) >= 17:
        suggestion = float(lrs[10:-5][int(np.gradient(np.asarray(losses[10:-5], dtype=float)).argmin())])
    return 1, len(lrs), suggestion, TORCH_ADAM


_LIGHTNING_MODULE = None


def _lightning_module(model):
    global _LIGHTNING_MODULE
    if _LIGHTNING_MODULE is None:
        import pytorch_lightning as pl

        class Wrapped(pl.LightningModule):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters())

        _LIGHTNING_MODULE = Wrapped
    return _LIGHTNING_MODULE(model)


def run_lightning(model, loader, s: Settings):
    import pytorch_lightning as pl
    from pytorch_lightning.tuner import Tuner

    module = _lightning_module(model)
    epochs = math.ceil(s.steps / max(1, len(loader))) + 1  # lr_find stops at max_steps; the epochs must not stop it
    # it saves a full checkpoint .lr_find_<uuid>.ckpt into default_root_dir (the CWD unless told): keep it in a
    # scratch directory that goes away, and run from there in case anything else lands in the CWD
    with tempfile.TemporaryDirectory(prefix="lrfast-bench-lightning-") as scratch, contextlib.chdir(scratch), _quiet():
        trainer = pl.Trainer(
            accelerator="gpu" if s.device.startswith("cuda") else "cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=epochs,
            default_root_dir=scratch,
        )  # fmt: skip
        finder = Tuner(trainer).lr_find(
            module, train_dataloaders=loader, min_lr=s.min_lr, max_lr=s.max_lr, num_training=s.steps,
            mode="exponential", early_stop_threshold=s.early_stop, update_attr=False,
        )  # fmt: skip
        suggestion = finder.suggestion()
    return 1, len(finder.results["lr"]), suggestion, TORCH_ADAM


def run_bare(model, loader, s: Settings):
    """The floor for eager code: zero_grad, forward, cross-entropy, backward, set the LR, default Adam step, .item();
    no smoothing, no early stop, no restore, no suggestion."""
    optimizer = torch.optim.Adam(model.parameters(), lr=s.min_lr)
    lrs = (s.min_lr * (s.max_lr / s.min_lr) ** (np.arange(s.steps) / max(1, s.steps - 1))).tolist()
    model.train()
    batches = iter(loader)
    for lr in lrs:
        try:
            x, y = next(batches)
        except StopIteration:  # digits is 28 batches of 64: start a new epoch, as the peers do
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        loss.item()
    return 1, len(lrs), None, TORCH_ADAM


RUNNERS = {"lrfast": run_lrfast, "torch_lr_finder": run_torch_lr_finder, "lightning": run_lightning, "bare": run_bare}


@contextlib.contextmanager
def _quiet():
    """Peers' prints, tqdm bars, info logs and warnings go nowhere (the child's stdout carries one JSON line)."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null), \
            warnings.catch_warnings():  # fmt: skip
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def missing(contestant: str) -> str | None:
    """Why a contestant cannot run here, or None when it can."""
    module = MODULES[contestant]
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a peer broken by the installed torch
        return f"not available: {type(e).__name__}: {e}"
    if contestant == "lrfast" and not hasattr(sys.modules["lrfast"], "find"):
        return "not available: lrfast.find is missing in this checkout"
    return None


def timed(contestant: str, dataset, make_model, s: Settings) -> dict:
    model, loader = fresh(dataset, make_model, s)
    gc.collect()
    _sync(s)
    t0 = time.perf_counter()
    k, steps_run, suggestion, impl = RUNNERS[contestant](model, loader, s)
    _sync(s)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "k": k, "steps_run": steps_run, "suggestion": suggestion, "impl": impl}


def _sync(s: Settings) -> None:
    if s.device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- measures


def child(contestant: str, workload_name: str, s: Settings) -> dict:
    """One range test in this (fresh) process: the first-call measure."""
    # torch.optim imports torch._dynamo on its first step (1.1-2.4 s here) and importing Lightning does it too: count
    # it with the torch import, outside every contestant's timing, so first calls compare the finders, not who
    # happened to prepay it
    importlib.import_module("torch._dynamo")
    t0 = time.perf_counter()
    why = missing(contestant)
    import_s = time.perf_counter() - t0
    if why:
        raise RuntimeError(why)
    dataset, make_model = workload(workload_name, s)
    out = timed(contestant, dataset, make_model, s)
    out.update(import_s=import_s, peak_rss_mb=_peak_rss_mb(), threads=torch.get_num_threads())
    return out


def first_call(contestant: str, workload_name: str, s: Settings) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.compare", "--child", contestant, "--workloads", workload_name,
           "--device", s.device, "--steps", str(s.steps), "--min-lr", repr(s.min_lr), "--max-lr", repr(s.max_lr),
           "--batch-size", str(s.batch_size)]  # fmt: skip
    if s.early_stop is not None:
        cmd += ["--early-stop", repr(s.early_stop)]
    if s.threads:
        cmd += ["--threads", str(s.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"first call failed (exit {p.returncode}): {tail}"}


def best_of(contestants: list[str], rounds: int, warmups: int, run_one) -> dict:
    """Each contestant's fastest run of `rounds` after `warmups`, every round running each contestant once in an order
    that rotates by round (bursts of load from other jobs here last seconds: spread them over everyone)."""
    best: dict[str, dict] = {}
    for r in range(warmups + rounds):
        order = contestants[r % len(contestants) :] + contestants[: r % len(contestants)]
        for c in order:
            if "error" in best.get(c, {}):
                continue
            try:
                out = run_one(c)
            except Exception as e:  # one broken contestant must not sink the table
                out = {"error": f"failed: {type(e).__name__}: {e}"}
            if "error" in out or (r >= warmups and out["wall_s"] < best.get(c, {}).get("wall_s", math.inf)):
                best[c] = out
    return best


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------- rows


def conditions(s: Settings, repeats: int, first_repeats: int) -> dict:
    def version(contestant):
        try:
            return importlib.metadata.version(DISTRIBUTIONS[contestant])
        except importlib.metadata.PackageNotFoundError:
            return ""

    if s.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = platform.processor() or platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            device = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), device)
    return {
        "min_lr": s.min_lr, "max_lr": s.max_lr, "steps": s.steps, "batch_size": s.batch_size,
        "early_stop": "off" if s.early_stop is None else s.early_stop, "repeats": repeats,
        "first_repeats": first_repeats, "device": device,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "lightning": version("lightning"), "torch_lr_finder": version("torch_lr_finder"),
        "lrfast": version("lrfast"), "commit": _commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%MZ"),
    }  # fmt: skip


def _commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    # the measured code is lrfast/: say so when it differs from the commit
    return f"{head}+dirty" if head and git("status", "--porcelain", "--", "lrfast") else head


def rows_for(workload_name: str, firsts: dict, warms: dict, why_missing: dict, cond: dict) -> list[dict]:
    rows = []
    for c in CONTESTANTS:
        w, f = warms.get(c, {}), firsts.get(c, {})
        notes = [n for n in (why_missing.get(c), w.get("error"), f.get("error")) if n]
        ms = 1e3 * w["wall_s"] / w["steps_run"] if w.get("steps_run") else None
        rows.append({
            "workload": workload_name, "contestant": c, "k": w.get("k", f.get("k")),
            "steps_run": w.get("steps_run", f.get("steps_run")), "wall_s_first": f.get("wall_s"),
            "wall_s_warm_best": w.get("wall_s"), "ms_per_step_warm": ms,
            "suggestion": w.get("suggestion", f.get("suggestion")), "suggestion_method": SUGGESTION_METHOD[c],
            "impl": w.get("impl", f.get("impl")),
            "import_s_first": f.get("import_s"), "peak_rss_mb": f.get("peak_rss_mb"), "note": "; ".join(notes), **cond,
        })  # fmt: skip
    by = {r["contestant"]: r["ms_per_step_warm"] for r in rows}
    for r in rows:
        for peer in ("bare", "torch_lr_finder", "lightning"):
            ok = by[peer] and r["ms_per_step_warm"]
            r[f"speedup_vs_{peer}"] = by[peer] / r["ms_per_step_warm"] if ok else None
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    def cell(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "" if v is None else str(v)
        return f"{v:.6g}" if isinstance(v, float) else v

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: cell(r.get(k)) for k in COLUMNS} for r in rows)


def render_markdown(csv_path: Path) -> str:
    """compare.md from compare.csv: the table, the conditions, how to reproduce."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "# lrfast vs peers\n\n(no rows)\n"

    def num(v, fmt):
        return format(float(v), fmt) if v not in ("", None) else ""

    head = ["workload", "contestant", "ms/step warm", "wall s warm best", "wall s first call", "speedup vs bare",
            "vs torch-lr-finder", "vs Lightning", "steps", "suggestion", "import s", "peak RSS MB", "note"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["workload"], r["contestant"], num(r["ms_per_step_warm"], ".3f"), num(r["wall_s_warm_best"], ".3f"),
                 num(r["wall_s_first"], ".3f"), num(r["speedup_vs_bare"], ".2f"),
                 num(r["speedup_vs_torch_lr_finder"], ".2f"), num(r["speedup_vs_lightning"], ".2f"), r["steps_run"],
                 num(r["suggestion"], ".3g") + (f" ({r['suggestion_method']})" if r["suggestion"] else ""),
                 num(r["import_s_first"], ".2f"), num(r["peak_rss_mb"], ".0f"), r["note"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    c = rows[0]
    quick = c["first_repeats"] == "0"
    lrfast_impl = next((r["impl"] for r in rows if r["contestant"] == "lrfast" and r["impl"]), "")
    return "\n".join([
        f"# lrfast vs peers: LR range test, {c['device']}", "",
        f"Range exp {c['min_lr']} -> {c['max_lr']}, {c['steps']} steps, Adam defaults, batch {c['batch_size']}, "
        f"early stop {c['early_stop']}; warm = best of {c['repeats']} after one warm-up, contestants interleaved "
        f"round by round; first call = one range test in a fresh process, best of {c['first_repeats']} "
        "processes run round by round (Python, torch and torch._dynamo imported before the clock starts, the "
        "contestant's own import timed apart in `import s`); peak RSS of that process. k = LR candidates per pass.", "",
        *lines, "",
        f"Machine: {c['device']}, {c['cores']} cores, {c['threads']} torch threads; Python {c['python']}, "
        f"torch {c['torch']}, Lightning {c['lightning'] or '-'}, torch-lr-finder {c['torch_lr_finder'] or '-'}, "
        f"lrfast {c['lrfast'] or '-'} at {c['commit']}; {c['date']}.", "",
        "Settings that differ between contestants: the schedule (lrfast, torch-lr-finder and bare: "
        "min*(max/min)^(i/(N-1)), both endpoints; Lightning: lr_0 = min, then min*(max/min)^((k+1)/N)); the "
        "suggestion method (in brackets, each peer's default, on its own smoothing: lrfast and Lightning debiased "
        "EMA 0.98, torch-lr-finder an undebiased 0.05 EMA); the optimizer code (torch.optim.Adam's default for the "
        f"peers and bare, lrfast's own: {lrfast_impl or '-'}); torch-lr-finder and Lightning draw a tqdm bar that "
        "cannot be switched off (sent to /dev/null), lrfast runs with progress=False; Lightning writes and reloads "
        "a checkpoint per call; with early stop off every curve runs on into divergence, and each suggestion is its "
        "tool's own pick on that whole curve; the bare "
        "loop restores nothing and suggests nothing."
        + (" No fresh-process call in this run (--quick)." if quick else ""),
        "", "Reproduce: `pip install -e . torch-lr-finder pytorch-lightning scikit-learn && "
        f"python -m benchmarks.compare --device {'cuda' if 'cuda' in csv_path.parent.name else 'cpu'}`; this file "
        "is rendered from compare.csv (`python -m benchmarks.compare --render PATH/compare.csv`).", "",
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    p.add_argument("--contestants", default=",".join(CONTESTANTS), help="comma-separated: " + ", ".join(CONTESTANTS))
    p.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 1 repetition, no fresh-process call")
    p.add_argument("--out", type=Path, help="for compare.csv and compare.md; default benchmarks/results/<device>")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="warm: best of this many after one warm-up")
    p.add_argument("--first-repeats", type=int, default=5, help="first call: best of this many fresh processes")
    p.add_argument("--min-lr", type=float, default=1e-7)
    p.add_argument("--max-lr", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--early-stop", type=float, default=None, help="threshold x best loss for every contestant "
                   "that has one (torch-lr-finder's applies to its own smoothing); default off")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch.set_num_threads for every contestant (default: torch's)")
    p.add_argument("--child", choices=CONTESTANTS, help=argparse.SUPPRESS)
    p.add_argument("--render", type=Path, help="only render compare.md next to this compare.csv")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])

    if args.render:
        args.render.with_suffix(".md").write_text(render_markdown(args.render))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False here; nothing run", file=sys.stderr)
        return 2
    steps = 20 if args.quick else args.steps
    repeats = 1 if args.quick else args.repeats
    first_repeats = 0 if args.quick else args.first_repeats
    s = Settings(args.min_lr, args.max_lr, steps, args.batch_size, args.early_stop, args.device, args.threads)
    if s.threads:
        torch.set_num_threads(s.threads)
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"--workloads: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")

    if args.child:
        print(json.dumps(child(args.child, workloads[0], s)))
        return 0

    chosen = [c for c in CONTESTANTS if c in args.contestants.split(",")]
    why_missing = {c: missing(c) for c in chosen}
    live = [c for c in chosen if why_missing[c] is None]
    cond = conditions(s, repeats, first_repeats)
    rows = []
    for w in workloads:
        firsts = best_of(live, first_repeats, 0, lambda c: first_call(c, w, s))
        dataset, make_model = workload(w, s)
        warms = best_of(live, repeats, 1, lambda c: timed(c, dataset, make_model, s))
        rows += [r for r in rows_for(w, firsts, warms, why_missing, cond) if r["contestant"] in chosen]
        for r in rows[-len(chosen) :]:
            print(f"{w:6} {r['contestant']:16} warm {r['ms_per_step_warm'] or float('nan'):8.3f} ms/step  "
                  f"first {r['wall_s_first'] or float('nan'):7.3f} s  {r['note']}", file=sys.stderr)  # fmt: skip
    out = args.out or ROOT / "benchmarks" / "results" / args.device
    write_csv(rows, out / "compare.csv")
    (out / "compare.md").write_text(render_markdown(out / "compare.csv"))
    print(f"wrote {out / 'compare.csv'} and {out / 'compare.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
