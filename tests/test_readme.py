"""README.md stays true: its YAML jobs validate, its `launcher validate` commands print what it shows, its
local links and the jobs it lists exist, it has no dated lines and fits in 250 lines; the job for your own
data runs as shown (shrunk by overrides) and `launcher predict` reads its export (slow)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_ok, run_cli

README = ROOT / "README.md"
TEXT = README.read_text()
# Fenced blocks in order: (language, body). A YAML block whose first line is `# fragment` is not a whole job.
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", TEXT, re.S | re.M)]
YAML_BLOCKS = [body for lang, body in BLOCKS if lang == "yaml"]
JOBS = [body for body in YAML_BLOCKS if not body.startswith("# fragment")]
OWN_DATA_JOB = "my-job.yaml"  # the name the README saves its own-data job under


def test_readme_is_short_and_undated() -> None:
    lines = TEXT.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; results belong in benchmarks/README.md"
    dated = [line for line in lines if re.search(r"20\d{2}-\d{2}-\d{2}", line)]
    assert dated == [], "dated lines belong in benchmarks/README.md"


def test_readme_has_a_whole_job() -> None:
    assert JOBS, "README.md shows no whole job (a ```yaml block)"
    for body in YAML_BLOCKS:
        import yaml

        assert yaml.safe_load(body) is not None  # fragments too must at least parse


@pytest.mark.parametrize("index", range(len(JOBS)))
def test_readme_job_validates(index: int, tmp_path: Path) -> None:
    job = tmp_path / OWN_DATA_JOB
    job.write_text(JOBS[index])
    result = run_cli("validate", str(job), f"output_dir={tmp_path / 'runs'}")
    assert result.returncode == 0, f"README yaml block {index}:\n{result.stdout}\n{result.stderr}"


def _validate_commands() -> list[tuple[list[str], str | None]]:
    """Each `launcher validate ...` line of a bash block, with the plain block right after it (its output) if any;
    the own-data job's is test_readme_job_validates."""
    commands = []
    for position, (lang, body) in enumerate(BLOCKS):
        if lang != "bash":
            continue
        shown = BLOCKS[position + 1][1] if position + 1 < len(BLOCKS) and BLOCKS[position + 1][0] == "" else None
        for line in body.splitlines():
            if line.startswith("launcher validate ") and not line.startswith(f"launcher validate {OWN_DATA_JOB}"):
                commands.append((shlex.split(line, comments=True)[2:], shown))
    return commands


@pytest.mark.parametrize(
    "args, shown", [pytest.param(args, shown, id=" ".join(args)[:60]) for args, shown in _validate_commands()]
)
def test_readme_validate_command_prints_what_it_shows(args: list[str], shown: str | None) -> None:
    result = run_cli("validate", *args)
    if shown is None:
        assert_ok(result)
        return
    printed = result.stdout + result.stderr
    for line in shown.splitlines():
        assert line.strip() in printed, f"README shows {line.strip()!r}; validate printed:\n{printed}"


def test_readme_links_and_jobs_exist() -> None:
    targets = {m.group(1).split("#")[0] for m in re.finditer(r"\]\(([^)]+)\)", TEXT)}
    local = {t for t in targets if t and "://" not in t}
    assert {t for t in local if not (ROOT / t).exists()} == set()
    listed = set(re.findall(r"\(jobs/([\w/.-]+\.yaml)\)", TEXT))
    shipped = {p.relative_to(ROOT / "jobs").as_posix() for p in (ROOT / "jobs").rglob("*.yaml")}
    assert listed == shipped, "README's job table and jobs/ differ"


def _own_data(folder: Path) -> None:
    """The files the README's job names, from the demo data: a folder of txt, a text,label train and dev csv."""
    demo = ROOT / "data" / "demo"
    corpus = folder / "my-data" / "corpus"
    corpus.mkdir(parents=True)
    with (demo / "unlabeled.jsonl").open() as lines:
        texts = [json.loads(next(lines))["text"] for _ in range(1200)]
    for part in range(2):
        (corpus / f"part-{part}.txt").write_text("\n".join(texts[part::2]) + "\n")
    names = {"rotten": "negative", "fresh": "positive"}
    for split, name in (("train", "train"), ("test", "dev")):
        with (demo / f"{split}.csv").open(newline="") as source:
            rows = [(row["text"], names[row["label"]]) for row in itertools.islice(csv.DictReader(source), 64)]
        with (folder / "my-data" / f"{name}.csv").open("w", newline="") as out:
            csv.writer(out).writerows([("text", "label"), *rows])
    (folder / "new").mkdir()
    with (folder / "new" / "reviews.csv").open("w", newline="") as out:
        csv.writer(out).writerows([("text",), *[(text,) for text, _ in rows[:8]]])


def _launcher(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`launcher ARGS` from the folder the user saved the job in (relative paths as the README writes them)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=900, check=False)  # fmt: skip


def _readme_command(prefix: str) -> list[str]:
    """The arguments of the first command line of a bash block that starts with `prefix`, comment dropped."""
    for lang, body in BLOCKS:
        for line in body.splitlines() if lang == "bash" else []:
            if line.startswith(prefix):
                return shlex.split(line, comments=True)[1:]
    raise AssertionError(f"README.md has no command starting with {prefix!r}")


@pytest.mark.slow
def test_readme_own_data_job_runs_and_predicts(tmp_path: Path) -> None:
    (tmp_path / OWN_DATA_JOB).write_text(JOBS[0])
    _own_data(tmp_path)
    shrink = ["stages.0.max_steps=2", "stages.0.data.max_eval_samples=16", "stages.1.max_steps=2",
              "stages.1.data.max_eval_samples=32"]  # fmt: skip
    assert_ok(_launcher(tmp_path, *_readme_command(f"launcher run {OWN_DATA_JOB} --local"), *shrink))
    for stage in ("pretrain", "finetune"):
        assert (tmp_path / "runs" / "my-job" / stage / "model" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "runs" / "my-job" / "finetune" / "summary.json").read_text())
    assert summary["steps"] == 2 and "accuracy" in summary["eval"]
    assert_ok(_launcher(tmp_path, *_readme_command(f"launcher predict {OWN_DATA_JOB} ")))
    with (tmp_path / "predictions" / "reviews.csv").open(newline="") as predicted:
        rows = list(csv.DictReader(predicted))
    assert len(rows) == 8
    assert {row["predicted_label"] for row in rows} <= {"negative", "positive"}
    assert {"score_negative", "score_positive"} <= set(rows[0])
