"""The DeepSpeed engine as the launcher builds it: fused AdamW, no self-all-reduce in a world of one.

Each check runs in a fresh process: DeepSpeed's process group outlives an engine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHECK = r"""
import contextlib, json, sys
import deepspeed, torch, transformers
from launcher.jobspec.load import load_spec
from launcher.jobspec.plan import StagePlan
from launcher.jobspec.deepspeed_config import build_deepspeed_config
from launcher.worker.context import local_context
from launcher.worker.engine import build_engine, param_groups

zero, precision, scale = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
spec = load_spec("jobs/finetune-minilm-rt.yaml",
                 [f"deepspeed.zero_stage={zero}", "stages.0.optim.grad_clip=0", f"stages.0.precision={precision}",
                  f"stages.0.optim.embedding_lr_scale={scale}"])
stage = spec.stages[0]
plan = StagePlan(name="t", task="classification", world_size=1, micro_batch_size=4, grad_accum_steps=1,
                 global_batch_size=4, eval_batch_size=4, seq_len=16, tokens_per_step=64, steps=10, zero_stage=zero,
                 num_params=None, model_states_bytes_per_worker=None, optimizer_states_bytes_per_worker=None)
config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
torch.manual_seed(0)
model = transformers.BertForSequenceClassification(config)
reference = transformers.BertForSequenceClassification(config)
reference.load_state_dict(model.state_dict())
ctx = local_context(use_gpu=False)
ds_config = build_deepspeed_config(spec.deepspeed, stage, plan, model)
engine = build_engine(model, ds_config, stage, plan.steps, ctx.device, 60)
ds_calls = []
original = engine.allreduce_gradients
engine.allreduce_gradients = lambda *a, **k: (ds_calls.append(1), original(*a, **k))[1]
optimizer = torch.optim.AdamW(param_groups(reference, stage.optim), lr=stage.optim.lr, foreach=False)
schedule = transformers.get_scheduler("linear", optimizer, num_warmup_steps=stage.schedule.warmup_steps,
                                      num_training_steps=plan.steps)
batch = {"input_ids": torch.randint(5, 100, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long),
         "labels": torch.tensor([0, 1, 1, 0])}
for _ in range(3):
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    reference(**batch).loss.backward()
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
params = list(engine.module.parameters())
with deepspeed.zero.GatheredParameters(params) if zero == 3 else contextlib.nullcontext():  # ZeRO-3: whole again
    gap = max(float((a.float() - b).abs().max()) for a, b in zip(params, reference.parameters()))
base = getattr(engine.optimizer, "optimizer", engine.optimizer)
print(json.dumps({"allreduce": engine.enable_backward_allreduce, "calls": len(ds_calls), "gap": gap,
                  "fused": bool(base.defaults.get("fused")), "groups": len(base.param_groups),
                  "lr_ratio": base.param_groups[-1]["lr"] / base.param_groups[0]["lr"]}))
