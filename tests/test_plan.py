"""Derived values: batch arithmetic, the DeepSpeed config, and the parameter count behind the memory estimate."""

from __future__ import annotations

import pytest
import torch

from launcher.errors import UserError
from launcher.jobspec.deepspeed_config import build_deepspeed_config
from launcher.jobspec.load import load_spec
from launcher.jobspec.plan import model_states_bytes, plan_stage
from launcher.models.count import count_params
from tests.conftest import ROOT, TINY, run_cli


def test_global_batch_is_derived_once() -> None:
    spec = load_spec(TINY, ["cluster.num_workers=4", "stages.0.batch.grad_accum_steps=null",
                            "stages.0.batch.global_batch_size=64"])  # fmt: skip
    plan = plan_stage(spec, 0, local=False)
    assert (plan.world_size, plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size) == (4, 8, 2, 64)
    assert plan.tokens_per_step == 64 * 32
    local = plan_stage(spec, 0, local=True)
    assert (local.world_size, local.grad_accum_steps) == (1, 8)
    config = build_deepspeed_config(spec.deepspeed, spec.stages[0], plan, torch.nn.Linear(1, 1))
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
    none = {"offloaded": 0}
    assert model_states_bytes(n, "fp32", 0, 2) == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n, **none}
    # fp32 under ZeRO >= 1: DeepSpeed's fp32 master partition joins the two Adam moments.
    assert model_states_bytes(n, "fp32", 1, 2) == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 6 * n, **none}
    assert model_states_bytes(n, "bf16", 2, 2) == {"weights": 2 * n, "gradients": n, "optimizer": 6 * n, **none}
    assert sum(model_states_bytes(n, "bf16", 3, 4).values()) == 16 * n // 4


@pytest.mark.parametrize(
    ("family", "task"),
    [("bert", "mlm"), ("bert", "classification"), ("gpt2", "clm"), ("gpt2", "classification"), ("llama", "clm"),
     ("llama", "classification")],
)  # fmt: skip
def test_param_count_is_the_built_models(family, task, tmp_path) -> None:
    """The plan counts the model the worker builds (meta device); an init_from directory is read for its family."""
    from launcher.tasks import build_task

    def stage_spec(labels: str):
        head = [f"task={task}"]
        if task == "classification":
            head = ["task=classification", "data.train=data/demo/train.csv", f"data.labels={labels}"]
        overrides = ["model.hidden_size=64", "model.num_layers=3", "model.num_heads=4", "model.intermediate_size=96",
                     f"model.family={family}", "tokenizer.vocab_size=300", *head]  # fmt: skip
        return load_spec(TINY, [f"stages.0.{o}" for o in overrides] + [f"output_dir={tmp_path}"])

    class Vocabulary300:  # the spec's vocabulary size, exactly (a trained one may come out smaller)
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self) -> int:
            return 300

    tok = Vocabulary300()
    spec = stage_spec("[rotten,fresh,other]")
    model = build_task(spec.stages[0], tok).build_model(None)
    assert count_params(spec, spec.stages[0]) == sum(p.numel() for p in model.parameters())
    if task != "classification":
        return
    # A 3-label classifier export of this family, re-tuned for 2 labels by a spec whose model section is BERT's
    model.save_pretrained(tmp_path / "export")
    two = stage_spec("[rotten,fresh]")
    expected = sum(p.numel() for p in build_task(two.stages[0], tok).build_model(None).parameters())
    tuned = load_spec(str(ROOT / "jobs" / "finetune-minilm-rt.yaml"), [f"stages.0.init_from={tmp_path / 'export'}"])
    assert tuned.stages[0].model.family == "bert"
    assert count_params(tuned, tuned.stages[0]) == expected


def test_workers_of_an_allocation_have_one_rule_for_launcher_slurm_and_the_shell(monkeypatch, capsys) -> None:
    """`launcher workers NODES GPUS` (what slurm/ray_job.sh asks inside the allocation) and the worker count
    `launcher slurm` checks the plan with come from the same function; the shell computes none itself."""
    from launcher.cli import main
    from launcher.coordinator.slurm import workers_for

    assert main(["workers", "3", "4"]) == 0 and capsys.readouterr().out == "12 true\n"
    monkeypatch.setenv("LAUNCHER_WORKERS_PER_NODE", "2")
    assert main(["workers", "3", "0"]) == 0 and capsys.readouterr().out == "6 false\n"
    assert workers_for(load_spec(TINY, ["cluster.slurm.nodes=3"])) == 6
    assert workers_for(load_spec(TINY, ["cluster.slurm.gpus_per_node=8"])) == 8
    monkeypatch.setenv("LAUNCHER_WORKERS_PER_NODE", "two")
    assert main(["workers", "3", "0"]) == 2
    assert "LAUNCHER_WORKERS_PER_NODE" in capsys.readouterr().err
    shell = (ROOT / "slurm" / "ray_job.sh").read_text()
    assert "launcher workers" in shell and "LAUNCHER_WORKERS_PER_NODE:-" not in shell


