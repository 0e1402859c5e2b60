"""Shipped jobs shrunk by overrides: every family, ZeRO-3 export, bf16, and the real pretrained MiniLM."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.conftest import assert_ok, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # full training runs of shipped jobs (not in `make test-fast`)

SMALL_CLM = ["stages.0.max_steps=4", "stages.0.model.hidden_size=32", "stages.0.model.num_heads=2",
             "stages.0.model.intermediate_size=64", "stages.0.tokenizer.vocab_size=400",
             "stages.0.data.seq_len=32", "stages.0.data.max_train_samples=200", "stages.0.data.max_eval_samples=20",
             "stages.0.eval_every=2", "stages.0.log_every=1"]  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_clm_job(tmp_path, family) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("run", "jobs/pretrain-gpt-clm.yaml", "--local", f"output_dir={tmp_path}",
                     f"stages.0.model.family={family}", *SMALL_CLM)  # fmt: skip
    assert_ok(result)
    stage = tmp_path / "pretrain-gpt-clm" / "pretrain"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["eval"]["perplexity"])
    model = AutoModelForCausalLM.from_pretrained(stage / "model")
    assert model.config.model_type == family
    tok = AutoTokenizer.from_pretrained(stage / "model")
    ids = tok("In the beginning", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "In the beginning", "byte-level BPE round-trips text"
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_zero3_bf16_tiny(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    result = run_cli("run", "jobs/debug/tiny.yaml", "--local", f"output_dir={tmp_path}", "deepspeed.zero_stage=3",
                     "stages.0.precision=bf16", "stages.1.precision=bf16", "stages.0.max_steps=20")  # fmt: skip
    assert_ok(result)
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "tiny" / "pretrain" / "metrics.jsonl")]
    # bf16 step-to-step noise (~0.03) exceeds 8 steps' progress: compare the first and last five steps.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.03, losses
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tiny" / "finetune" / "model")
    weights = model.bert.embeddings.word_embeddings.weight
    assert weights.shape == (1000, 32) and weights.abs().sum() > 0, "ZeRO-3 shards were gathered for the export"


def test_cpu_offload_trains_like_no_offload(tmp_path) -> None:
    """ZeRO-Offload (optimizer; ZeRO-3 also parameters) moves state to CPU memory, not the numbers."""
    runs = {
        "plain": ["deepspeed.zero_stage=2", "stages.0.max_steps=20"],
        "offload_optimizer": ["deepspeed.zero_stage=2", "stages.0.max_steps=20", "deepspeed.offload_optimizer=true"],
        "offload_all": [
            "deepspeed.zero_stage=3",
            "stages.0.max_steps=20",
            "deepspeed.offload_optimizer=true",
            "deepspeed.offload_param=true",
        ],
    }
    losses = {}
    for name, overrides in runs.items():
        if name != "plain":  # the same prepared data and tokenizer (a fresh prepare may break vocabulary ties anew)
            for part in ("job.json", "pretrain/data"):  # the tokenizer is inside the prepared data
                source, target = tmp_path / "plain" / "tiny" / part, tmp_path / name / "tiny" / part
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
        result = run_cli("run", "jobs/debug/tiny.yaml", "--local", "--stage", "pretrain",
                         f"output_dir={tmp_path / name}", *overrides)  # fmt: skip
        assert_ok(result)
        losses[name] = [r["train/loss"] for r in read_jsonl(tmp_path / name / "tiny" / "pretrain" / "metrics.jsonl")]
    assert sum(losses["plain"][-5:]) < sum(losses["plain"][:5]), "training moved (first vs last five of 20 steps)"
    for name in ("offload_optimizer", "offload_all"):
        assert losses[name] == pytest.approx(losses["plain"], abs=1e-5), name


@pytest.mark.parametrize("local", [True, False])
def test_fp16_on_cpu_is_refused_before_anything_runs(tmp_path, local) -> None:
    mode = ["--local"] if local else ["cluster.num_workers=2"]  # Ray mode: refused before a private Ray starts
    if local and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device, where fp16 is allowed (CI has none)")
    result = run_cli("run", "jobs/debug/tiny.yaml", *mode, f"output_dir={tmp_path}", "stages.1.precision=fp16")
    assert result.returncode == 2
    assert "stages.1.precision: fp16 needs a GPU" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "tiny").exists(), "nothing was prepared or written"
    if local:  # `--stage NAME` runs only that stage: another stage's fp16 is not in the way
        other = run_cli("run", "jobs/debug/tiny.yaml", "--local", "--stage", "finetune",
                        f"output_dir={tmp_path / 'one'}", "stages.0.precision=fp16")  # fmt: skip
        assert other.returncode == 2 and "fp16" not in other.stderr, other.stderr[-2000:]
        assert "reads stage 'pretrain', which has not completed" in other.stderr


def test_minilm_finetune_job_loads_the_real_pretrained_bert(tmp_path) -> None:
    result = run_cli("run", "jobs/finetune-minilm-rt.yaml", "--local", f"output_dir={tmp_path}",
                     "stages.0.max_steps=3", "stages.0.epochs=null", "stages.0.data.max_train_samples=96",
                     "stages.0.data.max_eval_samples=64", "stages.0.log_every=1")  # fmt: skip
    assert_ok(result)
    from safetensors.torch import load_file

    export = load_file(tmp_path / "finetune-minilm-rt" / "finetune" / "model" / "model.safetensors")
    original = load_file("data/models/all-minilm-l6-v2/model.safetensors")
    key = "embeddings.word_embeddings.weight"
    assert export[f"bert.{key}"].shape == original[key].shape == (30522, 384)
    # three small steps from the pretrained weights: still close to them
    assert (export[f"bert.{key}"] - original[key]).norm() / original[key].norm() < 0.05
