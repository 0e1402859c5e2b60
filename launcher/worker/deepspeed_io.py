"""Checkpoints (DeepSpeed, resumable, last N kept) and the final HF-format export (safetensors)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint_manifest import UNIVERSAL, commit, file_digests, prune, tag_for
from launcher.errors import RunError
from launcher.worker import deepspeed_internals
from launcher.worker.context import RankContext


def save_checkpoint(
    engine: Any, ctx: RankContext, checkpoints: Path, step: int, client_state: dict[str, Any],
    meta: dict[str, Any], keep: int, metrics: dict[str, float], protect: int | None = None,
) -> Path:  # fmt: skip
    """Every rank writes its ZeRO shard, the coordinator gets it, then rank 0 commits and prunes.

    Each rank writes into `ctx.checkpoint_root` (the stage's folder itself, or under Ray a temporary
    folder that `ctx.report` uploads into `checkpoints/step_N/`) and hashes what it wrote, while it is
    in the page cache and in parallel with the other ranks. Once every rank has reported, rank 0 writes
    the manifest (every file's size and sha256) from the gathered digests into the folder in
    `checkpoints/`, reading no file again (it checks sizes): before that, the folder is not a
    checkpoint. A failed write (a full disk) raises `RunError`; the older committed checkpoints are
    untouched. Pruning keeps the newest `keep` and the checkpoint of step `protect` (the best one).
    """
    root, tag = ctx.checkpoint_root(checkpoints), tag_for(step)
    if ctx.is_main:  # what an interrupted save of this step left (resumed from an older one)
        shutil.rmtree(checkpoints / tag, ignore_errors=True)
    torch.distributed.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as exc:  # a full disk (torch.save raises RuntimeError): free the partial folder
        shutil.rmtree(root / tag, ignore_errors=True)
        raise RunError(f"checkpoint at step {step}: writing {root / tag} failed: {exc}") from None
    torch.distributed.barrier()
    # In a shared folder a rank hashes the files it wrote (DeepSpeed names each shard by its rank);
    # in a folder of its own (Ray), every file there.
    mine = file_digests(root / tag, *((ctx.rank, ctx.world_size) if ctx.shared_checkpoint_root else (0, 1)))
    gathered: list[dict[str, Any] | None] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, mine)
    files = {name: entry for part in gathered for name, entry in (part or {}).items()}
    ctx.report(metrics, root / tag)
    torch.distributed.barrier()  # every rank's files are in `checkpoints/step_N/` now
    path = checkpoints / tag
    if ctx.is_main:
        commit(path, step, meta, files)
        prune(checkpoints, keep, protect)
    torch.distributed.barrier()
    return path


def load_checkpoint(engine: Any, path: Path, universal: bool = False) -> dict[str, Any]:
    """Model, optimizer and scheduler from one checkpoint folder; returns the client state saved with it.

    `universal`: load the copy that `convert_to_universal` wrote (a checkpoint of N ranks into M).
    `path` comes from `RankContext.restore_dir`, which checked its digests (rank 0 for all ranks):
    DeepSpeed's files are pickles.
    """
    load_dir, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    loaded, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    assert loaded is not None, f"DeepSpeed found no checkpoint in {load_dir / tag}"
    if universal and engine.zero_optimization_stage() == 3:
        deepspeed_internals.repair_stage3_universal_load(engine, groups)  # the rate follows below
    if engine.lr_scheduler is not None:
        # A universal load restores Adam's state but not `param_groups`: the next update must use
        # the schedule's current rate, not the rate a fresh scheduler set at step 0.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
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
