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

from launcher import checkpoint_manifest as rules
from launcher.hooks import HANG_AT_STEP_ENV, STOP_AFTER_STEP_ENV
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
    assert set(rules.read_manifest(four)["files"]) == {"model.pt", "zero/shard.pt"}
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


def test_a_verdict_handed_on_covers_only_the_files_as_they_were_hashed(tmp_path: Path) -> None:
    """The driver's verdicts travel to rank 0 (`trust`), keyed by every file's size and modification time:
    a file rewritten since (a flipped byte) is hashed again, not taken on the driver's word."""
    four = _committed(tmp_path, 4)
    assert rules.verify(four) is None
    handed_on = rules.verdicts()
    rules._verified.clear()  # another process: nothing hashed yet
    rules.trust(handed_on)
    data = bytearray((four / "model.pt").read_bytes())
    data[0] ^= 0x01
    time.sleep(0.01)  # a new modification time even on a coarse clock
    (four / "model.pt").write_bytes(bytes(data))
    assert "model.pt does not match its sha256" in rules.verify(four)


def test_the_universal_copy_has_a_manifest_and_is_converted_again_when_it_no_longer_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed's converter (a stand-in here) writes pickles too: the copy is committed like a checkpoint,
    hashed as written (not read again in this process), and a flipped byte in it means a new conversion."""
    conversions = []

    def convert(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        out = Path(command[command.index("--output_folder") + 1])
        (out / "zero" / "weight").mkdir(parents=True)
        (out / "zero" / "weight" / "fp32.pt").write_bytes(b"whole tensor %d" % len(conversions))
        conversions.append(out)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(rules.subprocess, "run", convert)
    four = _committed(tmp_path, 4)
    monkeypatch.setattr(rules, "_check_files", lambda *args: pytest.fail("hashed again"))
    universal = rules.convert_to_universal(four)
    assert rules.verify(universal) is None and rules.read_manifest(universal)["step"] == 4
    assert set(rules.read_manifest(universal)["files"]) == {"zero/weight/fp32.pt"}
    assert rules.convert_to_universal(four) == universal and len(conversions) == 1, "a verified copy is kept"
    monkeypatch.undo()
    monkeypatch.setattr(rules.subprocess, "run", convert)
    fp32 = universal / "zero" / "weight" / "fp32.pt"
    fp32.write_bytes(fp32.read_bytes().replace(b"whole", b"whale"))
    assert "does not match its sha256" in rules.verify(universal)
    assert rules.convert_to_universal(four) == universal and len(conversions) == 2
    assert rules.verify(universal) is None and fp32.read_bytes() == b"whole tensor 1"


def test_each_rank_hashes_the_shards_it_wrote_and_together_every_file(tmp_path: Path) -> None:
    """In a folder that every rank writes into, DeepSpeed names each rank's shards; other files are rank 0's."""
    folder = tmp_path / "step"
    folder.mkdir()
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # fmt: skip
    for index, name in enumerate(names):
        (folder / name).write_bytes(bytes([index]) * (1000 + index))
    parts = [rules.file_digests(folder, rank, 2) for rank in (0, 1)]
    assert set(parts[1]) == {names[2], names[3]} and set(parts[0]) == {names[0], names[1]}
    assert {**parts[0], **parts[1]} == rules.file_digests(folder), "the same digests as one process hashing all"


def test_only_committed_checkpoints_count_toward_keep(tmp_path: Path) -> None:
    for step in (2, 4):
        _committed(tmp_path, step)
    _folder(tmp_path, 5, b"left by a crash")
    _committed(tmp_path, 6)
    _folder(tmp_path, 8, b"being written right now")
    (tmp_path / rules.tag_for(6) / rules.MANIFEST_FILE).write_text("")  # torn manifest: not committed
    rules.prune(tmp_path, keep=1)  # 4 is the newest committed; newer folders may still be being written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005", "step_00000006",
                                                         "step_00000008"]  # fmt: skip
    _committed(tmp_path, 10)
    rules.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000010"]


def _stopped_at_six(out: Path, *overrides: str) -> Path:
    """The pretrain stage, stopped after step 6 (checkpoints 4 and 6 committed); its checkpoints folder."""
    result = run_cli("run", TINY, *PRETRAIN, *overrides, f"output_dir={out}", env={STOP_AFTER_STEP_ENV: "6"})
    assert result.returncode == 75, result.stderr[-3000:]
    checkpoints = out / "tiny" / "pretrain" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000004", "step_00000006"]
    return checkpoints


def _resumed_from(out: Path) -> int:
    summary = json.loads((out / "tiny" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 8
    return summary["resumed_from_step"]


@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
@pytest.mark.parametrize(
    ("zero", "shard"), [(0, "mp_rank_00_model_states.pt"), (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")]
)
def test_a_flipped_byte_in_a_shard_is_refused_and_the_older_checkpoint_used(
    tmp_path: Path, zero: int, shard: str
) -> None:
    """ZeRO-0's one file, and ZeRO-2's optimizer shard beside the weights (a checkpoint of several files,
    each hashed once, by the rank that wrote it): refused with a warning, the run resumes from step 4."""
    checkpoints = _stopped_at_six(tmp_path, f"deepspeed.zero_stage={zero}")
    assert len(rules.read_manifest(checkpoints / "step_00000006")["files"]) >= (2 if zero else 1)
    states = checkpoints / "step_00000006" / shard
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside tensor data: torch.load would not notice
    states.write_bytes(bytes(data))
    result = run_cli("run", TINY, *PRETRAIN, f"deepspeed.zero_stage={zero}", f"output_dir={tmp_path}")
    assert_ok(result)
    assert f"step_00000006: {shard} does not match its sha256" in result.stderr
    assert "Traceback" not in result.stderr
    assert _resumed_from(tmp_path) == 4


KILL_IN_COMMIT = """
import sys, time
import launcher.checkpoint_manifest as rules
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