"""


@pytest.mark.parametrize(
    ("zero", "precision", "scale"),
    [(0, "fp32", 1.0), (2, "fp32", 1.0), (0, "bf16", 1.0), (2, "fp32", 0.1), (3, "fp32", 0.1)],
)
def test_engine_matches_plain_adamw_and_skips_self_allreduce(zero, precision, scale) -> None:
    """World size 1: ZeRO-0 skips the all-reduce with itself and still takes plain AdamW's steps (fused);
    in bf16 (DeepSpeed's BF16 optimizer, fp32 master weights) up to bf16 rounding of the weights. With
    `embedding_lr_scale` the token embeddings are a third group whose scheduled rate stays scaled
    (under ZeRO-2's flattened groups and ZeRO-3's partitioned ones too)."""
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(zero), precision, str(scale)], cwd=ROOT, capture_output=True, text=True,
        check=False, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fused"], "the torch AdamW DeepSpeed builds is the fused one"
    tolerance = 1e-5 if precision == "fp32" else 2e-2  # bf16 keeps 8 bits of mantissa: |w| <= ~2 here
    assert result["gap"] < tolerance, f"3 steps drift from torch's AdamW by {result['gap']}"
    assert result["groups"] == (2 if scale == 1.0 else 3)
    assert result["lr_ratio"] == pytest.approx(1.0 if scale == 1.0 else scale), "the schedule lost the scale"
    if zero == 0:
        assert not result["allreduce"] and result["calls"] == 0, "a world of one all-reduced its gradients"
    else:
        assert result["allreduce"], "ZeRO-2/3 reduce gradients in their own hooks: the switch stays as DeepSpeed set it"


def test_deepspeed_ops_build_in_a_cache_folder_of_this_installation(monkeypatch) -> None:
    """torch names its extension cache by Python/CUDA version only, and the build files there name one
    installation's paths: two installations would rebuild each other's ops (~30 s) on every switch."""
    import os

    import torch

    from launcher.worker.engine import extensions_dir, ninja_bin_dir, select_accelerator

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    select_accelerator(torch.device("cpu"))
    ours = os.environ["TORCH_EXTENSIONS_DIR"]
    assert ours == extensions_dir() and ours.startswith(str(Path.home() / ".cache" / "torch_extensions"))
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-another")
    assert extensions_dir() != ours, "another installation, another folder"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    select_accelerator(torch.device("cpu"))
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/else", "the user's choice stays"
    # DeepSpeed's CPU collective op, built (or found) the way the engine does: in our folder.
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR")}
    build = (
        "import torch; from launcher.worker.engine import select_accelerator; select_accelerator(torch.device('cpu'));"
        "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None"
    )
    out = subprocess.run([sys.executable, "-c", build], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    library = Path(ours) / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    assert library.is_file()
    # A process whose PATH finds another ninja first (a system one) uses this installation's all the same:
    # two ninja releases read each other's build log as stale, and each switch rebuilt the op.
    built = library.stat().st_mtime_ns
    other = shutil.which("ninja", path="/usr/local/bin:/usr/bin:/bin")
    path = os.pathsep.join([str(Path(other).parent)] if other else []) + os.pathsep + env.get("PATH", "")
    again = subprocess.run([sys.executable, "-c", build + "; import shutil; print(shutil.which('ninja'))"], cwd=ROOT,
                           env={**env, "PATH": path}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == str(Path(ninja_bin_dir()) / "ninja")
    assert library.stat().st_mtime_ns == built, "not rebuilt"


CLIP_CHECK = r"""
import json, sys
import torch, transformers
from launcher.jobspec.load import load_spec
from launcher.jobspec.plan import StagePlan
from launcher.jobspec.deepspeed_config import build_deepspeed_config
from launcher.worker.context import local_context
from launcher.worker.engine import build_engine

clip = sys.argv[1]
spec = load_spec("jobs/finetune-minilm-rt.yaml", ["deepspeed.zero_stage=0", f"stages.0.optim.grad_clip={clip}"])
stage = spec.stages[0]
plan = StagePlan(name="t", task="classification", world_size=1, micro_batch_size=4, grad_accum_steps=1,
                 global_batch_size=4, eval_batch_size=4, seq_len=16, tokens_per_step=64, steps=10, zero_stage=0,
                 num_params=None, model_states_bytes_per_worker=None, optimizer_states_bytes_per_worker=None)
config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ctx = local_context(use_gpu=False)
engines, norms, losses = [], [], []
for deepspeed_clip in (False, True):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ds_config = build_deepspeed_config(spec.deepspeed, stage, plan, model)
    engine = build_engine(model, ds_config, stage, plan.steps, ctx.device, 60)
    if deepspeed_clip:
        del engine.clip_fp32_gradients  # back to DeepSpeed's own method
    torch.manual_seed(1)
    batch = {"input_ids": torch.randint(5, 100, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    run_losses, run_norms = [], []
    for _ in range(4):
        loss = engine(**batch).loss
        engine.backward(loss)
        run_norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        engine.step()
        run_losses.append(float(loss))
    engines.append(engine)
    losses.append(run_losses)
    norms.append((run_norms, engine.get_global_grad_norm()))
gap = max(float((a - b).abs().max()) for a, b in zip(engines[0].module.parameters(), engines[1].module.parameters()))
print(json.dumps({"gap": gap, "losses": losses, "recorded": float(norms[0][1]), "computed": norms[0][0][-1],
                  "deepspeed_recorded": norms[1][1]}))
"""


@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_single_rank_clipping_is_deepspeeds_to_the_bit_and_records_the_norm(clip) -> None:
    """ZeRO-0 at world size 1 clips with one fused norm: the same weights and losses as DeepSpeed's per-parameter
    clipping to the bit, whether it clips (0.05: every step) or not (100: the multiplication by 1 is skipped on
    the CPU), and the norm is recorded for the loop's log."""
    out = subprocess.run(
        [sys.executable, "-c", CLIP_CHECK, str(clip)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["gap"] == 0.0, f"weights differ from DeepSpeed's clipping by {result['gap']}"
    assert result["losses"][0] == result["losses"][1]
    assert result["deepspeed_recorded"] is None, "DeepSpeed's ZeRO-0 clipping records no norm (else drop ours)"
    assert result["recorded"] == pytest.approx(result["computed"], rel=1e-5)
    assert (result["recorded"] > clip) == (clip < 1), "the case does (not) clip, as named"
