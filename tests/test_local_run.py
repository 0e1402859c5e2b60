"""Integration: the tiny job through all stages in debug mode (real DeepSpeed, real text)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_ok, read_jsonl, run_cli

TINY = "jobs/debug/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    result = run_cli("run", TINY, "--local", f"output_dir={out}", "stages.0.model.dropout=0.1")
    assert_ok(result)
    assert "job tiny complete" in result.stdout
    return out / "tiny"


def scalar_tags(event_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_outputs_follow_the_contract(tiny_run: Path) -> None:
    for stage, metric in (("pretrain", "perplexity"), ("finetune", "accuracy")):
        stage_dir = tiny_run / stage
        tags = scalar_tags(stage_dir / "tensorboard")
        expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "eval/loss"}
        assert expected | {f"eval/{metric}"} <= tags
        records = read_jsonl(stage_dir / "metrics.jsonl")
        assert [r["step"] for r in records] == list(range(1, len(records) + 1))
        assert all(math.isfinite(r["train/loss"]) and r["train/mfu"] > 0 for r in records)
        assert all(math.isfinite(r["train/grad_norm"]) for r in records)
        summary = json.loads((stage_dir / "summary.json").read_text())
        assert summary["stage"] == stage and summary["steps"] == len(records)
        assert summary["tokens"] > 0 and summary["wall_s"] > 0 and math.isfinite(summary["train_loss"])
        if stage == "pretrain":
            assert set(summary["eval"]) == {"loss", metric}
        else:  # classification: macro-F1, per-label precision / recall / F1 and the confusion matrix too
            per_label = {f"{kind}/{label}" for kind in ("precision", "recall", "f1") for label in ("rotten", "fresh")}
            confusion = {f"confusion/{a}/{b}" for a in ("rotten", "fresh") for b in ("rotten", "fresh")}
            assert set(summary["eval"]) == {"loss", metric, "macro_f1"} | per_label | confusion
            assert sum(summary["eval"][key] for key in confusion) == 64, "every eval review counted once"
        final = stage_dir / "checkpoints" / f"step_{len(records):08d}"
        assert json.loads((final / "launcher.json").read_text())["step"] == len(records), "marked complete"
        assert (stage_dir / "model" / "model.safetensors").is_file()
        assert not list((stage_dir / "model").glob("*.bin")), "weights are exported as safetensors only"
        assert (stage_dir / "model" / "tokenizer.json").is_file()
    lrs = [r["train/lr"] for r in read_jsonl(tiny_run / "pretrain" / "metrics.jsonl")]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs), "warmup then decay"


def test_finetune_starts_from_the_pretrained_export(tiny_run: Path) -> None:
    from safetensors.torch import load_file

    pretrained = load_file(tiny_run / "pretrain" / "model" / "model.safetensors")
    finetuned = load_file(tiny_run / "finetune" / "model" / "model.safetensors")
    key = "bert.embeddings.word_embeddings.weight"
    # fine-tuning moved the weights a little, from the pre-trained ones (not from a fresh init)
    distance = (finetuned[key] - pretrained[key]).norm() / pretrained[key].norm()
    assert 0 < distance < 0.5


def test_export_reloads_with_the_same_logits(tiny_run: Path) -> None:
    """The export equals the final DeepSpeed checkpoint's weights, loaded into the same model."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    for stage, auto in (("pretrain", AutoModelForMaskedLM), ("finetune", AutoModelForSequenceClassification)):
        export = tiny_run / stage / "model"
        model = auto.from_pretrained(export).eval()
        tok = AutoTokenizer.from_pretrained(export)
        latest = max((tiny_run / stage / "checkpoints").glob("step_*"))
        states = torch.load(latest / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)  # fmt: skip
        reference = auto.from_config(model.config).eval()
        reference.load_state_dict(states["module"])
        batch = tok(["a quiet, moving film", "and the earth was without form"], return_tensors="pt", padding=True)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_rerun_skips_completed_stages(tiny_run: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file() and "data" not in p.parts}
    result = run_cli("run", TINY, "--local", f"output_dir={tiny_run.parent}", "stages.0.model.dropout=0.1")
    assert_ok(result)
    assert "stage pretrain: already complete" in result.stdout and "stage finetune: already complete" in result.stdout
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = [p for p in before if before[p] != after[p] and p != tiny_run / "summary.json"]
    assert not changed


def test_bad_input_exits_2_and_overwrites_nothing(tiny_run: Path, tmp_path: Path) -> None:
    out = str(tiny_run.parent)
    guarded = [p for p in tiny_run.rglob("*") if p.is_file() and ("checkpoints" in p.parts or "model" in p.parts)]
    before = {p: p.stat().st_mtime_ns for p in guarded}
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nfine,fresh\n\xfe\xfe,rotten\n")
    cases = [
        (["stages.1.data.train=" + str(bad)], "bad.csv: line 3 (byte offset 22): not valid UTF-8"),
        (["stages.1.data.train=" + str(tmp_path / "nope.csv")], "stages.1.data.train:"),
        (["stages.1.data.labels=[good, bad]"], "label 'fresh' is not in data.labels"),
        (["stages.1.name=other"], "holds another job's run"),
    ]
    for overrides, message in cases:
        result = run_cli("run", TINY, "--local", f"output_dir={out}", "stages.1.max_steps=6", *overrides)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {p: p.stat().st_mtime_ns for p in guarded} == before


