"""`lrfast demo | find | bench | info` on the command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from lrfast import options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrfast", description="A learning-rate range test fast enough to be free.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="LeNet-5 + Adam on bundled digits (28x28): the seed workload, in seconds",
                          description="The seed workload: LeNet-5, Adam, batch 64, LR 1e-8 -> 1 over 100 steps, on "
                          "scikit-learn's bundled digits upscaled to 28x28 (no download; needs scikit-learn: pip "
                          "install 'lrfast[demo]'), or on (Fashion-)MNIST IDX files with --data. Writes lr_find.png "
                          "and lr_find.json into --out.")  # fmt: skip
    demo.add_argument("--data", default=None, help="folder with (Fashion-)MNIST IDX files to use instead")
    demo.add_argument("--out", default=".", help="where lr_find.png and lr_find.json go, created if missing "
                      "(default: current folder)")  # fmt: skip
    demo.add_argument("--batch-size", type=int, default=64, help="(default %(default)s)")
    options.add_arguments(demo, min_lr=1e-8, max_lr=1.0, optimizer="adam")  # the seed workload's sweep

    find = sub.add_parser("find", help="range test of your model: MODULE:FUNCTION returns (model, loader)",
                          description="Range test of a model given as MODULE:FUNCTION, a function of no arguments "
                          "returning (model, loader), (model, loader, loss_fn) or a dict with keys model, loader "
                          "and optionally loss_fn / optimizer / val_loader. The options are those of lrfast.find "
                          "(generated from lrfast.options.FindOptions).")  # fmt: skip
    find.add_argument("target", help="MODULE:FUNCTION (the module importable from the current folder)")
    find.add_argument("--out", default=None, help="write lr_find.png and lr_find.json into this folder (created if "
                      "missing)")  # fmt: skip
    options.add_arguments(find)

    bench = sub.add_parser("bench", help="benchmarks side by side with the peers (needs a checkout of the repo)",
                           description="Runs the benchmark suite (benchmarks/ in lrfast's source repository, not in "
                           "the installed package) from the checkout lrfast is installed from (pip install -e).")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to python -m benchmarks")

    sub.add_parser("info", help="which backends are live, and why any is not")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        from lrfast import info

        print(json.dumps(info(), indent=1))
        return 0
    if args.command == "bench":
        return _bench(args.args)
    created = _init_torchrun()  # before the target is loaded: its loader may shard by rank (DistributedSampler)
    try:
        if args.command == "demo":
            model, loader, given = *_demo_workload(args), {}
        else:
            model, loader, given = _load_target(args.target)
        return _run(args, model, loader, given, args.out)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _init_torchrun() -> bool:
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) with no group yet: join the default group (gloo for CPU
    tensors, nccl for CUDA ones, each rank on GPU LOCAL_RANK). Returns whether it created the group."""
    if not all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group()  # no backend named: cpu -> gloo, cuda -> nccl (torch's default map)
    return True


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _demo_workload(args):
    from lrfast import data

    if args.data and not os.path.isdir(args.data):
        raise SystemExit(f"lrfast: --data {args.data!r} is not a folder; pass the folder holding the (Fashion-)MNIST "
                         "IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz])")  # fmt: skip
    dataset = data.fashion_mnist(args.data) if args.data else data.digits(image_size=28)
    import torch

    torch.manual_seed(args.seed)  # the demo model's init: the same demo prints the same numbers
    return data.lenet5(), data.loader(dataset, batch_size=args.batch_size, seed=args.seed)


def _load_target(target: str):
    module_name, sep, func_name = target.partition(":")
    if not sep or not module_name or not func_name:
        raise SystemExit(f"lrfast find: target {target!r} must be MODULE:FUNCTION, e.g. mytrain:make_model")
    sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"lrfast find: cannot load {target!r}: {e}") from e
    made = fn()
    if isinstance(made, dict):
        missing = [key for key in ("model", "loader") if key not in made]
        if missing:
            raise SystemExit(f"lrfast find: {target} returned a dict without {', '.join(missing)}; return a dict with "
                             "model, loader[, loss_fn, optimizer, val_loader] or a tuple (model, loader[, loss_fn])")
        return made["model"], made["loader"], {k: made[k] for k in ("loss_fn", "optimizer", "val_loader") if k in made}
    if isinstance(made, (tuple, list)) and len(made) in (2, 3):
        return made[0], made[1], ({"loss_fn": made[2]} if len(made) == 3 else {})
    raise SystemExit(f"lrfast find: {target} returned {type(made).__name__}; return (model, loader[, loss_fn]) or "
                     "a dict with model, loader[, loss_fn, optimizer]")  # fmt: skip


