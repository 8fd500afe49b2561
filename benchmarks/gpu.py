"""The GPU run in one command, for a fresh CUDA machine with no package registry: install lrfast, check the CUDA
paths, then run the benchmarks with --device cuda into benchmarks/results/cuda/ (CSV, MD and PNG as in results/cpu/,
plus env.json, probe-*.json, tests-*.xml and logs/), then render README's performance tables.

    python -m benchmarks.gpu [--wheels DIR] [--no-install] [--out DIR] [--workloads mlp,lenet,...]
    python -m benchmarks.gpu --plan-only     # print the stages (commands, budgets); run nothing
    python -m benchmarks.gpu --dry-run       # print them, then run each stage's CPU-sized version into --out DIR
    benchmarks/gpu.sh ...                    # the same from the repo root (relative paths are taken from there)

Stages run in turn, most informative first, so that a run cut short still tells the most: wheels (pip install
--no-deps --no-index DIR/*.whl: torch-lr-finder, or the build backend), install (pip install -e .), env (GPU,
versions incl. NCCL, lrfast.info()), triton (the kernel tests, compiled), capture (the CUDA graph tests: K = 1, grid,
seeds, under sync-debug "error"), probe (find on the MLP, K = 1 and 8, fp32 and bf16, compile and graphs on and
off: path, notes, timings, Dynamo graphs, distance to the eager curve), cuda-tests (the other CUDA cases), kernels
(bandwidth, aligned and unaligned rows), layers (each common layer's K-candidate forward + backward as a loop, under
vmap and written out batched), bn (bf16 + BatchNorm), cache (the batches on the device or the host:
peak memory), short (steps = 4, then 3, each in its own process:
a device-side assert poisons only its process), compare (one process per workload, merged into one compare.csv),
candidates, readme. Each runs as a subprocess in its own process group, killed at its time budget (BUDGET_S), its
output in OUT/logs/<stage>.log. A stage that fails or runs out of time is recorded in env.json (exit status, the
last lines of its log) and the next one runs; the exit code is 1 if any failed. env.json is rewritten after every
stage, so a run cut short still says how far it got.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cuda"
PY = sys.executable

# compare.py on CUDA, one process per workload: compare.py writes its CSV only at the end, so a workload that runs out
# of time loses its own rows only. Every lrfast call on CUDA compiles and captures its step, and a first call is a
# fresh process per contestant (Python + torch + CUDA start-up, 6 contestants): so first calls on the seed workload
# only, the K = 16 / 32 rows on the MLP only, ResNet-18 with the K = 1 contestants and one repetition. char-GPT and
# GPT-2-shaped (a cold torch.compile of 12 layers is about a minute by itself) run only when named in --workloads.
# Budgets in seconds. None is measured on a GPU yet (the session that wrote this had none): they are estimates from
# these sizes, and env.json records each part's wall seconds to set them from.
K1 = "lrfast,torch_lr_finder,lightning,bare"
COMPARE = {
    "mlp": (40, ["--contestants", "lrfast,lrfast_k16,lrfast_k32,torch_lr_finder,lightning,bare", "--repeats", "2",
                 "--first-repeats", "0"]),
    "lenet": (50, ["--contestants", K1, "--repeats", "2", "--first-repeats", "1"]),
    "resnet18": (40, ["--contestants", K1, "--repeats", "1", "--first-repeats", "0"]),
    "chargpt": (60, ["--contestants", K1, "--repeats", "1", "--first-repeats", "0"]),
    "gpt2": (150, ["--contestants", K1, "--first-repeats", "0"]),
}
WORKLOADS = ("mlp", "lenet", "resnet18")
RENDER_S = 10  # compare.py --render of the merged CSV: one process, matplotlib

# Time budget per stage, in seconds: each is its stage's timeout and together they are 480 s, so a run with the
# default workloads ends within 8 minutes on one H100/H200 (plus the machine's own start-up) whatever happens.
BUDGET_S = {
    "wheels": 15,  # pip --no-index of one or two wheels: a few seconds
    "install": 40,  # cmake configure + one pybind11 C++ file at -O3 (no torch headers) + pip's editable wheel
    "env": 10,  # one python: import torch, CUDA init, device name, NCCL version, lrfast.info()
    "triton": 30,  # ~85 kernel tests; Triton JIT-compiles each kernel specialization once, then caches it
    "capture": 30,  # test_graphed: its CPU cases and ~10 CUDA ones, each a small capture
    "probe": 60,  # 13 finds on the MLP, 8 of them compiled (Inductor's cache makes the later ones faster)
    "cuda-tests": 15,  # the other CUDA cases
    "kernels": 20,  # 6 cases x 7 kernels x 41 rounds of ~4 ms timed, plus set-up: 100M-param randn on the host
    "layers": 15,  # 9 layers x K = 4, 16 x 3 forms (loop, vmap, explicit), ~1 ms calls: which batched form wins
    "bn": 15,  # 2 finds on a small BatchNorm ResNet in bf16, K = 4, one compiled
    "cache": 10,  # ResNet-18 K = 1 with cache="device" and "host": peak memory and ms/step
    "short": 30,  # steps = 4 and 3: 2 processes of 2 finds each (CUDA init, one compile each)
    "compare": sum(COMPARE[w][0] for w in WORKLOADS) + RENDER_S,  # 140: the parts above
    "candidates": 40,  # mlp, K = 1 and 8: ~17 lrfast calls, each with its own compile + capture
    "readme": 10,
}
SHORT_STEPS = (4, 3)  # 4 first: the last length that worked before the step counter was reset between warm-ups
CANDIDATES = ["--workloads", "mlp", "--ks", "1,8", "--steps", "100", "--repeats", "1"]
DRY_TIMEOUT_S = 120  # per part of a dry run: 3-13 s each, 60 s in all on the 2-core CPU machine (more when shared)

# grep cuda.is_available tests/: the CUDA-only cases are in test_graphed (skipif no CUDA) and test_triton (compiled
# on CUDA, interpreted on CPU), and test_find's info test asserts info["cuda"]. The others found by the grep:
TESTS = {"triton": ("tests/test_triton.py",), "capture": ("tests/test_graphed.py",),
         "cuda-tests": ("tests/test_find.py::test_info_reports_backends", "tests/test_cache.py")}  # fmt: skip
CUDA_TESTS = tuple(t for stage in TESTS.values() for t in stage)
NOT_CUDA_ONLY = {
    "tests/_helpers.py": "triton_kernels(), a helper of test_graphed and test_triton",
    "tests/test_bench_smoke.py": "its CUDA case is skipped when a GPU is there; the rest are CPU --quick runs",
}

PROBE = """import importlib.metadata as md, json, platform, torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
cuda = torch.cuda.is_available()
env = {"gpu": torch.cuda.get_device_name(0) if cuda else None, "gpu_count": torch.cuda.device_count(),
       "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
       "cuda_available": cuda, "python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "triton": v("triton"), "lrfast": v("lrfast"),
       "pytorch_lightning": v("pytorch-lightning"), "torch_lr_finder": v("torch-lr-finder")}
