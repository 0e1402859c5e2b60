"""Bad specs and bad overrides: exit 2, one line naming the dotted field path, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main
from launcher.jobspec.load import load_spec
from tests.conftest import TINY, run_cli

# (overrides applied to the tiny job, text that the error must contain)
BAD_OVERRIDES = [
    (["foo=1"], "foo: unknown key"),
    (["stages.0.optim.lr=0"], "stages.0.optim.lr:"),
    (["stages.0.optim.lr=-1e-3"], "stages.0.optim.lr:"),
    (["stages.0.task=regression"], "stages.0.task:"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage:"),
    (["stages.0.max_steps=abc"], "stages.0.max_steps:"),
    (["stages.0.max_steps=0"], "stages.0.max_steps:"),
    (["stages.1.init_from=pretrian"], "stages.1.init_from:"),
    (["stages.0.init_from=finetune"], "stages.0.init_from:"),
    (["stages.0.model.num_heads=3"], "stages.0.model.num_heads:"),
    (["stages.1.data.labels=[fresh]"], "stages.1.data.labels:"),
    (["stages.1.data.labels=[fresh, fresh]"], "stages.1.data.labels:"),
    (["stages.0.batch.global_batch_size=12"], "stages.0.batch.global_batch_size:"),
    (["stages.0.data.seq_len=1000"], "stages.0.data.seq_len:"),
    (["stages.0.data.seq_len=1"], "stages.0.data.seq_len: task mlm needs blocks of at least 2 tokens"),
    (["stages.0.optim.skip_nonfinite=true"], "stages.0.optim.skip_nonfinite: needs deepspeed.zero_stage >= 1"),
    (["stages.0.model.family=gpt2"], "stages.0.model.family:"),
    (["stages.0.task=rtd", "stages.0.model.family=llama"], "stages.0.model.family: task rtd needs the bert family"),
    (["stages.0.task=rtd", "stages.0.rtd.generator_size=0"], "stages.0.rtd.generator_size:"),
    (["stages.0.embedding_init.method=pca"], "stages.0.embedding_init.method:"),
    (["stages.1.embedding_init.method=cooccurrence"], "stages.1.embedding_init.method: only for pre-training stages"),
    (["stages.0.mlm_probability=0.3"], "stages.0.mlm_probability: moved to mlm.mask_probability"),
    (["stages.0.rtd_weight=10"], "stages.0.rtd_weight: moved to rtd.discriminator_weight"),
    (["stages.0.embedding_init=cooccurrence"], "stages.0.embedding_init: now a section: embedding_init: {method: cooc"),
    (["stages.0.rtd.generator_size=0.5"], "stages.0.rtd: settings of task rtd, and this stage's task is mlm"),
    (
        ["stages.0.embedding_init.method=cooccurrence", "stages.0.model.path=data/models/all-minilm-l6-v2"],
        "stages.0.embedding_init.method: model.path brings trained embeddings",
    ),
    (["stages.0.embedding_init.std=0"], "stages.0.embedding_init.std:"),
    (["name=bad name"], "name:"),
    (["stages.1.name=pretrain"], "stages.1.name:"),
    (["stages.0.model.dropout=1.5"], "stages.0.model.dropout:"),
    (["cluster.num_workers=-1"], "cluster.num_workers:"),
    (["stages.0.precision=fp8"], "stages.0.precision:"),
    (["deepspeed.offload_param=true"], "deepspeed.offload_param:"),
    (["stages.5.max_steps=1"], "stages.5:"),
    (["stages.0.schedule.kind=step"], "stages.0.schedule.kind:"),
    (["stages=[]"], "stages:"),
    (["stages.0.data.train=[]"], "stages.0.data.train:"),
    (["stages.0.data.sources=[{path: a.txt, weight: 1}]"], "stages.0.data.train: give training files in `train` or"),
    (["stages.0.data.train=[]", "stages.0.data.sources=[{path: a.txt, weight: 0}]"], "stages.0.data.sources.0.weight:"),
    (["stages.1.data.train=[]", "stages.1.data.sources=[{path: a.csv, weight: 1}]"], "stages.1.data.sources: mixtures"),
    (["stages.0.data.document_mask=true"], "stages.0.data.document_mask: only for task clm"),
    (["stages.0.data.group_by_length=true"], "stages.0.data.group_by_length: only for classification"),
    (["stages.0.model.path=/nonexistent/model"], "stages.0.model.path:"),
    (["stages.0.max_steps=null"], "stages.0.max_steps:"),
    (["stages.0.optim.lr.peak=1"], "stages.0.optim.lr.peak:"),
    (["stages.0.tokenizer.source=finetune"], "stages.0.tokenizer.source:"),
    (["seed=1.5"], "seed:"),
    (["stages.0.max_steps"], "override 'stages.0.max_steps': expected key=value"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_spec_exits_2_naming_the_field(overrides, expected, capsys) -> None:
    code = main(["validate", str(TINY), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\nname: b\nstages: []\n", "duplicate key 'name' (line 2)"),
        ("- just\n- a list\n", "a job spec is a YAML mapping"),
        ("name: x\nstages: [\n", "invalid YAML"),
        ("name: x\n", "stages: required field is missing"),
        (
            "name: x\nstages:\n  - name: s\n    task: mlm\n    max_steps: 1\n",
            "stages.0.data: required field is missing",
        ),
        ("name: x\nstages: !!python/object:os.system {}\n", "invalid YAML"),
    ],
)
def test_bad_yaml_file(tmp_path, text, expected, capsys) -> None:
    assert main(["validate", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert expected in err, err


def test_missing_spec_file(capsys) -> None:
    assert main(["validate", "/nonexistent/job.yaml"]) == 2
    assert "/nonexistent/job.yaml: cannot read job spec" in capsys.readouterr().err


def test_real_cli_has_no_traceback() -> None:
    result = run_cli("validate", "jobs/debug/tiny.yaml", "stages.1.optim.lr=0")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: stages.1.optim.lr:")
    assert "Traceback" not in result.stderr


def test_overrides_are_typed_by_the_schema() -> None:
    spec = load_spec(TINY, ["stages.0.max_steps=20", "cluster.use_gpu=true", "stages.1.data.labels=[a, b, c]"])
    assert spec.stages[0].max_steps == 20 and isinstance(spec.stages[0].max_steps, int)
    assert spec.cluster.use_gpu is True
    assert spec.stages[1].data.labels == ["a", "b", "c"]
    spec = load_spec(TINY, ["stages.0.optim.lr=3e-4", "name=other", "stages.0.data.train=some/file.txt"])
    assert spec.stages[0].optim.lr == pytest.approx(3e-4)
    assert spec.name == "other"
    assert spec.stages[0].data.train == ["some/file.txt"]


def test_unknown_override_paths_are_rejected(capsys) -> None:
    for override, path in [
        ("stages.0.nonexistent=1", "stages.0.nonexistent: unknown key"),
        ("deepspeed.zero=1", "deepspeed.zero: unknown key"),
        ("stages.0.optim.lr.x=1", "stages.0.optim.lr.x:"),
    ]:
        assert main(["validate", str(TINY), override]) == 2
        assert path in capsys.readouterr().err