def _run(args, model, loader, given: dict, out) -> int:
    """find(model, loader) with the flags' options; `given`: what the target returned besides (loss_fn, optimizer,
    val_loader: the target's optimizer wins over --optimizer)."""
    import lrfast
    from lrfast.errors import DistributedError

    rank = _rank()  # only rank 0 checks --out, prints and writes (other nodes may not have the folder)
    if rank == 0 and out is not None:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"lrfast: --out {out!r} cannot be created ({e.strerror}); pass a folder you can write "
                             "to") from e  # fmt: skip
    if rank == 0 and out is not None and not os.access(out, os.W_OK):
        raise SystemExit(f"lrfast: --out {out!r} is not writable; pass a folder you can write to")
    try:
        result = lrfast.find(model, loader, **{**options.kwargs_from_args(args), **given})
    except (ValueError, TypeError, DistributedError) as e:  # find's checks, another rank's failure: clear messages
        raise SystemExit(f"lrfast: {e}") from e
    if rank != 0:
        return 0
    t = result.timings
    if result.strategy == "grid":
        print(f"suggested LR (grid: the largest LR scoring within {result.tolerance:g} of the best): "
              f"{_fmt(result.suggestion)}")  # fmt: skip
        print("scores (mean loss, last 10 % of steps): " + ", ".join(
            f"{lr:.3g}: {s:.4g}" for lr, s in zip(result.lrs[:, 0], result.scores)))  # fmt: skip
    else:
        interval = result.interval
        around = "" if interval is None else f" (10-90 % over {result.k} replicas: {_fmt(interval[0])} .. " \
            f"{_fmt(interval[1])})"
        print(f"suggested LR ({result.method}{', median' if interval else ''}): {_fmt(result.suggestion)}{around}")
        others = ", ".join(f"{m} {_fmt(v)}" for m, v in result.suggestions().items() if m != result.method)
        print(f"other methods{' (replica 0)' if result.k > 1 else ''}: {others}")
    why = result.why_no_suggestion()
    if why:
        print(why)
    print(f"steps run: {result.steps_run}/{args.steps}  time: total {t['total']:.2f} s (setup {t['setup']:.2f} s, "
          f"steps {t['steps']:.2f} s, {1e3 * t['steps'] / max(result.steps_run, 1):.2f} ms/step)  "
          f"optimizer: {result.info['optimizer']} ({result.info['optimizer_path']}), forward: {result.info['forward']}")
    if out is not None:
        png, js = os.path.join(out, "lr_find.png"), os.path.join(out, "lr_find.json")
        result.plot(png)
        result.to_json(js)
        print(f"wrote {png} and {js}")
    return 0


def _fmt(x) -> str:
    return "none" if x is None else f"{x:.3g}"


def _bench(argv: list[str]) -> int:
    """The suite lives in the source tree next to the lrfast package (an editable install, or python -m from a
    checkout): found from lrfast's own location, never from the current folder (a user's own `benchmarks`)."""
    import lrfast

    root = os.path.dirname(os.path.dirname(os.path.abspath(lrfast.__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "compare.py")):
        raise SystemExit(f"lrfast bench: the benchmark suite is not installed with the package (lrfast is imported "
                         f"from {os.path.dirname(lrfast.__file__)}); it lives in benchmarks/ of lrfast's source "
                         "repository: clone it, pip install -e '.[bench]', then run lrfast bench (or python -m "
                         "benchmarks) in the checkout")  # fmt: skip
    sys.path.insert(0, root)
    from benchmarks import compare

    return compare.main(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
