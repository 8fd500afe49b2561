"""benchmarks/gpu.py, the one-command GPU run: the plan it builds for a GPU (without running it), its stage runner
(failures and timeouts recorded, the next stage run, a timed-out stage's whole process group killed), and a dry run
of every stage's CPU-sized version end to end (~45 s on the 2-core CPU machine, one thread per process)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from benchmarks import gpu
except ImportError:  # pytest run from elsewhere: the repo root holds benchmarks/
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from benchmarks import gpu

# most informative first (issue 16): versions, the kernel and capture tests, the find probes, then the benchmarks
STAGES = ["wheels", "install", "env", "triton", "capture", "probe", "cuda-tests", "kernels", "layers", "bn", "cache",
          "short", "compare", "candidates", "readme"]  # fmt: skip
PY = sys.executable


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MPLCONFIGDIR=str(tmp_path / "mpl"))


def _argv(stages, name: str, label: str | None = None) -> list[str]:
    stage = next(s for s in stages if s.name == name)
    return next(p for p in stage.parts if label in (None, p.label)).argv


def test_the_gpu_plan_runs_every_stage_on_cuda_into_results_cuda_within_8_minutes(tmp_path):
    before = gpu.RESULTS.exists()
    stages = gpu.plan()
    assert [s.name for s in stages] == STAGES
    assert {s.name: s.budget_s for s in stages} == gpu.BUDGET_S and sum(gpu.BUDGET_S.values()) <= 480
    out = str(gpu.RESULTS)

    pip = [PY, "-m", "pip", "install", "--no-deps", "--no-index"]
    assert _argv(stages, "install") == [*pip, "--no-build-isolation", "-e", "."]
    assert callable(stages[1].skip)  # the build backend is looked for when the stage's turn comes
    for name in ("triton", "capture", "cuda-tests"):
        assert _argv(stages, name) == [PY, "-m", "pytest", "-q", "--junitxml", f"{out}/tests-{name}.xml",
                                       *gpu.TESTS[name]]  # fmt: skip
    probe = [PY, "-m", "benchmarks.probe"]
    assert _argv(stages, "probe") == [*probe, "matrix", "--device", "cuda", "--out", out]
    assert _argv(stages, "bn") == [*probe, "bn", "--device", "cuda", "--out", out]
    short = next(s for s in stages if s.name == "short").parts  # each length in its own process, 4 before 3
    assert [p.argv for p in short] == [[*probe, "steps", "--steps", n, "--device", "cuda", "--out", out]
                                       for n in ("4", "3")]  # fmt: skip

    compare = next(s for s in stages if s.name == "compare")
    assert [p.label for p in compare.parts] == [*gpu.WORKLOADS, "render"]
    for p in compare.parts[:-1]:
        assert p.argv[:7] == [PY, "-m", "benchmarks.compare", "--device", "cuda", "--workloads", p.label]
        assert p.timeout_s == gpu.COMPARE[p.label][0]
    assert _argv(stages, "compare", "render") == [PY, "-m", "benchmarks.compare", "--render", f"{out}/compare.csv"]
    assert _argv(stages, "kernels") == [PY, "-m", "benchmarks.bench_kernels", "--device", "cuda", "--out", out]
    assert _argv(stages, "layers") == [PY, "-m", "benchmarks.bench_layers", "--device", "cuda", "--out", out]
    assert _argv(stages, "candidates") == [PY, "-m", "benchmarks.bench_candidates", "--device", "cuda",
                                           *gpu.CANDIDATES, "--out", out]  # fmt: skip
    assert _argv(stages, "readme") == [PY, "-m", "benchmarks.readme"]  # rewrites README.md
    assert gpu.RESULTS.exists() == before  # nothing made or run


def test_the_plan_takes_wheels_no_install_other_results_and_workloads(tmp_path):
    (tmp_path / "torch_lr_finder-0.2.2-py3-none-any.whl").touch()
    (tmp_path / "a-1.0-py3-none-any.whl").touch()
    out = tmp_path / "out"
    stages = gpu.plan(out, wheels=tmp_path, install=False, workloads=("gpt2",))
    assert stages[0].skip is None and _argv(stages, "wheels")[-2:] == [
        str(tmp_path / "a-1.0-py3-none-any.whl"), str(tmp_path / "torch_lr_finder-0.2.2-py3-none-any.whl")]
    assert stages[1].skip == "--no-install"
    compare = next(s for s in stages if s.name == "compare")
    assert [p.label for p in compare.parts] == ["gpt2", "render"] and compare.budget_s == 150 + gpu.RENDER_S
    assert _argv(stages, "readme") == [PY, "-m", "benchmarks.readme", "--print", "--dir", str(out)]
    assert "no *.whl" in gpu.plan(wheels=out)[0].skip  # an empty (or missing) folder: nothing to install
    assert not out.exists()


def test_every_flag_of_the_plan_is_one_its_benchmark_module_takes(capsys):
    from benchmarks import bench_candidates, bench_kernels, bench_layers, compare, contestants, probe, workloads

    helps = {}
    for module in (compare, bench_kernels, bench_layers, bench_candidates, probe):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        helps[module.__name__] = capsys.readouterr().out
    for dry in (False, True):
        stages = gpu.plan(dry=dry, workloads=tuple(gpu.COMPARE))
        parts = [p for s in stages for p in s.parts if p.argv[1] == "-m" and p.argv[2] in helps]
        # the workloads, the render, kernels, layers, candidates, the 5 probes
        assert len(parts) == (1 if dry else len(gpu.COMPARE)) + 4 + 5
        for part in parts:
            for flag in (a for a in part.argv if a.startswith("--")):
                assert re.search(rf"{flag}\b", helps[part.argv[2]]), (flag, part.argv[2])
    for _, flags in gpu.COMPARE.values():
        names = flags[flags.index("--contestants") + 1].split(",")
        assert set(names) <= set(contestants.CONTESTANTS)
    assert set(gpu.COMPARE) == set(workloads.WORKLOADS)
    assert set(gpu.CANDIDATES[1].split(",")) <= set(bench_candidates.CHOICES)


def test_every_test_file_with_cuda_cases_is_run_or_said_why_not():
    tests = Path(__file__).parent
    found = {f"tests/{p.name}" for p in tests.glob("*.py") if "cuda.is_available" in p.read_text()
             and p.name != Path(__file__).name}  # fmt: skip
    run = {t.split("::")[0] for t in gpu.CUDA_TESTS}
    assert found <= run | set(gpu.NOT_CUDA_ONLY)
    for t in gpu.CUDA_TESTS:
        path, _, name = t.partition("::")
        assert (tests.parent / path).exists() and (not name or f"def {name}(" in (tests.parent / path).read_text())


def test_a_failing_part_is_recorded_with_its_tail_and_the_stage_goes_on(tmp_path):
    stage = gpu.Stage("x", [gpu.Part("a", [PY, "-c", "print('boom'); raise SystemExit(3)"], 30),
                            gpu.Part("b", [PY, "-c", "print('fine')"], 30)])  # fmt: skip
    rec = gpu.run_stage(stage, tmp_path / "logs")
    assert rec["status"] == "failed" and rec["exit_status"] == 3 and rec["budget_s"] == 60
    assert rec["parts"]["a"]["tail"][-1] == "boom" and rec["parts"]["b"]["status"] == "ok"
    assert (tmp_path / "logs" / "x-b.log").read_text().splitlines()[-1] == "fine"


def _running(pid: int) -> bool:
    """Whether pid is a live process (a killed one may linger as a zombie until its new parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_part_past_its_budget_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    spawn = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")  # fmt: skip
    rec = gpu.run_part(gpu.Part("slow", [PY, "-c", spawn], 2), tmp_path / "logs" / "slow.log")
    assert rec["status"] == "timeout" and rec["wall_s"] < 20
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:  # the signal lands a moment after the kill
        time.sleep(0.05)
    assert not _running(child)  # the grandchild went with its process group


def test_the_suite_exits_nonzero_when_a_stage_failed_and_still_runs_the_next(tmp_path, monkeypatch, capsys):
    fake = [gpu.Stage("one", [gpu.Part("one", [PY, "-c", "raise SystemExit(1)"], 30)]),
            gpu.Stage("two", [gpu.Part("two", [PY, "-c", "pass"], 30)])]  # fmt: skip
    monkeypatch.setattr(gpu, "plan", lambda *a, **k: fake)
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 1
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["stages"]["one"]["status"] == "failed" and env["stages"]["two"]["status"] == "ok"
    assert "FAILED: one" in capsys.readouterr().out


def test_a_gpu_run_on_a_machine_without_one_stops_after_env(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the run would run")
    p = subprocess.run([PY, "-m", "benchmarks.gpu", "--no-install", "--out", str(tmp_path / "out")], cwd=gpu.ROOT,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    stages = json.loads((tmp_path / "out" / "env.json").read_text())["stages"]
    assert stages["env"]["status"] == "failed" and "no CUDA device" in stages["env"]["tail"][-1]
    assert all(stages[n]["status"] == "skipped" for n in STAGES[3:])
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["env.json", "env.log", "logs"]


def test_dry_run_prints_the_plan_and_runs_every_stage_cpu_sized_into_out(tmp_path):
    readme = (gpu.ROOT / "README.md").read_bytes()
    results = gpu.RESULTS.exists()
    out = tmp_path / "out"
    p = subprocess.run([PY, "-m", "benchmarks.gpu", "--dry-run", "--out", str(out)], cwd=gpu.ROOT, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    gpu_plan, dry_plan = p.stdout.split("dry run (", 1)
    for name in STAGES:  # both plans list every stage, with its budget
        assert re.search(rf"\d\. {name} +\d+ s", gpu_plan) and re.search(rf"\d\. {name} +\d+ s", dry_plan), name
    assert "--device cuda" in gpu_plan and "--device cuda" not in dry_plan

    env = json.loads((out / "env.json").read_text())
    assert list(env["stages"]) == STAGES and env["dry_run"] is True
    assert env["git_commit"] and env["date"] and env["python"] and env["torch"] and "gpu" in env
    for name, rec in env["stages"].items():
        assert {"status", "wall_s", "exit_status", "budget_s"} <= set(rec), name
        assert rec["status"] == ("skipped" if name in ("wheels", "install") else "ok"), (name, rec)
    assert env["stages"]["install"]["reason"] == "dry run: no pip install"
    assert set(env["stages"]["compare"]["parts"]) == {"mlp", "render"}

    for name in ("compare", "kernels", "candidates"):
        assert all((out / f"{name}.{ext}").stat().st_size > 0 for ext in ("csv", "md", "png")), name
    assert all((out / f"layers.{ext}").stat().st_size > 0 for ext in ("csv", "md"))
    assert "| mlp | lrfast |" in (out / "logs" / "readme.log").read_text()
    for name in ("triton", "capture", "cuda-tests"):
        assert "collected" in (out / "logs" / f"{name}.log").read_text() and (out / f"tests-{name}.xml").exists()
    probes = {p.name: json.loads(p.read_text()) for p in out.glob("probe-*.json")}
    assert sorted(probes) == ["probe-bn.json", "probe-cache.json", "probe-matrix.json", "probe-steps3.json",
                              "probe-steps4.json"]  # fmt: skip
    assert [r["cache"]["mode"] for r in probes["probe-cache.json"]] == ["device", "host"]
    assert [r["steps"] for r in probes["probe-steps3.json"]] == [3]
    matrix = probes["probe-matrix.json"]  # on CPU: eager, then compiled without graphs, K = 1 and 8
    assert [(r["k"], r["compile_asked"]) for r in matrix] == [(1, False), (1, True), (8, False), (8, True)]
    assert all(r["max_rel_diff_to_eager"] <= r["tolerance"] and r["dynamo_graphs"] == 1 for r in matrix[1::2])
    scratch = re.search(r"--out (\S+)/mlp", dry_plan).group(1)
    assert not Path(scratch).exists()  # the per-workload parts, merged into out/compare.csv
    assert (gpu.ROOT / "README.md").read_bytes() == readme and gpu.RESULTS.exists() == results
