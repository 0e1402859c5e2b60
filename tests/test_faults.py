"""Faults a long run meets: a kill mid-save, a corrupted shard, a full disk, torn status files.

Each one is made for real (SIGKILL of the process, a flipped byte, a small tmpfs) on the tiny job
in debug mode; what must hold is that a later run uses only checkpoints that were committed and
still verify, and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import checkpoints as rules
from tests.conftest import ROOT, assert_ok, run_cli

TINY = "jobs/debug/tiny.yaml"
# The pretrain stage alone: 8 steps, a checkpoint every 2, the two newest kept.
PRETRAIN = ["--local", "--stage", "pretrain", "stages.0.checkpoint_every=2", "stages.0.keep_checkpoints=2"]


def _folder(root: Path, step: int, payload: bytes) -> Path:
    folder = root / rules.tag_for(step)
    (folder / "zero").mkdir(parents=True)
    (folder / "model.pt").write_bytes(payload)
    (folder / "zero" / "shard.pt").write_bytes(payload[::-1])
    return folder


def _committed(root: Path, step: int) -> Path:
    folder = _folder(root, step, f"weights of step {step}".encode())
    rules.commit(folder, step, rules.run_meta(1, 8, 0, "fp32"), rules.file_digests(folder))
    return folder


def test_only_committed_checkpoints_that_verify_are_used(tmp_path: Path, capsys) -> None:
    _committed(tmp_path, 2)
    four = _committed(tmp_path, 4)
    assert rules.latest_checkpoint(tmp_path) == four and rules.verify(four) is None
    assert set(rules.read_meta(four)["files"]) == {"model.pt", "zero/shard.pt"}
    _folder(tmp_path, 6, b"an interrupted save: no manifest")
    assert rules.latest_checkpoint(tmp_path) == four
    data = bytearray((four / "zero" / "shard.pt").read_bytes())
    data[3] ^= 0x01
    (four / "zero" / "shard.pt").write_bytes(bytes(data))  # same size: only the digest tells
    assert "sha256" in rules.verify(four)
    assert rules.latest_checkpoint(tmp_path) == tmp_path / rules.tag_for(2)
    warned = capsys.readouterr().err
    assert "step_00000006: no manifest" in warned and "step_00000004: zero/shard.pt does not match" in warned
    (tmp_path / rules.tag_for(2) / "model.pt").write_bytes(b"short")
    assert rules.latest_checkpoint(tmp_path) is None, "a truncated file fails too"


def test_only_committed_checkpoints_count_toward_keep(tmp_path: Path) -> None:
    for step in (2, 4):
        _committed(tmp_path, step)
    _folder(tmp_path, 5, b"left by a crash")
    _committed(tmp_path, 6)
    _folder(tmp_path, 8, b"being written right now")
    (tmp_path / rules.tag_for(6) / rules.META_FILE).write_text("")  # torn manifest: not committed
    rules.prune(tmp_path, keep=1)  # 4 is the newest committed; newer folders may still be being written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005", "step_00000006",
                                                         "step_00000008"]  # fmt: skip
    _committed(tmp_path, 10)
    rules.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000010"]


def _stopped_at_six(out: Path) -> Path:
    """The pretrain stage, stopped after step 6 (checkpoints 4 and 6 committed); its checkpoints folder."""
    result = run_cli("run", TINY, *PRETRAIN, f"output_dir={out}", env={"LAUNCHER_STOP_AFTER_STEP": "6"})
    assert result.returncode == 75, result.stderr[-3000:]
    checkpoints = out / "tiny" / "pretrain" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004", "step_00000006"]
    return checkpoints


def _resumed_from(out: Path) -> int:
    summary = json.loads((out / "tiny" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 8
    return summary["resumed_from_step"]


def test_a_flipped_byte_in_a_shard_is_refused_and_the_older_checkpoint_used(tmp_path: Path) -> None:
    checkpoints = _stopped_at_six(tmp_path)
    states = checkpoints / "step_00000006" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside tensor data: torch.load would not notice
    states.write_bytes(bytes(data))
    result = run_cli("run", TINY, *PRETRAIN, f"output_dir={tmp_path}")
    assert_ok(result)
    assert "step_00000006: mp_rank_00_model_states.pt does not match its sha256" in result.stderr
    assert "Traceback" not in result.stderr
    assert _resumed_from(tmp_path) == 4


KILL_IN_COMMIT = """
import sys, time
import launcher.checkpoints as rules
commit = rules.commit
def slow_commit(folder, step, *args):
    if step == 6:
        print("files of step 6 written", flush=True)
        time.sleep(600)
    commit(folder, step, *args)
rules.commit = slow_commit
from launcher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_save_resumes_from_the_previous_committed_checkpoint(tmp_path: Path) -> None:
    """SIGKILL after every file of step 6 is written, before its manifest: the next run resumes from 4."""
    command = [sys.executable, "-c", KILL_IN_COMMIT, "run", TINY, *PRETRAIN, f"output_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "files of step 6 written" in line:
                break
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    checkpoints = tmp_path / "tiny" / "pretrain" / "checkpoints"
    assert (checkpoints / "step_00000006" / "mp_rank_00_model_states.pt").is_file(), "killed inside the save"
    assert rules.read_meta(checkpoints / "step_00000006") is None
    result = run_cli("run", TINY, *PRETRAIN, f"output_dir={tmp_path}")
    assert_ok(result)
    assert "step_00000006: no manifest" in result.stderr
    assert _resumed_from(tmp_path) == 4
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000006", "step_00000008"]
    assert all(rules.verify(checkpoints / name) is None for name in ("step_00000006", "step_00000008"))


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MiB tmpfs (CI runs as root); unmounted whatever the test does."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)]
    made = subprocess.run(command, capture_output=True, check=False)
    if made.returncode != 0:
        pytest.fail(f"mounting a tmpfs needs root: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_is_one_clear_error_and_keeps_the_older_checkpoints(small_disk: Path) -> None:
    checkpoints = _stopped_at_six(small_disk)
    free = shutil.disk_usage(small_disk).free
    size = (checkpoints / "step_00000006" / "mp_rank_00_model_states.pt").stat().st_size
    (small_disk / "filler").write_bytes(b"\0" * (free - size // 2))  # room for half a checkpoint
    started = time.monotonic()
    result = run_cli("run", TINY, *PRETRAIN, f"output_dir={small_disk}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "checkpoint at step 8" in lines[0], result.stderr[-3000:]
    assert time.monotonic() - started < 300
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004", "step_00000006"]
    assert all(rules.verify(checkpoints / name) is None for name in ("step_00000004", "step_00000006"))
    (small_disk / "filler").unlink()
    assert_ok(run_cli("run", TINY, *PRETRAIN, f"output_dir={small_disk}"))
    assert _resumed_from(small_disk) == 6
