"""`launcher predict`: run a stage's export (or any sequence- or token-classification export) over files of new text.

Run as: launcher predict jobs/demo.yaml --stage finetune --input 'new/*.jsonl' --output predictions/

Each input file gives one output file of the same name and format under the output folder: the input's
rows in their order, with `predicted_label`, `predicted_score` and a `score_<label>` column per label (a
token-classification export: `predicted_tags`, [word, tag] per word, and `predicted_entities`, the spans
transformers' token-classification pipeline gives, both as JSON).
`--local` runs one process over the files in chunks (bounded memory); otherwise the files are a Ray Data
dataset, mapped by one model actor per worker (`cluster.num_workers`, `cluster.cpus_per_worker` each, a GPU
each with `cluster.use_gpu`) on the cluster `run` would use, in order, and written file by file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.inference.files import TableWriter, expand_inputs, line_of, read_chunks, table_format
from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec

CHUNK_ROWS = 4096  # rows read, predicted and written at a time (per file locally, per block on Ray)


@dataclass(frozen=True)
class PredictRequest:
    """What to predict with and on; `spec` is None when the command named an export folder."""

    model_dir: Path
    text_field: str
    max_length: int | None
    inputs: list[Path]
    output_dir: Path
    batch_size: int
    spec: JobSpec | None
    tagger: bool = False  # a token-classification export (word tags and entity spans), else sequence classification
    aggregation: str = "first"  # how a token tagger joins sub-tokens into words (transformers' aggregation_strategy)

    def predictor(self) -> tuple[type, dict[str, Any]]:
        """The model class for this export and its constructor's arguments (the same locally and on Ray)."""
        from launcher.inference.predictor import TextClassifier, TokenTagger

        kwargs: dict[str, Any] = {"model_dir": str(self.model_dir.resolve()), "text_field": self.text_field,
                                  "batch_size": self.batch_size, "max_length": self.max_length}  # fmt: skip
        if self.tagger:
            return TokenTagger, {**kwargs, "aggregation": self.aggregation}
        return TextClassifier, kwargs


def resolve_request(
    target: str,
    overrides: list[str],
    stage: str | None,
    inputs: str,
    output: str,
    batch_size: int,
    aggregation: str = "first",
) -> PredictRequest:
    """The export, text field and files of a `launcher predict` command, checked before anything runs."""
    from launcher.inference.predictor import TextClassifier, TokenTagger

    path = Path(target)
    spec = None
    if path.is_dir():
        if overrides or stage:
            raise UserError(f"{target}: an export folder takes no --stage or overrides (they are for a job spec)")
        model_dir, text_field, max_length = path, "text", None
    else:
        from launcher.jobspec.load import load_spec

        spec = load_spec(target, overrides)
        names = [s.name for s in spec.stages if s.task in ("classification", "token_classification")]
        if stage is None:
            if not names:
                raise UserError(f"{target}: no classification or token_classification stage to predict with")
            stage = names[-1]
        if stage not in [s.name for s in spec.stages]:
            raise UserError(
                f"--stage: no stage {stage!r} in {target} (stages: {', '.join(s.name for s in spec.stages)})"
            )
        chosen = spec.stage(stage)
        model_dir = layout.model_dir(spec, stage)
        text_field, max_length = chosen.data.text_field, chosen.data.seq_len
        if not (model_dir / "config.json").is_file():
            raise UserError(f"--stage: {stage} has no export at {model_dir}; run the job first")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{target}: not an exported model (no config.json)")
    tagger = TokenTagger.architecture_ok(model_dir)
    if not tagger and not TextClassifier.architecture_ok(model_dir):
        raise UserError(f"{model_dir}: predict takes a sequence-classification or token-classification export")
    files = expand_inputs(inputs)
    out = Path(output)
    if out.resolve() in {f.parent.resolve() for f in files}:
        raise UserError(f"--output: {output} holds the inputs; name another folder")
    return PredictRequest(model_dir, text_field, max_length, files, out, batch_size, spec, tagger, aggregation)


def predict_local(request: PredictRequest) -> int:
    """One process: each file in chunks of CHUNK_ROWS rows, through one model, written as it goes."""
    from launcher.inference.predictor import MissingText

    predictor_class, kwargs = request.predictor()
    classifier = predictor_class(**kwargs)
    total = 0
    for path in request.inputs:
        writer = TableWriter(request.output_dir / path.name)
        try:
            for start, frame in read_chunks(path, CHUNK_ROWS):
                try:
                    writer.write(classifier(frame))
                except MissingText as exc:
                    kind = table_format(path)
                    where = "row" if kind == "parquet" else "line"
                    number = start + exc.row + 1 if kind == "parquet" else line_of(kind, start + exc.row)
                    raise UserError(f"{path}: {where} {number}: no text in field {exc.field!r}") from None
                total += len(frame)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    print(f"predict: {total} rows from {len(request.inputs)} file(s) -> {request.output_dir}", flush=True)
    return 0


def predict_ray(request: PredictRequest, spec: JobSpec) -> int:
    """Ray Data batch inference: per input file a dataset, mapped in order by a pool of model actors."""
    from launcher.coordinator.ray import ray_session

    with ray_session(spec):
        import ray
        from ray.data import DataContext

        DataContext.get_current().execution_options.preserve_order = True
        cluster = spec.cluster
        workers = max(1, cluster.num_workers)
        total = 0
        for path in request.inputs:
            kind = table_format(path)
            read = {"json": ray.data.read_json, "csv": ray.data.read_csv, "parquet": ray.data.read_parquet}[kind]
            # Reads and writes take no CPU of their own: the actors may hold every core (a 2-core node with
            # 2 workers) and Ray Data would wait forever to schedule a read or a write task beside them.
            predictor_class, kwargs = request.predictor()
            dataset = read(str(path), ray_remote_args={"num_cpus": 0}).map_batches(
                predictor_class, fn_constructor_kwargs=kwargs,
                batch_size=CHUNK_ROWS, batch_format="pandas", concurrency=workers,
                num_cpus=cluster.cpus_per_worker, num_gpus=1 if cluster.use_gpu else 0,
            )  # fmt: skip
            staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=request.output_dir.parent.resolve()))
            try:
                try:
                    getattr(dataset, f"write_{kind}")(str(staging), ray_remote_args={"num_cpus": 0})
                except Exception as exc:  # Ray wraps an actor's error; a missing text field is the user's
                    if "no text in field" in str(exc):
                        raise UserError(f"{path}: a row has no text in field {request.text_field!r}") from None
                    raise
                total += _concatenate(sorted(staging.iterdir()), request.output_dir / path.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        print(f"predict: {total} rows from {len(request.inputs)} file(s) on {workers} Ray actor(s) -> "
              f"{request.output_dir}", flush=True)  # fmt: skip
    return 0


def _concatenate(parts: list[Path], out: Path) -> int:
    """Ray Data's output files (named in block order) as one file of the input's name, in order."""
    writer = TableWriter(out)
    rows = 0
    try:
        for part in parts:
            for _, frame in read_chunks(part, CHUNK_ROWS):
                writer.write(frame)
                rows += len(frame)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return rows


def run_predict(request: PredictRequest, local: bool) -> int:
    request.output_dir.mkdir(parents=True, exist_ok=True)
    if local or request.spec is None or (request.spec.cluster.num_workers == 0 and not os.environ.get("RAY_ADDRESS")):
        return predict_local(request)
    return predict_ray(request, request.spec)
