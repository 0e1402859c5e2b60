"""Checkpoints (DeepSpeed, resumable, last N kept) and the final HF-format export (safetensors)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from launcher import atomic
from launcher.errors import UserError

TAG_PREFIX = "step_"


UNIVERSAL = "universal"  # subfolder of a checkpoint: its DeepSpeed universal copy (other worker counts)
META_FILE = "launcher.json"  # written last, by rank 0: its presence marks a complete checkpoint


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def save_checkpoint(
    engine: Any, root: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any], keep: int, is_main: bool
) -> Path:
    """Every rank writes its ZeRO shard into `root/step_N/`; rank 0 then marks it complete and prunes.

    The folder is self-contained (no `latest` file needed), so a checkpoint that Ray copied into its
    storage and one written in place look the same: `checkpoints/step_N/`.
    """
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.distributed.barrier()
    path = root / tag
    if is_main:
        atomic.write_json(path / META_FILE, {"step": step, **meta})  # whole or absent: the commit mark
        tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return path


def read_meta(path: Path) -> dict[str, Any]:
    meta = atomic.read_json(path / META_FILE)
    assert isinstance(meta, dict), f"{path} is not a complete checkpoint"
    return meta


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint folder under `checkpoints/`, if any (a torn marker is no marker)."""
    if not checkpoints.is_dir():
        return None
    complete = [p for p in checkpoints.glob(f"{TAG_PREFIX}*") if isinstance(atomic.read_json(p / META_FILE), dict)]
    return max(complete, key=lambda p: p.name, default=None)


def load_checkpoint(engine: Any, path: Path, universal: bool = False) -> dict[str, Any]:
    """Model, optimizer and scheduler from one checkpoint folder; returns the client state saved with it.

    `universal`: load the copy that `convert_to_universal` wrote (a checkpoint of N ranks into M).
    """
    load_dir, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    loaded, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    assert loaded is not None, f"DeepSpeed found no checkpoint in {load_dir / tag}"
    if engine.lr_scheduler is not None:
        # A universal load restores Adam's state but not `param_groups`: the next update must use
        # the schedule's current rate, not the rate a fresh scheduler set at step 0.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    return client_state


def needs_universal(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """ZeRO-1/2 shards of another worker count load only through DeepSpeed's universal format."""
    return saved["world_size"] != now["world_size"] and now["zero_stage"] in (1, 2)


def convert_to_universal(path: Path) -> Path:
    """Write DeepSpeed's universal (world-size independent) copy of a checkpoint into `path/universal`.

    Runs DeepSpeed's own converter in a subprocess (the driver never imports DeepSpeed); the copy
    is written beside and renamed into place, so an interrupted conversion is simply redone.
    """
    out = path / UNIVERSAL
    if (out / "zero").is_dir():
        return out
    partial = path / f"{UNIVERSAL}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
        "--output_folder", str(partial), "--num_extract_workers", "1", "--num_merge_workers", "1",
        "--inject_missing_state",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{path}: DeepSpeed could not convert this checkpoint to its universal format: {last}")
    for states in path.glob("mp_rank_*_model_states.pt"):  # weights, scheduler and client state
        shutil.copy2(states, partial / states.name)
    partial.rename(out)
    return out


def run_meta(world_size: int, global_batch_size: int, zero_stage: int, precision: str) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (besides its step)."""
    return {
        "world_size": world_size, "global_batch_size": global_batch_size, "zero_stage": zero_stage,
        "precision": precision,
    }  # fmt: skip


def resume_problem(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why a checkpoint (its `launcher.json`) cannot resume under the run described by `now` (None: it can)."""
    at = f"the checkpoint at step {saved['step']}"
    if saved["global_batch_size"] != now["global_batch_size"]:
        return (
            f"{at} was trained with global batch {saved['global_batch_size']}, this run has "
            f"{now['global_batch_size']}; keep micro x accumulation x workers equal (e.g. set "
            f"batch.global_batch_size={saved['global_batch_size']}) or use another output_dir"
        )
    for key, field in (("zero_stage", "deepspeed.zero_stage"), ("precision", "the stage's precision")):
        if saved[key] != now[key]:
            return (
                f"{at} was written with {key} {saved[key]}, this run has {now[key]}"
                f"; set {field} back or use a new output_dir"
            )
    if saved["world_size"] != now["world_size"] and now["zero_stage"] == 3:  # no universal copy for ZeRO-3 yet
        return (
            f"{at} holds ZeRO-3 shards of {saved['world_size']} workers and this run has {now['world_size']}; "
            f"ZeRO-3 resumes only on the same worker count (set cluster.num_workers={saved['world_size']})"
        )
    return None


def export_model(engine: Any, tokenizer: Any, out_dir: Path, is_main: bool) -> None:
    """Write `out_dir` (HF format, safetensors, with tokenizer); ZeRO-3 shards are gathered first.

    The export is written beside `out_dir` and renamed into place, so a failure never leaves a
    half-written or overwritten export.
    """
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    gathered = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=gathered):
        if is_main:
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if is_main:
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        module.save_pretrained(str(partial), state_dict=state)
        tokenizer.save_pretrained(str(partial))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    torch.distributed.barrier()
