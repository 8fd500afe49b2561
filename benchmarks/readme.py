"""Render README's performance section from the committed CSVs under benchmarks/results/<device>/ (never typed by
hand): `python -m benchmarks.readme` rewrites the text between the perf markers in README.md."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("bare", "torch_lr_finder", "lightning")
KERNELS = ("lrfast_cpp", "torch_fused", "torch_fused_adamw_direct")
START, END = "<!-- perf:start (python -m benchmarks.readme) -->", "<!-- perf:end -->"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(x: str, fmt: str) -> str:
    try:
        return format(float(x), fmt)
    except ValueError:
        return x or "-"


def section(results: Path = ROOT / "benchmarks" / "results") -> str:
    out = []
    for device_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        compare, kernels = device_dir / "compare.csv", device_dir / "kernels.csv"
        candidates = device_dir / "candidates.csv"
        if compare.exists():
            rows = _rows(compare)
            r0 = rows[0]
            out += [f"Range test, {r0['steps']} steps, batch {r0['batch_size']}, Adam; {r0['device']}, {r0['cores']} "
                    f"cores, torch {r0['torch']}, commit {r0['commit']}, {r0['date']} "
                    f"([{compare.relative_to(ROOT)}]({compare.relative_to(ROOT)})):", "",
                    "| workload | contestant | ms/step warm | first call s | speedup vs bare loop | vs torch-lr-finder "
                    "| vs Lightning |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
            for r in rows:
                cells = [r["workload"], r["contestant"]]
                cells += [_num(r["ms_per_step_warm"], ".3f"), _num(r["wall_s_first"], ".3f")]
                cells += [_num(r[f"speedup_vs_{p}"], ".2f") for p in PEERS]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        if candidates.exists():
            rows = _rows(candidates)
            out += [f"K candidates in one pass vs K sequential K = 1 runs, {rows[0]['cores']} cores, torch "
                    f"{rows[0]['torch']}, commit {rows[0]['commit']} "
                    f"([{candidates.relative_to(ROOT)}]({candidates.relative_to(ROOT)})):", "",
                    "| workload | K | forward | ms/step one pass | ms/step sequential | speedup |",
                    "|---|---:|---|---:|---:|---:|"]  # fmt: skip
            for r in rows:
                cells = [r["workload"], r["k"], r["forward"]]
                cells += [_num(r[c], ".2f") for c in ("ms_per_step_one_pass", "ms_per_step_sequential",
                                                      "speedup_vs_sequential")]  # fmt: skip
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        if kernels.exists():
            rows = [r for r in _rows(kernels) if r["kernel"] in KERNELS]
            r0 = rows[0]
            out += [f"AdamW optimizer step, {r0['device']}, {r0['threads']} threads, torch {r0['torch']}, commit "
                    f"{r0['commit']} ([{kernels.relative_to(ROOT)}]({kernels.relative_to(ROOT)})):", "",
                    "| kernel | params | K | µs best | GB/s |", "|---|---:|---:|---:|---:|"]  # fmt: skip
            for r in rows:
                out.append(f"| {r['kernel']} | {int(r['params']):,} | {r['k']} | {r['us_best']} | {r['gbps']} |")
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
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
