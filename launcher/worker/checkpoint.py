"""Checkpoints (DeepSpeed, resumable, last N kept) and the final HF-format export (safetensors)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def save_checkpoint(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep: int, is_main: bool) -> None:
    """Every rank writes its ZeRO shard; DeepSpeed updates `latest` after all shards are written."""
    engine.save_checkpoint(str(root), tag=tag_for(step), client_state=client_state)
    if is_main:
        tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()


def load_checkpoint(engine: Any, root: Path) -> dict[str, Any]:
    """Model, optimizer and scheduler from the `latest` tag; returns the client state saved with it."""
    path, client_state = engine.load_checkpoint(str(root))
    assert path is not None, f"DeepSpeed found no checkpoint under {root}"
    return client_state


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