try:
    env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if cuda else None
except Exception as e:
    env["nccl"] = f"unknown ({type(e).__name__}: {e})"
try:
    import lrfast
    env["lrfast_path"], env["lrfast_info"] = str(lrfast.__file__), lrfast.info()
except Exception as e:
    env["lrfast_info"] = f"import lrfast failed: {type(e).__name__}: {e}"
print(json.dumps(env, default=str))"""


@dataclass
class Part:
    label: str
    argv: list[str]
    timeout_s: float
    before: Callable[[], str | None] | None = None  # runs first, in this process; a message fails the part


@dataclass
class Stage:
    name: str
    parts: list[Part]
    skip: str | Callable[[], str | None] | None = None  # why it does not run; a callable decides when its turn comes

    @property
    def budget_s(self) -> float:
        return sum(p.timeout_s for p in self.parts)


def _shown(argv: list[str], short: bool = False) -> str:
    """The command as env.json records it; short (for the console): `python`, and paths from the repo root."""
    if short:
        argv = ["python" if a == PY else a.removeprefix(f"{ROOT}{os.sep}") for a in argv]
    return f"{argv[0]} -c '<env probe>'" if argv[1:3] == ["-c", PROBE] else shlex.join(argv)


def why_not_installable() -> str | None:
    """Why `pip install --no-build-isolation -e .` cannot build here (it installs no build requirement itself)."""
    importlib.invalidate_caches()  # the wheels stage may have just installed them
    missing = []
    for module in ("scikit_build_core.build", "pybind11"):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - missing, or missing one of its own dependencies
            missing.append(module.split(".")[0])
    if not (shutil.which("cmake") or importlib.util.find_spec("cmake")):
        missing.append("cmake")
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        missing.append("a C++ compiler")
    if not missing:
        return None
    return (f"the build needs {', '.join(missing)} (bring wheels with --wheels DIR); lrfast runs from the checkout "
            "without lrfast._C, whose CPU kernels no CUDA stage uses")  # fmt: skip


def merge_csv(scratch: Path, workloads: list[str], dest: Path) -> str | None:
    """scratch/<workload>/compare.csv as one dest (same columns), then scratch removed; None, or why nothing merged."""
    columns, rows = None, []
    for path in (scratch / w / "compare.csv" for w in workloads):
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                columns, rows = columns or reader.fieldnames, rows + list(reader)
    if not rows:
        return "no workload wrote a compare.csv: see the compare-<workload> logs"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shutil.rmtree(scratch, ignore_errors=True)
    return None


def plan(out: Path = RESULTS, wheels: Path | None = None, install: bool = True, dry: bool = False,
         workloads=WORKLOADS) -> list[Stage]:  # fmt: skip
    """The stages of a GPU run (dry: their CPU-sized versions), built without running anything."""
    device = ["--device", "cpu", "--quick"] if dry else ["--device", "cuda"]

    def part(label: str, argv: list[str], budget_s: float, **kw) -> Part:
        return Part(label, argv, DRY_TIMEOUT_S if dry else budget_s, **kw)

    found = sorted(wheels.glob("*.whl")) if wheels else []
    tlf = "installed" if importlib.util.find_spec("torch_lr_finder") else "not installed: its rows will say so"
    skip = None if found else f"no *.whl in {wheels}" if wheels else f"no --wheels DIR (torch-lr-finder {tlf})"
    pip = [PY, "-m", "pip", "install", "--no-deps", "--no-index"]
    no_pip = "dry run: no pip install" if dry else None
    stages = [
        Stage("wheels", [part("wheels", [*pip, *map(str, found)], BUDGET_S["wheels"])], skip or no_pip),
        Stage("install", [part("install", [*pip, "--no-build-isolation", "-e", "."], BUDGET_S["install"])],
              no_pip or (None if install else "--no-install") or why_not_installable),
        Stage("env", [part("env", [PY, "-c", PROBE], BUDGET_S["env"])]),
    ]  # fmt: skip

    # a dry run collects the tests: their CUDA cases skip on CPU, and running the CPU ones is the suite's job
    def tests(stage: str) -> Stage:
        argv = [PY, "-m", "pytest", "-q", *(["--collect-only"] if dry else []), "--junitxml",
                str(out / f"tests-{stage}.xml"), *TESTS[stage]]  # fmt: skip
        return Stage(stage, [part(stage, argv, BUDGET_S[stage])])

    probe = [PY, "-m", "benchmarks.probe"]
    stages += [tests("triton"), tests("capture"),
               Stage("probe", [part("probe", [*probe, "matrix", *device, "--out", str(out)], BUDGET_S["probe"])]),
               tests("cuda-tests")]  # fmt: skip

    kernels = [PY, "-m", "benchmarks.bench_kernels", *device, "--out", str(out)]
    stages.append(Stage("kernels", [part("kernels", kernels, BUDGET_S["kernels"])]))
    layers = [PY, "-m", "benchmarks.bench_layers", *device, "--out", str(out)]
    stages.append(Stage("layers", [part("layers", layers, BUDGET_S["layers"])]))
    stages.append(Stage("bn", [part("bn", [*probe, "bn", *device, "--out", str(out)], BUDGET_S["bn"])]))
    stages.append(Stage("cache", [part("cache", [*probe, "cache", *device, "--out", str(out)], BUDGET_S["cache"])]))
    stages.append(Stage("short", [
        part(f"steps{n}", [*probe, "steps", "--steps", str(n), *device, "--out", str(out)],
             BUDGET_S["short"] / len(SHORT_STEPS)) for n in SHORT_STEPS]))  # fmt: skip

    scratch = Path(tempfile.gettempdir()) / f"lrfast-gpu-compare-{os.getpid()}"
    compare, runs = [PY, "-m", "benchmarks.compare"], list(workloads[:1] if dry else workloads)
    flags = {w: ["--contestants", "lrfast,bare"] if dry else COMPARE[w][1] for w in runs}
    merged = out / "compare.csv"
    stages.append(Stage("compare", [
        *(part(w, [*compare, *device, "--workloads", w, *flags[w], "--out", str(scratch / w)], COMPARE[w][0])
          for w in runs),
        part("render", [*compare, "--render", str(merged)], RENDER_S, before=lambda: merge_csv(scratch, runs, merged)),
    ]))  # fmt: skip

    cand = [PY, "-m", "benchmarks.bench_candidates", *device, *(["--workloads", "mlp"] if dry else CANDIDATES)]
    stages.append(Stage("candidates", [part("candidates", [*cand, "--out", str(out)], BUDGET_S["candidates"])]))
    # README.md is rendered from benchmarks/results only; results anywhere else are printed into the log
    readme = [PY, "-m", "benchmarks.readme"] + ([] if out == RESULTS and not dry else ["--print", "--dir", str(out)])
    stages.append(Stage("readme", [part("readme", readme, BUDGET_S["readme"])]))
    return stages


def print_plan(stages: list[Stage], title: str) -> None:
    """Each stage's budget (its parts' timeouts) and command line; a dry run's parts all have DRY_TIMEOUT_S."""
    print(f"{title}: {len(stages)} stages, budget {sum(s.budget_s for s in stages):.0f} s")
    for i, s in enumerate(stages, 1):
        many = len(s.parts) > 1 and not isinstance(s.skip, str)  # compare: a line per workload
        what = f"skipped: {s.skip}" if isinstance(s.skip, str) else "" if many else _shown(s.parts[0].argv, True)
        print(f"  {i}. {s.name:10} {s.budget_s:4.0f} s  {what}".rstrip())
        for p in s.parts if many else []:
            print(f"       {p.label:10} {p.timeout_s:4.0f} s  {_shown(p.argv, True)}")
    sys.stdout.flush()


