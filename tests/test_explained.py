"""Nothing fails silently: a run with no suggestion says why and what to change (result.info["notes"], the CLI),
and the files a user asks for are written like any other file of theirs (the umask)."""

import os
import textwrap
import warnings

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


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.transpose(1, 2) for z in self.qkv(x).view(b, t, 3, 2, 8).unbind(2))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(b, t, 16).mean(1))


class _Renorm(nn.Module):
    """Each sequence's mean through torch.renorm, which has no vmap batching rule: vmap's fallback runs it once per
    candidate inside the batched call."""

    def forward(self, x):
        return torch.renorm(x.mean(1), 2, 0, 1.0)


def _renormed() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), _Renorm(), nn.Linear(16, 3))


class _MaskedItem(nn.Module):
    """BERT-like data-dependent code on a per-batch mask: .item() under vmap fails when each candidate has its own
    batch (seeds)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.out = nn.Linear(16, 3)

    def forward(self, x, mask):
        if mask.sum().item() > 0:
            x = x * mask[..., None]
        return self.out(x.mean(1))


def _sequences(n=3, with_mask=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x, y = torch.randn(4, 6, 16, generator=g), torch.randint(0, 3, (4,), generator=g)
        out.append((x, torch.ones(4, 6), y) if with_mask else (x, y))
    return out


def test_attention_under_vmap_takes_the_batched_math_kernel_with_no_slow_path_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lrfast.find(_Attention(), _sequences(), strategy="grid", candidates=3, steps=4, progress=False,
                          forward="vmap")
    assert res.info["forward"] == "vmap (K=3)" and not any("batching rule" in n for n in res.info["notes"])
    assert not [w for w in caught if "batching rule" in str(w.message)]


def test_an_op_without_a_vmap_batching_rule_is_one_note_not_a_warning_per_step():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lrfast.find(_renormed(), _sequences(), strategy="grid", candidates=3, steps=4, progress=False,
                          forward="vmap")
    assert res.info["forward"] == "vmap (K=3)"
    assert any("no batching rule for aten::renorm" in n and "slow path" in n for n in res.info["notes"])
    assert not [w for w in caught if "batching rule" in str(w.message)]


def test_vmap_failing_on_the_first_step_is_a_note_with_the_whole_first_line_of_the_error():
    res = lrfast.find(_MaskedItem(), _sequences(with_mask=True), strategy="seeds", candidates=3, steps=4,
                      progress=False)  # fmt: skip
    assert res.info["forward"].startswith("loop (K=3): vmap failed on the first step: RuntimeError: vmap:")
    (note,) = [n for n in res.info["notes"] if "per-candidate loop" in n]
    assert ".item()" in note and note.endswith(".") and "slower than one batched call" in note


def test_seeds_with_unstackable_batches_say_so_in_the_notes():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (16, 16, 9)]
    res = lrfast.find(make_mlp(), batches, strategy="seeds", candidates=2, steps=3, progress=False)
    assert any("per-candidate loop" in n and "differs in shape" in n for n in res.info["notes"])