def test_memory_plan_of_bert_base_against_the_papers_formulas() -> None:
    """bert-base, masked LM, bf16, ZeRO-2 on 4 workers, micro-batch 8 x 512: weights 2 Psi, gradients 2 Psi / 4,
    optimizer state 12 Psi / 4 (ZeRO paper, mixed-precision Adam), activations 34 s b h per block (Korthikanti
    et al., fused attention on a GPU keeps no scores) plus fp32 logits and their gradient at the 15% masked
    positions."""
    from launcher.jobspec.plan import memory_plan

    args = ["stages.0.model={preset: bert-base}", "stages.0.tokenizer={}", "stages.0.precision=bf16",
            "stages.0.data.seq_len=512", "cluster.num_workers=4", "deepspeed.zero_stage=2",
            "cluster.use_gpu=true"]  # fmt: skip
    spec = load_spec(TINY, args)
    psi = count_params(spec, spec.stages[0])
    assert 109_000_000 < psi < 111_000_000
    plan = plan_stage(spec, 0, local=False, num_params=psi)
    memory = memory_plan(spec, 0, plan, psi)
    assert memory.states == {"weights": 2 * psi, "gradients": 2 * psi // 4, "optimizer": 12 * psi // 4, "offloaded": 0}
    s, b, h, layers, vocab = 512, 8, 768, 12, 30522
    assert memory.activations == int(layers * 34 * s * b * h + 2 * 4 * b * s * vocab * 0.15)
    assert plan.model_states_bytes_per_worker == 2 * psi + 2 * psi // 4 + 12 * psi // 4
    checkpointed = load_spec(TINY, [*args, "stages.0.model.activation_checkpointing=true"])
    saved = memory_plan(checkpointed, 0, plan, psi).activations
    assert saved == int(layers * 2 * s * b * h + 34 * s * b * h + 2 * 4 * b * s * vocab * 0.15)
    # CPU workers: sdpa keeps the attention scores as eager attention does (the paper's 5 a s / h term).
    on_cpu = memory_plan(load_spec(TINY, args[:-1]), 0, plan, psi).activations
    assert on_cpu == int(layers * (34 + 5 * 12 * s / h) * s * b * h + 2 * 4 * b * s * vocab * 0.15)
    offload = load_spec(TINY, ["stages.0.model={preset: bert-base}", "stages.0.precision=bf16", "cluster.num_workers=4",
                               "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true"])  # fmt: skip
    states = memory_plan(offload, 0, plan_stage(offload, 0, local=False), psi).states
    assert states["optimizer"] == 0 and states["offloaded"] == 12 * psi // 4 and states["weights"] == 2 * psi // 4


@pytest.mark.slow  # CLI subprocesses (torch imports): kept out of the quick tier
def test_a_plan_that_does_not_fit_the_gpu_is_refused_with_what_would_fit() -> None:
    args = ["stages.0.model={preset: bert-large}", "stages.0.tokenizer={}", "stages.0.precision=bf16",
            "stages.0.data.seq_len=512", "stages.0.batch.micro_batch_size=32", "cluster.num_workers=2",
            "deepspeed.zero_stage=1"]  # fmt: skip
    out = run_cli("validate", str(TINY), *args, "cluster.gpu_memory_gb=16")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "does NOT fit" in out.stdout
    line = out.stderr.strip()
    assert line.startswith("error: cluster.gpu_memory_gb: stage 0 (pretrain) needs ~") and "\n" not in line
    assert "fits with stages.0.model.activation_checkpointing=true" in line
    fits = run_cli(
        "validate", str(TINY), *args, "cluster.gpu_memory_gb=16", "stages.0.model.activation_checkpointing=true"
    )
    assert fits.returncode == 0 and ": fits" in fits.stdout, fits.stderr


def test_cpu_workers_filling_one_host_for_fine_tuning_are_warned_about(monkeypatch) -> None:
    """Fine-tuning on CPU workers that take every core of a private Ray's one host: one warning line in the plan."""
    from launcher.jobspec.plan import single_host_warning

    job = ROOT / "jobs" / "finetune-minilm-rt.yaml"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    spec = load_spec(job, ["cluster.num_workers=2"])
    assert "2 CPU workers x 1 core(s) on this 2-core host" in (single_host_warning(spec, local=False) or "")
    assert single_host_warning(spec, local=True) is None
    assert single_host_warning(load_spec(job, ["cluster.num_workers=2", "cluster.use_gpu=true"]), False) is None
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert single_host_warning(spec, local=False) is None, "2 of 8 cores: the workers leave room"
    assert single_host_warning(load_spec(job, ["cluster.num_workers=2", "cluster.cpus_per_worker=4"]), False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert single_host_warning(spec, local=False) is None, "a cluster of unknown hosts"


def test_a_stage_start_is_resolved_once_for_weights_tokenizer_and_architecture(tmp_path) -> None:
    """`resolve_start`: the one answer to where a stage's weights, tokenizer and sizes come from."""
    from launcher.jobspec import layout
    from launcher.jobspec.start import resolve_start

    folder = tmp_path / "model"
    folder.mkdir()
    spec = load_spec(
        TINY,
        [
            "stages.0.tokenizer.vocab_size=900",
            "stages.1.model.hidden_size=64",  # ignored: the sizes are the first stage's of the chain
            f"stages.1.tokenizer.source={folder}",
        ],
    )
    pretrain, finetune = (resolve_start(spec, stage) for stage in spec.stages)
    assert (pretrain.kind, pretrain.weights, pretrain.field, pretrain.tokenizer) == ("fresh", None, None, None)
    assert (pretrain.description, pretrain.ladder_kind, pretrain.dependencies) == (
        "random initialisation",
        "scratch",
        (),
    )
    assert (finetune.kind, finetune.stage, finetune.field) == ("stage", "pretrain", "stages.1.init_from")
    assert finetune.weights == layout.model_dir(spec, "pretrain")
    assert finetune.tokenizer == folder and finetune.tokenizer_field == "stages.1.tokenizer.source"
    assert (finetune.model.hidden_size, finetune.model_dir) == (32, None)
    assert finetune.vocab_size == spec.stages[1].tokenizer.vocab_size  # its own tokenizer.source is a folder
    assert (finetune.description, finetune.ladder_kind, finetune.dependencies) == (
        "our pre-training",
        "ours",
        ("pretrain",),
    )

    plain = load_spec(TINY, ["stages.0.tokenizer.vocab_size=900"])
    inherited = resolve_start(plain, plain.stages[1])
    assert inherited.vocab_size == 900 and inherited.tokenizer == layout.tokenizer_dir(spec, "pretrain")
    assert inherited.tokenizer_stage == "pretrain" and finetune.tokenizer_stage is None

    other = load_spec(TINY, [f"stages.1.init_from={folder}"])
    pretrained = resolve_start(other, other.stages[1])
    assert (pretrained.kind, pretrained.weights, pretrained.model_dir, pretrained.tokenizer) == (
        "folder",
        folder,
        folder,
        folder,
    )
    assert (pretrained.description, pretrained.ladder_kind) == ("pretrained model", "pretrained")


def test_buckets_follow_the_model_width() -> None:
    """DeepSpeed's buckets are HF's "auto" sizes from the width (BERT-base: 768^2 elements, 0.9 of that
    prefetched under ZeRO-3), the widest stage of a ResNet, and a floor for a tiny model; ZeRO-3 keeps about
    two blocks gathered (30 width^2), not DeepSpeed's 1e9 elements."""
    import transformers

    from launcher.jobspec.deepspeed_config import MIN_BUCKET, model_width
    from launcher.models.configs import hf_config
    from launcher.models.count import NoTokenizer

    spec = load_spec(TINY, ["stages.0.model={preset: bert-base}", "stages.0.tokenizer={}", "deepspeed.zero_stage=3"])
    plan = plan_stage(spec, 0, local=False)
    with torch.device("meta"):
        bert = transformers.AutoModelForMaskedLM.from_config(
            hf_config(spec.stages[0].model, spec.stages[0].tokenizer.vocab_size, NoTokenizer(), None)
        )
        resnet = transformers.ResNetModel(transformers.ResNetConfig(hidden_sizes=[256, 512, 1024, 2048]))
        small = transformers.ViTModel(
            transformers.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2)
        )
    assert (model_width(bert), model_width(resnet)) == (768, 2048)
    assert model_width(small) == 64
    zero = build_deepspeed_config(spec.deepspeed, spec.stages[0], plan, bert)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (589_824, 530_841)
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 30 * 589_824
    tiny = build_deepspeed_config(spec.deepspeed, spec.stages[0], plan, small)["zero_optimization"]
    assert tiny["reduce_bucket_size"] == tiny["stage3_prefetch_bucket_size"] == MIN_BUCKET
    assert tiny["stage3_max_live_parameters"] == MIN_BUCKET
