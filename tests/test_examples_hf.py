"""examples/hf_causal_lm.py: GPT-2 with its tokenizer, a Hugging Face collator and dynamic padding."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import ROOT

pytest.importorskip("transformers", reason="pip install 'ddp-train[examples]'")


def test_gpt2_with_a_collator_trains_and_reports_the_true_token_mean(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    from hf_causal_lm import CausalLM

    from ddp_train import fit

    task = CausalLM(n_embd=16, n_layer=1, n_head=2)
    result = fit(task, max_steps=3, batch_size=4, eval_batch_size=3, lr=3e-3, optimizer="adamw",
                 run_dir=str(tmp_path / "run"), progress=False)
    assert result.status == "done" and result.step == 3
    model = task.model(None)
    model.load_state_dict(torch.load(result.checkpoint, weights_only=True)["model"])
    model.eval()
    collate, total, tokens = task.collate("val"), 0.0, 0
    with torch.no_grad():
        for sample in task.data(None)["val"]:  # one unpadded sentence at a time
            batch = collate([sample])
            n = int(task.count(batch))
            total, tokens = total + task.loss(model, batch).double().item() * n, tokens + n
    assert result.metrics["val_loss"] == pytest.approx(total / tokens, rel=1e-5, abs=0)