def _kill(p: subprocess.Popen) -> None:
    """The part's whole process group (compare's fresh-process children, inductor's compile workers too): SIGTERM,
    up to 10 s for the leader to go, then SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:  # the group is gone
            break
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
    p.wait()


def _tail(path: Path, n: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def run_part(part: Part, log: Path) -> dict:
    t0 = time.perf_counter()
    rec = {"command": _shown(part.argv), "timeout_s": part.timeout_s, "log": f"{log.parent.name}/{log.name}"}
    try:
        why = part.before() if part.before else None
    except Exception as e:  # noqa: BLE001 - e.g. an unreadable part CSV: this part fails, the suite goes on
        why = f"{type(e).__name__}: {e}"
    if why:
        return {**rec, "status": "failed", "exit_status": None, "wall_s": 0.0, "tail": [why]}
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")  # logs complete up to a kill; no display
    with open(log, "w") as f:
        f.write(f"$ {_shown(part.argv)}\n")
        f.flush()
        p = subprocess.Popen(part.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            rc, status = p.wait(part.timeout_s), None
        except BaseException as e:  # the budget ran out, or Ctrl-C: the part's processes go with it
            _kill(p)
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            rc, status = p.returncode, "timeout"
    rec.update(status=status or ("ok" if rc == 0 else "failed"), exit_status=rc,
               wall_s=round(time.perf_counter() - t0, 2))  # fmt: skip
    if rec["status"] != "ok":
        rec["tail"] = _tail(log)
    return rec


def run_stage(stage: Stage, logs: Path) -> dict:
    skip = stage.skip() if callable(stage.skip) else stage.skip
    if skip:
        print(f"[{stage.name}] skipped: {skip}", flush=True)
        return {"status": "skipped", "reason": skip, "budget_s": stage.budget_s, "wall_s": 0.0, "exit_status": None}
    parts = {}
    for part in stage.parts:
        name = stage.name if len(stage.parts) == 1 else f"{stage.name}-{part.label}"
        print(f"[{name}] running (budget {part.timeout_s:.0f} s) ...", flush=True)
        parts[part.label] = r = run_part(part, logs / f"{name}.log")
        print(f"[{name}] {r['status']} in {r['wall_s']:.1f} s (exit status {r['exit_status']})", flush=True)
        for line in r.get("tail", []):
            print(f"    | {line}")
    if len(parts) == 1:
        return {**next(iter(parts.values())), "budget_s": stage.budget_s}
    bad = [(k, r) for k, r in parts.items() if r["status"] != "ok"]
    return {"status": "failed" if bad else "ok", "budget_s": stage.budget_s,
            "wall_s": round(sum(r["wall_s"] for r in parts.values()), 2),
            "exit_status": next((r["exit_status"] for _, r in bad), 0), "parts": parts,
            **({"tail": [f"{k}: {line}" for k, r in bad for line in r["tail"][-5:]]} if bad else {})}  # fmt: skip


def git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, metavar="DIR", help="wheels to install first (no index, no dependencies)")
    ap.add_argument("--no-install", action="store_true", help="skip `pip install -e .` (lrfast runs from the checkout)")
    ap.add_argument("--out", type=Path, metavar="DIR", help="results folder (default benchmarks/results/cuda; a dry "
                    "run: a temporary one)")  # fmt: skip
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"compare's, from {', '.join(COMPARE)} "
                    f"(default {','.join(WORKLOADS)}: the 8-minute budget)")  # fmt: skip
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--plan-only", action="store_true", help="print the stages and run nothing")
    mode.add_argument("--dry-run", action="store_true", help="print the stages, then run CPU-sized versions")
    args = ap.parse_args(argv)
    workloads = tuple(w for w in args.workloads.split(",") if w)
    if not workloads or set(workloads) - set(COMPARE):
        ap.error(f"--workloads: choose from {', '.join(COMPARE)}")

    gpu_out = (RESULTS if args.dry_run or not args.out else args.out).resolve()
    stages = plan(gpu_out, args.wheels, not args.no_install, False, workloads)
    print_plan(stages, f"GPU run, results in {gpu_out}")
    if args.plan_only:
        return 0
    out = gpu_out
    if args.dry_run:
        out = (args.out or Path(tempfile.mkdtemp(prefix="lrfast-gpu-dry-"))).resolve()
        stages = plan(out, args.wheels, not args.no_install, True, workloads)
        print_plan(stages, f"dry run (device cpu, --quick sizes, tests only collected), results in {out}")

    out.mkdir(parents=True, exist_ok=True)
    dirty = git("status", "--porcelain")
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git("rev-parse", "HEAD")
           or "unknown", "git_dirty": None if dirty is None else bool(dirty), "dry_run": args.dry_run,
           "argv": sys.argv[1:] if argv is None else list(argv), "out": str(out), "budget_s": BUDGET_S,
           "python": sys.version.split()[0], "stages": {}}  # fmt: skip
    no_gpu = None
    try:
        for stage in stages:
            if no_gpu:
                rec = {"status": "skipped", "reason": no_gpu, "budget_s": stage.budget_s, "wall_s": 0.0,
                       "exit_status": None}  # fmt: skip
            else:
                rec = run_stage(stage, out / "logs")
            env["stages"][stage.name] = rec
            if stage.name == "env" and rec["status"] == "ok":
                lines = [ln for ln in _tail(out / rec["log"], 50) if ln.startswith("{")]
                env.update(json.loads(lines[-1]) if lines else {})
                print(f"[env] GPU {env.get('gpu')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, triton "
                      f"{env.get('triton')}, Python {env.get('python')}", flush=True)  # fmt: skip
            if stage.name == "env" and not args.dry_run and not env.get("cuda_available"):
                no_gpu = "no CUDA device (see the env stage): nothing to measure here; --dry-run runs the CPU plan"
                rec.update(status="failed", tail=rec.get("tail", []) + [no_gpu])
                print(f"[env] failed: {no_gpu}", flush=True)
            (out / "env.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    except KeyboardInterrupt:
        (out / "env.json").write_text(json.dumps({**env, "interrupted": True}, indent=1, default=str) + "\n")
        return 130
    failed = [n for n, r in env["stages"].items() if r["status"] in ("failed", "timeout")]
    total = sum(r["wall_s"] for r in env["stages"].values())
    print(f"done in {total:.0f} s; {out / 'env.json'}; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
