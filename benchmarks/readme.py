"""Render README's performance section from the committed CSVs under benchmarks/results/<device>/ (never typed by
hand): `python -m benchmarks.readme` rewrites the text between the perf markers in README.md; `--print` only
prints the section; `--print --dir DIR` prints one results folder's part (benchmarks/gpu.py, results elsewhere)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.report import num, provenance, read_csv

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("bare", "torch_lr_finder", "lightning")
START, END = "<!-- perf:start (python -m benchmarks.readme) -->", "<!-- perf:end -->"


def _link(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()
    return f"[{rel}]({rel})"


def _per_workload(rows: list[dict], text) -> list[str]:
    """text(row) for the first row of each workload, in the CSV's order."""
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["workload"], text(r))
    return list(seen.values())


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _compare(path: Path) -> list[str]:
    rows = read_csv(path)
    r0 = rows[0]
    steps = _per_workload(rows, lambda r: f"{r['workload']} {r['steps']} steps x batch {r['batch_size']} "
                                          f"({r['optimizer']}, {r['precision']})")  # fmt: skip
    out = [f"Range test, lrfast vs peers: {r0['device']}, {r0['cores']} cores, {r0['threads']} threads, torch "
           f"{r0['torch']}, commit {r0['commit']}, {r0['date']}; {'; '.join(steps)} ({_link(path)}):", ""]
    cells = [[r["workload"], r["contestant"], r["k"], num(r["ms_per_step_warm"], ".3f"),
              num(r["ms_per_step_steady"], ".3f"), num(r["wall_s_first"], ".3f"),
              *(num(r[f"speedup_vs_{p}"], ".2f") for p in PEERS), r["note"]] for r in rows]  # fmt: skip
    head = ["workload", "contestant", "K", "ms/step warm", "ms/step steady", "first call s", "speedup vs bare loop",
            "vs torch-lr-finder", "vs Lightning", "note"]  # fmt: skip
    if any(r["compile_s"] or r["capture_s"] or r["cuda_max_alloc_mb"] for r in rows):
        head[6:6] = ["compile s", "capture s", "CUDA max MB"]
        for c, r in zip(cells, rows):
            c[6:6] = [num(r["compile_s"], ".2f"), num(r["capture_s"], ".2f"), num(r["cuda_max_alloc_mb"], ".0f")]
    return [*out, *_table(head, cells), ""]


def _candidates(path: Path) -> list[str]:
    rows = read_csv(path)
    r0 = rows[0]
    cols = ("ms_per_step_one_pass", "ms_per_step_sequential", "speedup_vs_sequential")
    head, extra = ["workload", "K", "forward", "ms/step one pass", "ms/step sequential", "speedup"], []
    what = "K candidates in one pass vs K sequential K = 1 runs"
    if r0.get("early_stop_threshold"):  # bench_candidates --early-stop
        what += (f", early stop on (the smoothed loss above {r0['early_stop_threshold']}x its best; LRs 1e-4 -> 1, "
                 "each sequential run ending at its stop)")  # fmt: skip
        head, extra = [*head, "stopped of K"], ["stopped_candidates"]
    return [f"{what}: {r0['device']}, {r0['cores']} cores, torch {r0['torch']}, {provenance(rows)} ({_link(path)}):",
            "",
            *_table(head, [[r["workload"], r["k"], r["forward"], *(num(r[c], ".2f") for c in cols),
                            *(r[c] for c in extra)] for r in rows]),
            ""]  # fmt: skip


def _kernels(path: Path) -> list[str]:
    rows = [r for r in read_csv(path) if r["us_best"]]
    r0 = rows[0]
    return [f"AdamW optimizer step (28 B/param): {r0['device']}, {r0['threads']} threads, torch {r0['torch']}, "
            f"triton {r0['triton'] or '-'}, commit {r0['commit']}, {r0['date']} ({_link(path)}):", "",
            *_table(["kernel", "params", "K", "µs best", "GB/s", "of copy", "vs torch fused"],
                    [[r["kernel"], f"{int(r['params']):,}", r["k"], num(r["us_best"], ".1f"), num(r["gbps"], ".1f"),
                      num(r["fraction_of_copy"], ".2f"), num(r["speedup_vs_torch_fused"], ".2f")] for r in rows]),
            ""]  # fmt: skip


def _quality(path: Path) -> list[str]:
    # imported here: benchmarks.quality imports lrfast, which the other tables do not need
    from benchmarks.quality import seeds_run, summary_table

    rows = read_csv(path)
    r0 = rows[0]
    truth = _per_workload(rows, lambda r: f"{r['workload']} {r['optimizer']}, {r['truth_steps']} steps, "
                                          f"{r['truth_lrs']} LRs {r['grid_min_lr']} -> {r['grid_max_lr']}")  # fmt: skip
    md = path.with_suffix(".md")
    return [f"Suggestion quality, each finder's suggested LR against real training: {r0['device']}, torch "
            f"{r0['torch']}, commit {r0['commit']}, {r0['date']} ({_link(path)}, definitions and per-seed "
            f"suggestions in {_link(md)}). Ground truth: validation loss after N steps at a constant LR, mean of "
            f"{r0['truth_seeds']} seeds ({'; '.join(truth)}); regret = (outcome at the suggestion - best) "
            f"/ |best|, mean over {seeds_run(rows)} seeds; spread = max - min of log10(suggestion) over them, in "
            "decades:",
            "", *summary_table(rows), ""]  # fmt: skip


def device_section(device_dir: Path) -> list[str]:
    """One results folder's tables, under a heading named after the folder (cpu, cuda)."""
    out = [f"#### {device_dir.name.upper()}", ""]
    for name, render in (("compare", _compare), ("quality", _quality), ("candidates", _candidates),
                         ("candidates_early_stop", _candidates), ("kernels", _kernels)):  # fmt: skip
        if (device_dir / f"{name}.csv").exists():
            out += render(device_dir / f"{name}.csv")
    return out


def _has_rows(device_dir: Path) -> bool:
    return any((device_dir / f"{name}.csv").exists() for name in ("compare", "quality", "candidates", "kernels"))


def section(results: Path = ROOT / "benchmarks" / "results") -> str:
    out = []
    # a folder without CSVs (a GPU run whose benchmarks all failed leaves env.json and logs) renders nothing
    for device_dir in sorted(p for p in results.iterdir() if p.is_dir() and _has_rows(p)):
        out += device_section(device_dir)
    if not _has_rows(results / "cuda"):
        out += ["#### CUDA", "", "GPU results pending: no GPU run committed yet (`benchmarks/gpu.sh` on a GPU "
                "machine runs the CUDA tests, `benchmarks.compare`, `bench_kernels` and `bench_candidates` with "
                "`--device cuda` into benchmarks/results/cuda/, then `python -m benchmarks.readme`).", ""]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.split(":")[0])
    ap.add_argument("--print", action="store_true", help="print the section instead of rewriting README.md")
    ap.add_argument("--dir", type=Path, help="with --print: only this results folder (e.g. a GPU run's --out)")
    args = ap.parse_args(argv)
    if args.dir and not args.print:
        ap.error("--dir only goes with --print (README.md is rendered from benchmarks/results)")
    if args.print:
        print("\n".join(device_section(args.dir)) if args.dir else section())
        return 0
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section()}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
