"""Derived values: batch arithmetic, the DeepSpeed config, and the parameter count behind the memory estimate."""

from __future__ import annotations

import pytest

from launcher.errors import UserError
from launcher.spec.deepspeed_config import build_deepspeed_config
from launcher.spec.load import load_spec
from launcher.spec.models import ModelSpec
from launcher.spec.plan import count_params, model_states_bytes, plan_stage
from tests.conftest import TINY


def test_global_batch_is_derived_once() -> None:
    spec = load_spec(TINY, ["cluster.num_workers=4", "stages.0.batch.grad_accum_steps=null",
                            "stages.0.batch.global_batch_size=64"])  # fmt: skip
    plan = plan_stage(spec, 0, local=False)
    assert (plan.world_size, plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size) == (4, 8, 2, 64)
    assert plan.tokens_per_step == 64 * 32
    local = plan_stage(spec, 0, local=True)
    assert (local.world_size, local.grad_accum_steps) == (1, 8)
    config = build_deepspeed_config(spec.deepspeed, spec.stages[0], plan)
    assert config["train_batch_size"] == 64
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * 4 == 64
    bad = load_spec(TINY, ["cluster.num_workers=3", "stages.0.batch.grad_accum_steps=null",
                           "stages.0.batch.global_batch_size=64"])  # fmt: skip
    with pytest.raises(UserError, match=r"stages.0.batch.global_batch_size: 64 is not a multiple of .* 24"):
        plan_stage(bad, 0, local=False)


def test_epochs_become_steps() -> None:
    spec = load_spec(TINY, ["stages.1.max_steps=null", "stages.1.epochs=2"])
    plan = plan_stage(spec, 1, local=True, num_train_samples=100)
    assert plan.steps == 2 * 7  # ceil(100 / 16) steps per epoch


def test_zero_memory_formula_halves_optimizer_state() -> None:
    n = 1_000_000
    assert model_states_bytes(n, "fp32", 0, 2) == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n}
    # fp32 under ZeRO >= 1: DeepSpeed's fp32 master partition joins the two Adam moments.
    assert model_states_bytes(n, "fp32", 1, 2) == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 12 * n // 2}
    assert model_states_bytes(n, "bf16", 2, 2) == {"weights": 2 * n, "gradients": n, "optimizer": 6 * n}
    assert sum(model_states_bytes(n, "bf16", 3, 4).values()) == 16 * n // 4


@pytest.mark.parametrize(
    ("family", "task", "auto"),
    [
        ("bert", "mlm", "AutoModelForMaskedLM"),
        ("bert", "classification", "AutoModelForSequenceClassification"),
        ("gpt2", "clm", "AutoModelForCausalLM"),
        ("gpt2", "classification", "AutoModelForSequenceClassification"),
        ("llama", "clm", "AutoModelForCausalLM"),
        ("llama", "classification", "AutoModelForSequenceClassification"),
    ],
)
def test_param_count_matches_transformers(family, task, auto, tmp_path) -> None:
    import transformers

    from launcher.data.tokenizer import train_tokenizer
    from launcher.tasks import _model_config

    tok = train_tokenizer(["some text for a vocabulary"] * 20, family, 300, True, tmp_path / "tok")
    model_spec = ModelSpec(family=family, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96,
                           max_position_embeddings=80)  # fmt: skip
    num_labels = 3 if task == "classification" else None
    config = _model_config(model_spec, len(tok), tok, num_labels)
    model = getattr(transformers, auto).from_config(config)
    sizes = {"vocab": len(tok), "hidden": 64, "layers": 3, "inter": 96, "positions": 80, "heads": 4}
    assert count_params(family, task, sizes, num_labels or 2) == sum(p.numel() for p in model.parameters())
