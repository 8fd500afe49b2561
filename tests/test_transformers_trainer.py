"""lrfast.integrations.transformers: the range test with a Hugging Face Trainer's own model, dataloader, optimizer
recipe and loss (a tiny GPT-2 from a config, no download), standalone and as a TrainerCallback."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_same_rng, assert_same_state, rng_states, state_of

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("lrfast.integrations.transformers")


def _trainer(tmp_path, callbacks=(), **args):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=97, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (48, 16), generator=g)]
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, report_to=[],
                    use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                    learning_rate=5e-5)  # fmt: skip
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**{**defaults, **args}),
                                train_dataset=data, callbacks=list(callbacks))  # fmt: skip


def test_find_uses_the_trainers_recipe_sets_its_learning_rate_and_restores_the_model(tmp_path):
    trainer = _trainer(tmp_path)
    before, rng = state_of(trainer.model), rng_states()
    res = hf.find(trainer, steps=30, max_lr=1.0)
    assert_same_state(before, state_of(trainer.model))
    assert_same_rng(rng, rng_states())
    assert res.suggestion is not None and trainer.args.learning_rate == res.suggestion
    assert trainer.optimizer is None  # train() makes its own optimizer, at the new LR
    assert res.info["optimizer"] == "AdamW" and res.info["loop"] == "transformers.Trainer"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written
    trainer.train()
    assert trainer.optimizer.param_groups[0]["initial_lr"] == res.suggestion


def test_find_with_update_false_keeps_the_learning_rate_and_follows_accumulation(tmp_path):
    trainer = _trainer(tmp_path, gradient_accumulation_steps=2)
    res = hf.find(trainer, steps=12, max_lr=1.0, update=False)
    assert trainer.args.learning_rate == 5e-5 and res.steps_run >= 1


def test_the_callback_runs_the_range_test_before_training_and_trains_at_the_suggestion(tmp_path):
    callback = hf.LRFastCallback(steps=30, max_lr=1.0)
    trainer = _trainer(tmp_path, callbacks=[callback])
    trainer.train()
    lr = callback.result.suggestion
    assert lr is not None and trainer.args.learning_rate == lr
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(lr, rel=1e-12)
    assert trainer.lr_scheduler.base_lrs[0] == pytest.approx(lr, rel=1e-12)
