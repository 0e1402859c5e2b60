"""Checkpoint rules, torch-free: what makes `checkpoints/step_N/` committed, verified, resumable, kept.

A checkpoint folder counts only once its manifest (`launcher.json`) is in it. Rank 0 writes the
manifest last, after every rank's files are in place (under Ray: after every rank's upload), and it
lists each file's size and sha256 with the step and the run's shape. A folder without a manifest
(a crash mid-save), or whose files do not match it (a flipped byte, a truncated shard), is skipped
with a one-line warning, and the newest one that verifies is used instead. The digests are checked
before DeepSpeed unpickles anything. The driver uses these rules without importing torch; the
DeepSpeed save and load live in `launcher.worker.deepspeed_io`.

Every byte is hashed once per save and once per resume: each rank hashes the files it wrote right
after writing them (from the page cache, its files in parallel threads, the ranks in parallel), rank 0
writes the manifest from the gathered digests after checking only sizes, and at resume the driver's
verdict travels with the launch (`verdicts` / `trust`) so that rank 0 does not hash the same folder again.
The universal copy that the driver writes for another worker count (`universal/`) is committed the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.errors import UserError
from launcher.worker.deepspeed_internals import UNIVERSAL_CONVERTER

TAG_PREFIX = "step_"
MANIFEST_FILE = "launcher.json"  # the manifest, written last by rank 0: its presence commits the folder
UNIVERSAL = "universal"  # subfolder of a checkpoint: its DeepSpeed universal copy (other worker counts)
_CHUNK_BYTES = 8 << 20
_RANK_IN_NAME = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank shard files

Verdict = tuple[tuple[Any, ...], str | None]  # (folder, manifest and files' stat) -> problem (None: verified)
_verified: dict[tuple[Any, ...], str | None] = {}  # hashing once per process (and per run: `trust`)
_warned: set[str] = set()


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def file_digests(folder: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the files under `folder` that `rank` of `world_size` wrote, by path relative to it.

    A DeepSpeed shard (`*zero_pp_rank_<r>_*`) belongs to rank r, every other file to rank 0; with the
    default world of one, every file. The files are hashed in parallel threads (hashlib releases the GIL).
    """
    paths = [p for p in folder.rglob("*") if p.is_file() and owner(p.relative_to(folder), world_size) == rank]
    return {
        name: {"size": (folder / name).stat().st_size, "sha256": digest} for name, digest in _sha256s(folder, paths)
    }


def owner(name: Path, world_size: int) -> int:
    """The rank that writes (and hashes) a checkpoint file."""
    match = _RANK_IN_NAME.search(name.name)
    return int(match.group(1)) % world_size if match else 0