@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
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
    assert rules.read_manifest(checkpoints / "step_00000006") is None
    (tmp_path / "tiny" / "pretrain" / "STOP").touch()  # as a run killed after a SIGTERM leaves it: stale
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


@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
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


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """The tiny job run to the end: `pretrain/model` (a BERT MLM export) and `finetune/model` (a classifier)."""
    out = tmp_path_factory.mktemp("exports")
    assert_ok(run_cli("run", TINY, "--local", f"output_dir={out}"))
    return out / "tiny"


def _bad_start(tmp_path: Path, exports: Path, change) -> Path:
    start = tmp_path / "start"
    shutil.copytree(exports / "pretrain" / "model", start)
    change(start)
    return start


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


MINILM = str(ROOT / "data" / "models" / "all-minilm-l6-v2")
BAD_STARTS = [  # (what is wrong with the export, overrides of the fine-tuning stage, the message)
    (_truncate, [], "stages.1.init_from: {start}: model.safetensors holds"),
    (lambda f: (f / "model.safetensors").unlink(), [], "stages.1.init_from: {start} holds no weights"),
    (lambda f: (f / "config.json").write_text("{"), [], "{start}/config.json' is not a valid JSON file"),
    (None, ["stages.1.data.seq_len=100"], "stages.1.data.seq_len: 100 exceeds the 64 positions"),
    (None, [f"stages.1.tokenizer.source={MINILM}"], "stages.1.tokenizer.source: its vocabulary has 30522 tokens"),
    ("classifier", ["stages.1.data.labels=[rotten, fresh, other]"], "stages.1.data.labels: 3 labels, but the model"),
    (None, ["stages.1.task=rtd"], "stages.1.init_from: the model in {start} is a bert model; task rtd continues"),
]


@pytest.mark.parametrize(("change", "overrides", "message"), BAD_STARTS, ids=[m[:40] for _, _, m in BAD_STARTS])
@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
def test_a_start_model_that_cannot_work_is_refused_before_any_worker(
    tmp_path: Path, exports: Path, change, overrides: list[str], message: str, capsys
) -> None:
    from launcher.cli import main

    if change == "classifier":
        start = exports / "finetune" / "model"
    else:
        start = _bad_start(tmp_path, exports, change or (lambda f: None))
    out = tmp_path / "out"
    code = main(["run", TINY, "--local", "--stage", "finetune", f"output_dir={out}", f"stages.1.init_from={start}",
                 "stages.1.max_steps=2", *overrides])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert message.format(start=start) in err, err[-3000:]
    assert "Traceback" not in err
    assert not (out / "tiny" / "finetune" / "checkpoints").exists(), "refused before the stage started"