@pytest.mark.slow  # among the quick tier's slowest (prepares or runs, or 100,000 Python draws)
def test_stage_option_runs_one_stage_and_checks_what_it_reads(tmp_path) -> None:
    unknown = run_cli("run", "jobs/debug/tiny.yaml", "--local", "--stage", "nosuch", f"output_dir={tmp_path}")
    assert unknown.returncode == 2 and "--stage: no stage named 'nosuch'" in unknown.stderr
    early = run_cli("run", "jobs/debug/tiny.yaml", "--local", "--stage", "finetune", f"output_dir={tmp_path}")
    assert early.returncode == 2 and "reads stage 'pretrain'" in early.stderr, early.stderr
    assert "Traceback" not in early.stderr
    only = run_cli("run", "jobs/debug/tiny.yaml", "--local", "--stage", "pretrain", "stages.0.max_steps=2",
                   f"output_dir={tmp_path}")  # fmt: skip
    assert_ok(only)
    assert (tmp_path / "tiny" / "pretrain" / "summary.json").exists()
    assert not (tmp_path / "tiny" / "finetune" / "summary.json").exists(), "only the named stage ran"
    assert not (tmp_path / "tiny" / "summary.json").exists(), "no job summary for a partial run"


def test_torn_status_files_count_as_absent(tiny_run: Path, tmp_path: Path) -> None:
    """A crash mid-write leaves an empty file: an empty stage summary means "not done" (the stage resumes from its
    last checkpoint and writes it again), and an empty checkpoint marker means "not a checkpoint" (the older one
    is used)."""
    import shutil

    from launcher.checkpoint_manifest import latest_checkpoint

    shutil.copytree(tiny_run.parent, tmp_path / "out")
    job = tmp_path / "out" / "tiny"
    checkpoints = job / "pretrain" / "checkpoints"
    newest = latest_checkpoint(checkpoints)
    assert newest is not None and newest.name == "step_00000008"
    (newest / "launcher.json").write_text("")
    assert latest_checkpoint(checkpoints) == checkpoints / "step_00000004"
    (job / "finetune" / "summary.json").write_text("")
    result = run_cli("run", TINY, "--local", f"output_dir={tmp_path / 'out'}", "stages.0.model.dropout=0.1")
    assert_ok(result)
    assert "stage pretrain: already complete" in result.stdout
    summary = json.loads((job / "finetune" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from_step"] == 4, "resumed at its end, not retrained"


@pytest.mark.slow
def test_continued_pretraining_of_a_pretrained_encoder_initialises_its_mlm_head(tmp_path) -> None:
    """jobs/dapt-minilm.yaml as users run it, on a tiny budget: all-MiniLM-L6-v2 (saved without an MLM head)
    continues masked-LM training, the new head is named in one line, and the fine-tuning starts from it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    tiny = ["stages.0.data.max_train_samples=64", "stages.0.max_steps=2", "stages.0.data.seq_len=32",
            "stages.0.eval_every=0", "stages.0.checkpoint_every=0", "stages.1.data.max_train_samples=16",
            "stages.1.data.max_eval_samples=16", "stages.1.epochs=1", "cluster.num_workers=1"]  # fmt: skip
    for stage in (0, 1):
        tiny += [f"stages.{stage}.batch.micro_batch_size=4", f"stages.{stage}.batch.global_batch_size=4"]
    result = run_cli("run", "jobs/dapt-minilm.yaml", "--local", f"output_dir={tmp_path}", *tiny)
    assert_ok(result)
    said = [line for line in result.stdout.splitlines() if "has no weights for" in line]
    assert said[0] == (
        "stage continue: data/models/all-minilm-l6-v2 has no weights for cls.predictions (6 tensors); "
        "they start from random init"
    ), said
    # A masked-LM model has no pooler: the classifier's pooler starts fresh as well as its output layer.
    assert said[1].startswith("stage finetune: ") and said[1].endswith(
        "has no weights for bert.pooler, classifier (4 tensors); they start from random init"
    ), said
    assert len(said) == 2
    export = tmp_path / "dapt-minilm" / "continue" / "model"
    _, info = AutoModelForMaskedLM.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"], "the export carries its MLM head"
    minilm = load_file(Path("data/models/all-minilm-l6-v2/model.safetensors"))
    continued = load_file(export / "model.safetensors")
    name = "embeddings.word_embeddings.weight"
    ours = continued.get(f"bert.{name}", continued.get(name))
    theirs = minilm.get(name, minilm.get(f"bert.{name}"))
    assert ours.shape == theirs.shape and 0 < (ours - theirs).abs().max() < 1e-2, "continued, not restarted"