def _sha256s(folder: Path, paths: Iterable[Path]) -> list[tuple[str, str]]:
    """(name, sha256) of each path, sorted by name; the largest files start first, one thread per core."""
    paths = sorted(paths, key=lambda p: p.stat().st_size, reverse=True)
    if len(paths) <= 1:
        digests = [_sha256(p) for p in paths]
    else:
        with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
            digests = list(pool.map(_sha256, paths))
    return sorted((p.relative_to(folder).as_posix(), digest) for p, digest in zip(paths, digests, strict=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as stream:
        while size := stream.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def commit(folder: Path, step: int, meta: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    """Write the manifest into `folder` once every listed file is there at its size (rank 0, last)."""
    for name, entry in files.items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        assert size == entry["size"], f"{path}: {size} bytes in storage, {entry['size']} written"
    atomic.write_json(folder / MANIFEST_FILE, {"step": step, **meta, "files": files})


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest, or None when the folder is not committed (absent, torn or from an older format)."""
    meta = atomic.read_json(folder / MANIFEST_FILE)
    return meta if isinstance(meta, dict) and isinstance(meta.get("files"), dict) and "step" in meta else None


def verify(folder: Path) -> str | None:
    """Why `folder` is not a checkpoint to load (None: committed, and every file matches its digest)."""
    meta = read_manifest(folder)
    if meta is None:
        return "no manifest (an interrupted save)"
    key = _stat_key(folder, meta["files"])
    if isinstance(key, str):
        return key
    if key not in _verified:
        _verified[key] = _check_files(folder, meta["files"])
    return _verified[key]


def _stat_key(folder: Path, files: dict[str, dict[str, Any]]) -> tuple[Any, ...] | str:
    """The folder as hashed (its path, its manifest's and files' sizes and modification times), or why its
    files cannot match the manifest (cheap: before any hashing)."""
    stats = []
    for name in sorted(files):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != files[name]["size"]:
            return f"{name} has {stat.st_size} bytes, the manifest says {files[name]['size']}"
        stats.append((name, stat.st_size, stat.st_mtime_ns))
    return (str(folder.resolve()), (folder / MANIFEST_FILE).stat().st_mtime_ns, tuple(stats))


def _check_files(folder: Path, files: dict[str, dict[str, Any]]) -> str | None:
    for name, digest in _sha256s(folder, (folder / name for name in files)):
        if digest != files[name]["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def verdicts() -> list[Verdict]:
    """What this process found when it hashed checkpoint folders, to hand to another process of the same run.

    Each verdict is keyed by the folder, its manifest's and files' sizes and modification times, as in
    this process's own cache: a file rewritten since is hashed again.
    """
    return list(_verified.items())


def trust(found: Iterable[Verdict]) -> None:
    """Take another process's verdicts (the driver's, before it launched this stage) as this process's own."""
    _verified.update(found)


def _folders(checkpoints: Path) -> list[Path]:
    if not checkpoints.is_dir():
        return []
    return sorted((p for p in checkpoints.glob(f"{TAG_PREFIX}*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint under `checkpoints/` that is committed and verifies; newer ones that do not
    are skipped with a one-line warning (once per process)."""
    for folder in _folders(checkpoints):
        problem = verify(folder)
        if problem is None:
            return folder
        if str(folder) not in _warned:
            _warned.add(str(folder))
            print(f"warning: checkpoint {folder}: {problem}; skipped, trying an older one", file=sys.stderr, flush=True)
    return None


def prune(checkpoints: Path, keep: int, protect: int | None = None) -> None:
    """Keep the newest `keep` committed checkpoints and the one of step `protect` (the best so far); remove
    older ones and uncommitted leftovers older than the newest committed one (a folder newer than it may
    still be being written)."""
    committed = [f for f in _folders(checkpoints) if read_manifest(f) is not None]
    if not committed:
        return
    for folder in _folders(checkpoints):
        stale = folder not in committed[:keep] if folder in committed else folder.name < committed[0].name
        if stale and (protect is None or folder.name != tag_for(protect)):
            shutil.rmtree(folder, ignore_errors=True)


def needs_universal(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """ZeRO-1/2/3 shards of another worker count load only through DeepSpeed's universal format.

    ZeRO-3 goes the same way as 1 and 2: DeepSpeed 0.19.8 converts stage-3 shards
    (`checkpoint/ds_to_universal.py` `main`, its "Stage 3 path": `extract_zero_shards_stage3` cuts each
    rank's flat fp32 / exp_avg / exp_avg_sq partitions into per-parameter fragments, `merge_zero3_slices`
    joins them into whole tensors) and loads them on any worker count (`runtime/zero/stage3.py`
    `_load_universal_checkpoint` -> `load_hp_checkpoint_state_from_checkpoint_dir_stage3`: each rank reads
    every parameter's whole fp32 weight and Adam moments and keeps its own `ceil(numel / world)` slice,
    `load_hp_checkpoint_state`). The alternative, a consolidated state (the export's gather plus the
    optimizer moments, re-partitioned by hand), would write the same whole tensors through private
    optimizer attributes we would own; the universal copy keeps that in DeepSpeed. Its price, as for ZeRO-1/2:
    the driver writes a second, world-size independent copy (about the size of the checkpoint) beside the
    shards once, and every rank reads each whole tensor to keep 1/world of it, so a resume on another
    worker count reads world x the optimizer state; a resume on the same count loads the shards as saved.
    Two slips of the stage-3 load are bridged in `launcher.worker.deepspeed_io.load_checkpoint` (every
    optimizer group gets the saved group 0's hyperparameters, and all groups one shared Adam step tensor).
    """
    return saved["world_size"] != now["world_size"] and now["zero_stage"] in (1, 2, 3)


def convert_to_universal(path: Path) -> Path:
    """Write DeepSpeed's universal (world-size independent) copy of a checkpoint into `path/universal`.

    Runs DeepSpeed's own converter in a subprocess (the driver never imports DeepSpeed); the copy
    is written beside, gets a manifest of its own (its files are pickles too: the ranks verify them
    before loading) and is renamed into place, so an interrupted conversion is simply redone, as is
    a copy that no longer verifies. Its digests are taken as it is written: the driver does not read it again.
    """
    out = path / UNIVERSAL
    if verify(out) is None:
        return out
    shutil.rmtree(out, ignore_errors=True)
    partial = path / f"{UNIVERSAL}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        sys.executable, "-m", UNIVERSAL_CONVERTER, "--input_folder", str(path),
        "--output_folder", str(partial), "--num_extract_workers", "1", "--num_merge_workers", "1",
        "--inject_missing_state",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{path}: DeepSpeed could not convert this checkpoint to its universal format: {last}")
    for states in path.glob("mp_rank_*_model_states.pt"):  # weights, scheduler and client state
        shutil.copy2(states, partial / states.name)
    files = file_digests(partial)
    saved = read_manifest(path)
    commit(partial, saved["step"] if saved else -1, {"universal_of": path.name}, files)
    os.replace(partial, out)
    key = _stat_key(out, files)
    assert not isinstance(key, str), f"{out}: {key}"
    _verified[key] = None  # hashed as written, just now
    return out


def run_meta(world_size: int, global_batch_size: int, zero_stage: int, precision: str) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (besides its step and files)."""
    return {
        "world_size": world_size, "global_batch_size": global_batch_size, "zero_stage": zero_stage,
        "precision": precision,
    }  # fmt: skip


def resume_problem(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why a checkpoint (its manifest) cannot resume under the run described by `now` (None: it can)."""
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
    return None
