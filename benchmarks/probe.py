"""Probes of lrfast.find on a GPU, the checks the one-command GPU run (benchmarks/gpu.py) makes before it measures
anything: what path each setting takes, what it notes, how long compile, capture and the steps take, how many
graphs Dynamo made, and how far the curve is from the eager run of the same settings.

    python -m benchmarks.probe matrix [--device cuda] [--quick] [--out DIR]
        digits MLP, K = 1 (sweep) and K = 8 (grid), fp32 and bf16: eager (the reference), compile + graphs; and for
        K = 1 fp32 compile only and graphs only
    python -m benchmarks.probe bn ...           bf16 + BatchNorm (small ResNet), K = 4: vmap's failure, its fallback
    python -m benchmarks.probe steps --steps 3  a run of 3 (or 4, ...) steps, compile + graphs: in its own process,
                                                since a device-side assert leaves the process's GPU unusable
    python -m benchmarks.probe cache ...        ResNet-18, K = 1: cache="device" against "host": peak device memory
                                                (CUDA), ms per step, the batches' bytes

Each writes DIR/probe-<case>.json (one record per find) and prints one line per record. Exit status 1 if a find
raised or a compiled curve is further from the eager one than TOLERANCE."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks import workloads
except ImportError:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import workloads

RESULTS = Path(__file__).resolve().parent / "results"
# max relative difference of the smoothed curves (finite steps both ran) to eager: Inductor reorders fp32 sums
# (a few ulp per op, grown over the steps by training); bf16 rounds each activation to 8 bits
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


def _graphs() -> int:
    """Dynamo's count of graphs compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def find(model_fn, dataset, device: str, steps: int, k: int, precision: str, compile: bool, graphs: bool,
         batch: int, seed: int = 0, cache: str = "auto") -> tuple[dict, np.ndarray | None]:  # fmt: skip
    """One lrfast.find on a fresh model: the record of what it did, and its smoothed curve [K, S] (None: it
    raised)."""
    import lrfast

    torch.manual_seed(seed)
    model = model_fn().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    strategy = {} if k == 1 else {"strategy": "grid", "lrs": list(np.geomspace(1e-4, 1e-1, k))}
    rec = {"k": k, "precision": precision, "compile_asked": compile, "graphs_asked": graphs, "steps": steps,
           "cache_asked": cache}  # fmt: skip
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    before, t0 = _graphs(), time.perf_counter()
    try:
        r = lrfast.find(model, loader, optimizer="adam", steps=steps, precision=precision, compile=compile,
                        graphs=graphs, device=device, progress=False, seed=seed, cache=cache, **strategy)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - recorded: the probe goes on with the next setting
        rec.update(error=f"{type(e).__name__}: {e}", wall_s=round(time.perf_counter() - t0, 3))
        return rec, None
    info, t = r.info, r.timings
    rec.update(
        wall_s=round(time.perf_counter() - t0, 3), dynamo_graphs=_graphs() - before,
        compiled=info["compile"], graphs=info["graphs"], path=f"{info['optimizer_path']} + {info['forward']}",
        notes=info["notes"], steps_run=int(r.steps_run), suggestion=r.suggestion,
        compile_s=t.get("compile", t.get("warmup")), capture_s=t.get("capture"),
        step_ms=1e3 * t["steps"] / r.steps_run if t.get("steps") and r.steps_run else None, cache=info["cache"],
        peak_device_mib=(torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None,
    )  # fmt: skip
    return rec, np.asarray(r.smoothed, dtype=np.float64).reshape(k, -1)


def difference(got: np.ndarray | None, want: np.ndarray | None) -> float | None:
    """Max relative difference over the steps both curves have finite."""
    if got is None or want is None:
        return None
    both = np.isfinite(got) & np.isfinite(want)
    if not both.any():
        return None
    return float(np.max(np.abs(got[both] - want[both]) / np.maximum(np.abs(want[both]), 1e-30)))


def settings(case: str, quick: bool, device: str = "cuda") -> list[tuple]:
    """(workload, K, precision, [(compile, graphs), ...]): the eager reference is always run first. On CPU (a dry
    run of the GPU suite) nothing is captured: the matrix compiles without graphs, the other cases run eager only."""
    if device != "cuda":
        return [(w, k, p, [(True, False)] if case == "matrix" else []) for w, k, p, _ in settings(case, quick)]
    if case == "matrix":
        both = [(True, True)]
        rows = [("mlp", 1, "fp32", [(True, True), (True, False), (False, True)]), ("mlp", 8, "fp32", both),
                ("mlp", 1, "bf16", both), ("mlp", 8, "bf16", both)]  # fmt: skip
        return rows[:2] if quick else rows
    if case == "bn":
        return [("resnet18", 4, "bf16", [(True, True)])]
    if case == "cache":
        return [("resnet18", 1, "fp32", [])]
    return [("mlp", 1, "fp32", [(True, True)])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=("matrix", "bn", "steps", "cache"))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 20 steps (bn: 6), two settings (a CPU smoke run)")
    ap.add_argument("--steps", type=int, help="steps per find (default: the workload's; `steps` case: 3)")
    ap.add_argument("--out", type=Path, help="folder for probe-<case>.json (default results/<device>)")
    args = ap.parse_args(argv)
    out = args.out or RESULTS / args.device
    out.mkdir(parents=True, exist_ok=True)
    records, failed = [], False
    for name, k, precision, modes in settings(args.case, args.quick, args.device):
        w = workloads.get(name, args.device, args.quick)
        short = args.quick and args.case in ("bn", "cache")
        steps = args.steps or (3 if args.case == "steps" else 6 if short else w.steps)
        dataset = w.dataset()
        run = dict(dataset=dataset, device=args.device, steps=steps, k=k, precision=precision, batch=w.batch_size)
        if args.case == "cache":  # the engine's defaults for the device, the batches in each place
            for cache in ("device", "host"):
                rec, _ = find(w.model, compile=args.device == "cuda", graphs=args.device == "cuda", cache=cache, **run)
                records.append({"workload": name, **rec})
                failed |= "error" in rec
            continue
        eager, ref = find(w.model, compile=False, graphs=False, **run)
        records.append({"workload": name, **eager})
        for compile, graphs in modes:
            rec, curve = find(w.model, compile=compile, graphs=graphs, **run)
            rec["max_rel_diff_to_eager"] = diff = difference(curve, ref)
            rec["tolerance"] = TOLERANCE[precision]
            records.append({"workload": name, **rec})
            failed |= "error" in rec or (diff is not None and not diff <= TOLERANCE[precision])
        failed |= "error" in eager
    for rec in records:
        mode = f"compile={rec['compile_asked']!s:5} graphs={rec['graphs_asked']!s:5} cache={rec['cache_asked']}"
        what = rec.get("error") or (f"{rec['path']}; compiled {rec['compiled']}, graphs {rec['graphs']}, "
                                    f"{rec['dynamo_graphs']} Dynamo graphs, diff {rec.get('max_rel_diff_to_eager')}, "
                                    f"cache {rec['cache']}, peak {rec['peak_device_mib']} MiB, "
                                    f"{rec['step_ms']} ms/step, notes {rec['notes']}")  # fmt: skip
        print(f"{rec['workload']} K={rec['k']} {rec['precision']} {mode}: {what}", flush=True)
    path = out / f"probe-{args.case}{'' if args.case != 'steps' else records[0]['steps']}.json"
    path.write_text(json.dumps(records, indent=1, default=str) + "\n")
    print(f"{path}: {len(records)} finds, " + ("FAILED" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
