"""`lrfast demo`, `lrfast find` and `lrfast info` on the command line."""

import json
import textwrap

import pytest

from lrfast import LRFindResult
from lrfast.cli import main


def test_demo_prints_suggestion_and_writes_png_and_json(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "suggested LR (valley)" in out and "ms/step" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.json", "lr_find.png"]
    res = LRFindResult.from_json(tmp_path / "lr_find.json")
    assert res.lrs[0, 0] == 1e-8 and res.lrs[0, -1] == 1.0 and res.info["optimizer"] == "Adam"


def test_find_runs_a_model_given_as_module_function(tmp_path, monkeypatch, capsys):
    (tmp_path / "mytrain.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
            return nn.Linear(4, 2), batches
    """))
    monkeypatch.chdir(tmp_path)
    assert main(["find", "mytrain:make", "--steps", "20", "--optimizer", "sgd", "--no-progress"]) == 0
    assert "suggested LR" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".pyc" and p.name != "__pycache__") == [
        "mytrain.py"
    ]


def test_find_help_documents_the_options_of_the_python_call(capsys):
    with pytest.raises(SystemExit):
        main(["find", "--help"])
    text = capsys.readouterr().out
    for option in ("--optimizer", "--min-lr", "--max-lr", "--steps", "--mode", "--smooth", "--early-stop-threshold",
                   "--suggestion", "--device", "--seed", "--no-progress", "--out"):  # fmt: skip
        assert option in text


@pytest.mark.parametrize("target", ["nocolon", "nosuchmodule_xyz:make"])
def test_find_with_a_bad_target_exits_with_a_message(target):
    with pytest.raises(SystemExit, match="MODULE:FUNCTION|cannot load"):
        main(["find", target])


def test_out_folder_is_created_when_missing(tmp_path, capsys):
    out = tmp_path / "results" / "run1"
    assert main(["demo", "--out", str(out), "--no-progress", "--steps", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]


def test_out_that_cannot_be_created_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="--out .* cannot be created"):
        main(["demo", "--out", str(tmp_path / "afile" / "sub"), "--no-progress"])
    assert "suggested" not in capsys.readouterr().out


def test_demo_help_describes_the_workload_and_the_demo_extra(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LeNet-5" in text and "lrfast[demo]" in text and "--data" in text


def test_bench_outside_a_checkout_says_where_the_suite_lives(tmp_path, monkeypatch):
    """Installed from a wheel, lrfast has no benchmarks/ beside it; the current folder is never searched (it may
    hold a user's own `benchmarks` package)."""
    import lrfast

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "compare.py").write_text("raise RuntimeError('the wrong suite was imported')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lrfast, "__file__", str(tmp_path / "site-packages" / "lrfast" / "__init__.py"))
    with pytest.raises(SystemExit, match="benchmarks/ of lrfast's source repository"):
        main(["bench"])


def test_info_prints_backends(capsys):
    assert main(["info"]) == 0
    assert "cpu_kernels" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("strategy", ["grid", "seeds"])
def test_demo_runs_k_candidates_with_a_strategy(tmp_path, capsys, strategy):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--steps", "12", "--strategy", strategy,
                 "--candidates", "3"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert ("scores" in out) if strategy == "grid" else ("10-90 % over 3 replicas" in out)
    assert LRFindResult.from_json(tmp_path / "lr_find.json").k == 3


def _write_idx(path, array, gz=False):
    import gzip
    import struct

    import numpy as np

    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    data = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_demo_reads_fashion_mnist_idx_files_with_data_dir(tmp_path, capsys):
    import numpy as np

    from lrfast import data

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), rng.integers(0, 10, 200).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    ds = data.fashion_mnist(tmp_path)
    assert ds.tensors[0].shape == (200, 1, 28, 28) and ds.tensors[1].tolist() == labels.tolist()
    assert float(ds.tensors[0].min()) == -1.0 and float(ds.tensors[0].max()) == 1.0
    out = tmp_path / "out"
    out.mkdir()
    assert main(["demo", "--data", str(tmp_path), "--out", str(out), "--steps", "5", "--no-progress"]) == 0
    assert "suggested LR" in capsys.readouterr().out


def test_data_dir_without_idx_files_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        main(["demo", "--data", str(tmp_path), "--no-progress"])


def test_find_help_has_a_flag_for_every_keyword_of_find(capsys):
    """The flags are generated from lrfast.options.FindOptions: every keyword of lrfast.find has one, but the two
    Python objects (loss_fn, val_loader), which a target's function returns."""
    import inspect

    import lrfast

    with pytest.raises(SystemExit):
        main(["find", "--help"])
    text = capsys.readouterr().out
    keywords = [n for n, p in inspect.signature(lrfast.find).parameters.items() if p.kind is p.KEYWORD_ONLY]
    for name in keywords:
        if name in ("loss_fn", "val_loader"):
            continue
        flag = "--no-progress" if name == "progress" else "--" + name.replace("_", "-")
        assert flag in text, f"{flag} missing from lrfast find --help"


def test_new_flags_reach_find(tmp_path, monkeypatch, capsys):
    (tmp_path / "withval.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
            return {"model": nn.Linear(4, 2), "loader": batches, "val_loader": batches[:2]}
    """))
    monkeypatch.chdir(tmp_path)
    assert main(["find", "withval:make", "--steps", "12", "--no-progress", "--strategy", "grid", "--lrs",
                 "1e-3,1e-2", "--tolerance", "0.1", "--accumulate", "2", "--val-every", "3", "--on", "val",
                 "--precision", "bf16", "--out", "res"]) == 0  # fmt: skip
    res = LRFindResult.from_json(tmp_path / "res" / "lr_find.json")
    assert res.k == 2 and res.tolerance == 0.1 and res.on == "val" and res.val_losses is not None
    assert "2 micro-batches per step, bf16 autocast" in res.info["forward"]
