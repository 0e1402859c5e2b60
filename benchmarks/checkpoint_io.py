"""Checkpoint I/O at GB scale: save, hash + commit, and verify + load (resume) of a BERT-base-sized checkpoint.

Run as:  .venv/bin/python benchmarks/checkpoint_io.py [--dir DIR] [--seq-len 128]

One process (world size 1, CPU): `transformers.BertForMaskedLM(BertConfig())` (110 M parameters, fp32) under
DeepSpeed ZeRO-2 with the launcher's own engine, `save_checkpoint`, `latest_checkpoint` and `load_checkpoint`,
after one optimizer step (so Adam's moments exist). The checkpoint is written twice, to compare:

- before: the hashing as it was (every file hashed one after another by rank 0 at commit; at resume the driver
  hashed every file, then rank 0, another process, hashed every file again);
- after: each rank hashes its files in parallel threads right after writing them, and rank 0 takes the driver's
  verdict instead of hashing again (`checkpoint_manifest.verdicts` / `trust`).

An untimed save and resume comes first (the first write pays allocation costs). "Resume" is the driver's
verify, rank 0's verify and DeepSpeed's load; the processes are simulated in this one by
clearing the verdict cache between them. Files are read from the page cache right after they were written (as at
commit); a resume after a reboot would read them from disk once more. Prints one table.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from launcher import checkpoint_manifest as manifest
from launcher.jobspec.deepspeed_config import build_deepspeed_config
from launcher.jobspec.load import load_spec
from launcher.jobspec.plan import plan_job
from launcher.worker import deepspeed_io
from launcher.worker.context import local_context
from launcher.worker.engine import build_engine

ROOT = Path(__file__).resolve().parent.parent


def old_file_digests(folder: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """The digests as rank 0 took them before: every file, one after another, 1 MiB reads."""
    return {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": old_sha256(path)}
        for path in sorted(p for p in folder.rglob("*") if p.is_file())
    }


def old_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def old_check_files(folder: Path, files: dict[str, dict[str, Any]]) -> str | None:
    for name, entry in sorted(files.items()):
        if old_sha256(folder / name) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


class Timer:
    """Seconds spent inside wrapped functions, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        return timed


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def build(seq_len: int) -> tuple[Any, Any, dict[str, Any]]:
    """The engine (one optimizer step taken), the rank context and the checkpoint meta."""
    from transformers import BertConfig, BertForMaskedLM

    ctx = local_context(use_gpu=False)
    spec = load_spec(str(ROOT / "jobs/debug/tiny.yaml"), ["deepspeed.zero_stage=2"])
    stage = spec.stages[0]
    plan = plan_job(spec, True, {stage.name: 400})[0]
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig())
    config = build_deepspeed_config(spec.deepspeed, stage, plan, model)
    engine = build_engine(model, config, stage, 10, ctx.device, 600)
    ids = torch.randint(0, model.config.vocab_size, (plan.micro_batch_size, seq_len))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    meta = manifest.run_meta(1, plan.global_batch_size, 2, "fp32")
    return engine, ctx, meta


def save_and_resume(engine: Any, ctx: Any, meta: dict[str, Any], checkpoints: Path, step: int, old: bool) -> dict:
    """One save (timed by phase) and one resume (driver verify, rank 0 verify, load) of step `step`."""
    timer = Timer()
    digests = timer.wrap("hash", old_file_digests if old else manifest.file_digests)
    with (
        patched(engine, "save_checkpoint", timer.wrap("save", engine.save_checkpoint)),
        patched(deepspeed_io, "file_digests", digests),
        patched(deepspeed_io, "commit", timer.wrap("commit", manifest.commit)),
    ):
        started = time.perf_counter()
        path = deepspeed_io.save_checkpoint(engine, ctx, checkpoints, step, {"train_state": {}}, meta, 1, {})
        total_save = time.perf_counter() - started
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    manifest._verified.clear()
    manifest._warned.clear()
    with patched(manifest, "_check_files", old_check_files if old else manifest._check_files):
        started = time.perf_counter()
        assert manifest.latest_checkpoint(checkpoints) == path  # the driver
        driver_s = time.perf_counter() - started
        handed_on = [] if old else manifest.verdicts()
        manifest._verified.clear()  # rank 0: another process
        manifest.trust(handed_on)
        started = time.perf_counter()
        assert manifest.latest_checkpoint(checkpoints) == path
        rank0_s = time.perf_counter() - started
    started = time.perf_counter()
    deepspeed_io.load_checkpoint(engine, path)
    load_s = time.perf_counter() - started
    return {
        "size_gb": size / 1e9,
        "save_s": timer.seconds["save"],
        "hash_commit_s": timer.seconds["hash"] + timer.seconds["commit"],
        "save_total_s": total_save,
        "verify_s": driver_s + rank0_s,
        "load_s": load_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length of the one training step")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="checkpoint-io-", dir=args.dir))
    try:
        engine, ctx, meta = build(args.seq_len)
        save_and_resume(engine, ctx, meta, root / "warm-up", 1, old=False)  # first-write costs, not timed
        shutil.rmtree(root / "warm-up")
        rows = {
            "before": save_and_resume(engine, ctx, meta, root / "before", 1, old=True),
            "after": save_and_resume(engine, ctx, meta, root / "after", 1, old=False),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = sum(p.numel() for p in engine.module.parameters())
    print(f"\nBERT-base MLM ({params / 1e6:.0f} M parameters, fp32), ZeRO-2, 1 process, CPU; seconds")
    print(f"{'':8} {'size GB':>8} {'save':>7} {'hash+commit':>12} {'save total':>11} {'verify':>7} {'load':>7}"
          f" {'resume':>7}")  # fmt: skip
    for label, row in rows.items():
        print(
            f"{label:8} {row['size_gb']:8.2f} {row['save_s']:7.2f} {row['hash_commit_s']:12.2f} "
            f"{row['save_total_s']:11.2f} {row['verify_s']:7.2f} {row['load_s']:7.2f} "
            f"{row['verify_s'] + row['load_s']:7.2f}"
        )


if __name__ == "__main__":
    main()
