"""Nothing fails silently: a run with no suggestion says why and what to change (result.info["notes"], the CLI),
and the files a user asks for are written like any other file of theirs (the umask)."""

import os
import textwrap

import pytest
import torch
from _helpers import make_batches, make_mlp
from torch import nn

import lrfast
from lrfast.cli import main


@pytest.mark.parametrize("kwargs", [dict(min_lr=50, max_lr=100), dict(strategy="seeds", candidates=2, min_lr=50,
                                                                       max_lr=100)], ids=["sweep", "seeds"])
def test_a_run_that_stops_at_once_says_why_there_is_no_suggestion_and_what_to_change(kwargs):
    res = lrfast.find(make_mlp(), make_batches(), steps=50, progress=False, **kwargs)
    assert res.suggestion is None and res.steps_run <= 3
    (note,) = [n for n in res.info["notes"] if n.startswith("no suggestion")]
    assert f"stopped at step {res.steps_run} of 50" in note and "suggestion='valley' needs at least 11" in note
    for fix in ("min_lr", "early_stop_threshold", "smooth"):
        assert fix in note


def test_too_few_steps_for_the_method_says_how_many_it_needs():
    res = lrfast.find(make_mlp(), make_batches(), steps=12, suggestion="torch_lr_finder", progress=False)
    assert res.steps_run == 12 and res.suggestion is None
    (note,) = [n for n in res.info["notes"] if n.startswith("no suggestion")]
    assert "needs at least 17" in note and "steps >= 22" in note and "valley (7)" in note


def test_grid_where_every_candidate_diverged_says_so():
    res = lrfast.find(make_mlp(), make_batches(), strategy="grid", lrs=[1e3, 1e4], steps=6, progress=False)
    assert res.suggestion is None
    assert any("every grid candidate diverged" in n and "lower max_lr" in n for n in res.info["notes"])


def test_a_run_with_a_suggestion_has_no_such_note():
    res = lrfast.find(make_mlp(), make_batches(), steps=30, progress=False)
    assert res.suggestion is not None and not any(n.startswith("no suggestion") for n in res.info["notes"])
    assert res.why_no_suggestion() is None


def test_cli_prints_why_there_is_no_suggestion(tmp_path, monkeypatch, capsys):
    (tmp_path / "blowup.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            return nn.Linear(4, 2), [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
    """))
    monkeypatch.chdir(tmp_path)
    assert main(["find", "blowup:make", "--min-lr", "50", "--max-lr", "100", "--steps", "20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "suggested LR (valley): none" in out and "no suggestion: the run stopped at step" in out


def test_json_and_png_follow_the_umask(tmp_path):
    res = lrfast.find(make_mlp(), make_batches(), steps=10, progress=False)
    old = os.umask(0o027)
    try:
        res.to_json(tmp_path / "r.json")
        res.plot(tmp_path / "r.png")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"r.json": 0o640, "r.png": 0o640}


def test_dict_batch_without_labels_says_to_add_labels_or_pass_loss_fn():
    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, input_ids, attention_mask=None):
            return {"logits": self.emb(input_ids)}

    batches = [{"input_ids": torch.randint(0, 10, (4, 6)), "attention_mask": torch.ones(4, 6)}] * 3
    with pytest.raises(ValueError, match=r"keys input_ids, attention_mask.*'labels'.*loss_fn="):
        lrfast.find(NoLoss(), batches, steps=5, progress=False)