def test_an_output_dir_that_cannot_be_written_is_a_user_error(tmp_path: Path, capsys) -> None:
    from launcher.cli import main

    (tmp_path / "file").write_text("not a folder")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], check=False)
    assert made.returncode == 0, "mounting a tmpfs needs root (CI runs as root)"
    try:
        for output_dir in (tmp_path / "file", tmp_path / "file" / "below", read_only):
            code = main(["run", TINY, "--local", f"output_dir={output_dir}"])
            err = capsys.readouterr().err
            assert code == 2 and err.startswith(f"error: output_dir: cannot write {output_dir}/tiny"), err[-2000:]
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
def test_torn_job_marker_and_prepared_meta_are_rewritten_with_a_warning(tmp_path: Path, exports: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(exports.parent, out)
    (out / "tiny" / "job.json").write_text("")
    (out / "tiny" / "finetune" / "data" / "meta.json").write_text('{"fingerp')
    (out / "tiny" / "finetune" / "summary.json").write_text("")
    with (out / "tiny" / "finetune" / "metrics.jsonl").open("a") as stream:
        stream.write('{"step": 5, "train/lo')  # a line torn by a crash
    result = run_cli("run", TINY, "--local", f"output_dir={out}")
    assert_ok(result)
    for torn in ("job.json is unreadable", "meta.json is unreadable", "summary.json is unreadable",
                 "metrics.jsonl: 1 unreadable line(s) dropped"):  # fmt: skip
        assert torn in result.stderr, result.stderr[-3000:]
    assert json.loads((out / "tiny" / "job.json").read_text())["name"] == "tiny"
    assert json.loads((out / "tiny" / "finetune" / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
def test_a_loss_that_is_not_finite_stops_the_stage_naming_the_step(tmp_path: Path) -> None:
    result = run_cli("run", TINY, *PRETRAIN, f"output_dir={tmp_path}", "stages.0.optim.lr=1e30")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: stage pretrain: the training loss is nan at step 3" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    checkpoints = tmp_path / "tiny" / "pretrain" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000002"], "the last good checkpoint is kept"
    assert rules.verify(checkpoints / "step_00000002") is None


@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
def test_skip_nonfinite_skips_the_update_and_stops_after_ten_in_a_row(tmp_path: Path) -> None:
    """At ZeRO-1 DeepSpeed skips an update whose gradient norm is not finite: the weights saved mid-streak are
    the last good ones (finite), and more than 10 such steps in a row stop the stage."""
    import torch

    overrides = ["stages.0.optim.lr=1e30", "deepspeed.zero_stage=1", "stages.0.optim.skip_nonfinite=true",
                 "stages.0.max_steps=40"]  # fmt: skip
    result = run_cli("run", TINY, *PRETRAIN, f"output_dir={tmp_path}", *overrides)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "warning: step 3: loss nan, update skipped (optim.skip_nonfinite)" in result.stdout, result.stdout[-3000:]
    assert "stage pretrain: 11 steps in a row up to step 13 had a loss that is not finite" in result.stderr
    latest = rules.latest_checkpoint(tmp_path / "tiny" / "pretrain" / "checkpoints")
    assert latest is not None and rules.read_manifest(latest)["step"] == 12, "saved during the streak"
    states = torch.load(latest / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert all(torch.isfinite(t).all() for t in states.values() if t.is_floating_point()), "no NaN was applied"


@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
def test_a_rank_that_hangs_inside_a_step_is_ended_naming_it(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli("run", TINY, *PRETRAIN, f"output_dir={tmp_path}", "cluster.step_timeout_s=5",
                     env={HANG_AT_STEP_ENV: "0:3"}, timeout=300)  # fmt: skip
    assert result.returncode == 70, result.stderr[-3000:]
    assert "rank 0 made no progress for" in result.stderr
    assert "after step 2, inside step 3 (cluster.step_timeout_s=5)" in result.stderr
    assert "in _run" in result.stderr, "the stack of the hung thread is shown"
    assert time.monotonic() - started < 120


# Big enough (about 0.3 s a step on 2 cores) for a signal to land mid-run.
SLOW = ["stages.0.max_steps=40", "stages.0.model.hidden_size=128", "stages.0.data.seq_len=64",
        "stages.0.batch.micro_batch_size=32", "stages.0.checkpoint_every=100"]  # fmt: skip


def _start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came (exit {proc.poll()})")


@pytest.mark.parametrize("signum", [15, 2], ids=["SIGTERM", "SIGINT"])
@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
def test_a_signal_checkpoints_and_stops_and_the_rerun_resumes(tmp_path: Path, signum: int) -> None:
    command = [sys.executable, "-m", "launcher", "run", TINY, *PRETRAIN, *SLOW, f"output_dir={tmp_path}"]
    proc = _start(command)
    try:
        _wait_for_step(tmp_path / "tiny" / "pretrain" / "metrics.jsonl", 3, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "stopping after a checkpoint" in err and "Traceback" not in err
    checkpoints = tmp_path / "tiny" / "pretrain" / "checkpoints"
    latest = rules.latest_checkpoint(checkpoints)
    assert latest is not None, "checkpointed before stopping"
    stopped_at = rules.read_manifest(latest)["step"]
    assert 3 <= stopped_at < 40
    assert not (tmp_path / "tiny" / "pretrain" / "STOP").exists()
    resumed = run_cli("run", TINY, *PRETRAIN, *SLOW, f"output_dir={tmp_path}")
    assert_ok(resumed)
    summary = json.loads((tmp_path / "tiny" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["resumed_from_step"] == stopped_at


@pytest.mark.slow  # a real run (the unit checks above stay in `make test-fast`)
def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    """...but not the same signal delivered twice within REPEAT_S (2 s). Step 4 hangs (a test hook), so the
    first request cannot be honoured before the second one comes."""
    command = [sys.executable, "-m", "launcher", "run", TINY, *PRETRAIN, *SLOW, f"output_dir={tmp_path}"]
    proc = _start(command, env={HANG_AT_STEP_ENV: "0:4"})
    try:
        _wait_for_step(tmp_path / "tiny" / "pretrain" / "metrics.jsonl", 3, proc)
        proc.send_signal(2)
        proc.send_signal(2)  # the same request delivered twice at once (slurmd and srun both forward it)
        time.sleep(2.5)
        proc.send_signal(15)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + 15, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "error: stopped at once by SIGTERM; re-run to resume from the last checkpoint"
    ), err[-3000:]
