"""ELECTRA-style replaced-token detection (`task: rtd`): sampling, shared embeddings, what is scored, a real run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors import safe_open

from launcher.jobspec.models import StageSpec
from launcher.models.electra_pair import sample_tokens
from launcher.tasks import build_task
from tests.conftest import assert_ok, read_jsonl, run_cli


class _Tokenizer:
    """What the task reads of a tokenizer: 0 pad, 1 [CLS], 2 [SEP], 3 [MASK]; 50 tokens."""

    pad_token_id, cls_token_id, mask_token_id = 0, 1, 3
    all_special_ids = (0, 1, 2, 3)

    def __len__(self) -> int:
        return 50


def _stage(**extra: object) -> StageSpec:
    model = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "dropout": 0.0}
    return StageSpec(name="p", task="rtd", model=model, data={"train": "x.jsonl", "seq_len": 16}, max_steps=1, **extra)


def test_sampling_follows_the_generator_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).repeat(40_000, 1)
    drawn = sample_tokens(logits, torch.rand(40_000, generator=torch.Generator().manual_seed(0)))
    share = torch.bincount(drawn, minlength=4).double() / len(drawn)
    expected = logits[0].softmax(-1).double()
    assert torch.allclose(share, expected, atol=0.01), (share, expected)
    # the edges of [0, 1) map to the first and the last token with any probability
    assert sample_tokens(logits[:2], torch.tensor([0.0, 0.999999])).tolist() == [0, 2]


def test_pair_shares_embeddings_and_scores_every_real_token() -> None:
    stage = _stage(rtd={"generator_size": 0.5})
    task = build_task(stage, _Tokenizer())
    torch.manual_seed(0)
    pair = task.build_model(None)
    disc, gen = pair.discriminator, pair.generator
    assert gen.electra.embeddings is disc.electra.embeddings
    assert gen.generator_lm_head.weight is disc.electra.embeddings.word_embeddings.weight
    assert (gen.config.hidden_size, gen.config.num_attention_heads, gen.config.intermediate_size) == (16, 2, 32)
    assert disc.config.hidden_size == 32 and gen.config.num_hidden_layers == disc.config.num_hidden_layers == 2

    rows = [torch.tensor([1, *range(10, 24), 2]).numpy(), torch.tensor([1, 30, 31, 2]).numpy()]
    batch = task.collate([{"input_ids": r} for r in rows], torch.Generator().manual_seed(3))
    chosen = batch["labels"] != -100
    assert chosen.any() and bool((batch["input_ids"][chosen] == 3).all()), "every chosen position is [MASK]"
    assert not chosen[:, 0].any() and not chosen[batch["attention_mask"] == 0].any(), "specials and padding kept"
    out = pair(**batch)
    real = int(batch["attention_mask"].sum())
    assert int(out.scored) == real and int(out.masked) == int(chosen.sum())
    assert torch.allclose(out.loss, out.generator_loss + 50.0 * out.discriminator_loss)
    again = pair(**batch)
    assert torch.equal(out.loss, again.loss), "the same draws replace the same tokens (dropout off)"
    out.loss.backward()
    assert gen.generator_predictions.dense.weight.grad.abs().sum() > 0, "the generator learns from its MLM loss"
    assert disc.discriminator_predictions.dense.weight.grad.abs().sum() > 0
    assert disc.electra.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    count = sum(p.numel() for p in pair.parameters())
    from launcher.models.count import count_parameters

    assert count_parameters(stage, stage.model, None, 50) == count, "the plan counts both networks, shared ones once"


@pytest.mark.slow
def test_rtd_job_exports_an_electra_that_fine_tunes(tmp_path) -> None:
    result = run_cli("run", "jobs/debug/tiny.yaml", "--local", f"output_dir={tmp_path}", "stages.0.task=rtd",
                     "stages.0.max_steps=40", "stages.0.eval_every=10", "stages.0.optim.lr=3e-3")  # fmt: skip
    assert_ok(result)
    job = tmp_path / "tiny"
    evals = [r for r in read_jsonl(job / "pretrain" / "metrics.jsonl") if "eval/generator_loss" in r]
    assert evals[-1]["eval/generator_loss"] < evals[0]["eval/generator_loss"] - 0.1, evals
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"], evals
    summary = json.loads((job / "pretrain" / "summary.json").read_text())
    assert 0.5 < summary["eval"]["accuracy"] <= 1.0 and math.isfinite(summary["eval"]["generator_perplexity"])

    model, info = transformers.AutoModelForPreTraining.from_pretrained(job / "pretrain" / "model",
                                                                       output_loading_info=True)  # fmt: skip
    assert type(model).__name__ == "ElectraForPreTraining" and not info["missing_keys"], info
    with safe_open(job / "pretrain" / "model" / "model.safetensors", "pt") as weights:
        assert not [key for key in weights.keys() if "generator" in key], "the export is the discriminator alone"
    assert "has no weights for classifier.dense, classifier.out_proj" in result.stdout
    finetuned = transformers.AutoModelForSequenceClassification.from_pretrained(job / "finetune" / "model")
    assert type(finetuned).__name__ == "ElectraForSequenceClassification"
    exported = model.electra.embeddings.word_embeddings.weight
    tuned = finetuned.electra.embeddings.word_embeddings.weight
    assert torch.allclose(exported, tuned, atol=0.1) and not torch.equal(exported, tuned), "fine-tuned from the export"
