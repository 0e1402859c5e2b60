"""`launcher predict`: run a stage's export (or any sequence-, token- or image-classification export) over new data.

Run as: launcher predict jobs/demo.yaml --stage finetune --input 'new/*.jsonl' --output predictions/
    or: launcher predict jobs/vision-mae.yaml --stage finetune --input photos/ --output predictions/

Each input file gives one output file of the same name and format under the output folder: the input's
rows in their order, with `predicted_label`, `predicted_score` and a `score_<label>` column per label (a
token-classification export: `predicted_tags`, [word, tag] per word, and `predicted_entities`, the spans
transformers' token-classification pipeline gives, both as JSON).
An image-classification export reads image files: a table's `--image-field` column (default `image`) names
one per row, a relative path taken from the table's folder; or `--input` names the images themselves (a
folder, searched recursively, or a glob of png, jpg, ... files), predicted in sorted order into one
`predictions.jsonl` with a `path` column. A missing or unreadable image is a user error naming the table,
its line and the file.
`--local` runs one process over the files in chunks (bounded memory); otherwise the files are a Ray Data
dataset, mapped by one model actor per worker (`cluster.num_workers`, `cluster.cpus_per_worker` each, a GPU
each with `cluster.use_gpu`) on the cluster `run` would use, in order, and written file by file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.inference.files import (
    IMAGE_LIST_OUTPUT,
    PATH_COLUMN,
    TableWriter,
    expand_inputs,
    image_files,
    line_of,
    path_chunks,
    read_chunks,
    table_format,
)
from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec

CHUNK_ROWS = 4096  # rows read, predicted and written at a time (per file locally, per block on Ray)
PREDICTING_TASKS = ("classification", "token_classification", "image_classification")


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
    image_field: str | None = None  # an image-classification export: the column naming each row's image file
    image_list: bool = False  # `inputs` are image files themselves, predicted into one IMAGE_LIST_OUTPUT table

    def predictor(self, table: Path | None = None) -> tuple[type, dict[str, Any]]:
        """The model class for this export and its constructor's arguments (the same locally and on Ray);
        `table`: the input file whose folder an image path is relative to (None: the working directory)."""
        from launcher.inference.predictor import ImageClassifier, TextClassifier, TokenTagger

        model_dir = str(self.model_dir.resolve())
        if self.image_field is not None:
            base = (table.parent if table is not None else Path.cwd()).resolve()
            return ImageClassifier, {"model_dir": model_dir, "image_field": self.image_field,
                                     "batch_size": self.batch_size, "base_dir": str(base)}  # fmt: skip
        kwargs: dict[str, Any] = {"model_dir": model_dir, "text_field": self.text_field,
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
    image_field: str = "image",
) -> PredictRequest:
    """The export, text field and files of a `launcher predict` command, checked before anything runs."""
    from launcher.inference.predictor import ImageClassifier, TextClassifier, TokenTagger

    path = Path(target)
    spec = None
    if path.is_dir():
        if overrides or stage:
            raise UserError(f"{target}: an export folder takes no --stage or overrides (they are for a job spec)")
        model_dir, text_field, max_length = path, "text", None
    else:
        from launcher.jobspec.load import load_spec

        spec = load_spec(target, overrides)
        names = [s.name for s in spec.stages if s.task in PREDICTING_TASKS]
        if stage is None:
            if not names:
                raise UserError(f"{target}: no {', '.join(PREDICTING_TASKS)} stage to predict with")
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
    if ImageClassifier.architecture_ok(model_dir):
        images = image_files(inputs)
        files = images if images is not None else expand_inputs(inputs)
        request = PredictRequest(model_dir, text_field, None, files, Path(output), batch_size, spec,
                                 image_field=PATH_COLUMN if images is not None else image_field,
                                 image_list=images is not None)  # fmt: skip
        if not request.image_list:
            _check_output(request, output)
        return request
    tagger = TokenTagger.architecture_ok(model_dir)
    if not tagger and not TextClassifier.architecture_ok(model_dir):
        raise UserError(
            f"{model_dir}: predict takes a sequence-classification, token-classification or image-classification export"
        )
    request = PredictRequest(
        model_dir, text_field, max_length, expand_inputs(inputs), Path(output), batch_size, spec, tagger, aggregation
    )
    _check_output(request, output)
    return request


def _check_output(request: PredictRequest, output: str) -> None:
    if request.output_dir.resolve() in {f.parent.resolve() for f in request.inputs}:
        raise UserError(f"--output: {output} holds the inputs; name another folder")


def _chunks(request: PredictRequest, path: Path | None) -> Iterator[tuple[int, Any]]:
    """(first row number, DataFrame) of the table `path`, or of the image files' paths (path None)."""
    return path_chunks(request.inputs, CHUNK_ROWS) if path is None else read_chunks(path, CHUNK_ROWS)


def _user_error(request: PredictRequest, path: Path | None, exc: Exception, start: int | None) -> UserError | None:
    """The one line for a prediction error that is the input's (None: it is not): the table, the line (the
    row's number within the table, found again by its value when `start` is None: Ray's error has no row) and
    what is wrong. `path` None: the image files given directly."""
    from launcher.inference.predictor import BadImage, MissingText, bad_image_in

    if isinstance(exc, MissingText):
        problem, row, value = f"no {exc.what} in field {exc.field!r}", exc.row, None
    elif isinstance(exc, BadImage):
        problem, row, value = exc.problem, exc.row, exc.value
    else:  # Ray wraps an actor's error: read it back from its message
        message = str(exc)
        for what in ("text", "image path"):
            field = request.image_field if what == "image path" else request.text_field
            if f"no {what} in field" in message:
                where = f"{path}: a row has" if path is not None else "--input: an image has"
                return UserError(f"{where} no {what} in field {field!r}")
        found = bad_image_in(message)
        if found is None:
            return None
        value, problem = found
        row = None
    if path is None:
        return UserError(f"--input: {problem}")
    kind = table_format(path)
    if row is not None and start is not None:
        number: int | None = start + row
    else:  # the first row naming the image (a file named twice fails the same way each time)
        column = request.image_field or request.text_field
        number = next((first + i for first, frame in read_chunks(path, CHUNK_ROWS) if column in frame.columns
                       for i, v in enumerate(frame[column].tolist()) if v == value), None)  # fmt: skip
    if number is None:
        return UserError(f"{path}: {problem}")
    where = f"row {number + 1}" if kind == "parquet" else f"line {line_of(kind, number)}"
    return UserError(f"{path}: {where}: {problem}")


def predict_local(request: PredictRequest) -> int:
    """One process: each file in chunks of CHUNK_ROWS rows, through one model, written as it goes."""
    from launcher.inference.predictor import BadImage, ImageClassifier, MissingText

    predictor_class, kwargs = request.predictor()
    classifier = predictor_class(**kwargs)
    total = 0
    tables: list[Path | None] = [None] if request.image_list else list(request.inputs)
    for path in tables:
        writer = TableWriter(request.output_dir / (path.name if path is not None else IMAGE_LIST_OUTPUT))
        if isinstance(classifier, ImageClassifier) and path is not None:
            classifier.base_dir = path.parent.resolve()  # a relative image path is the table's
        try:
            for start, frame in _chunks(request, path):
                try:
                    writer.write(classifier(frame))
                except (MissingText, BadImage) as exc:
                    error = _user_error(request, path, exc, start)
                    assert error is not None  # the input's, always
                    raise error from None
                total += len(frame)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    source = f"{len(request.inputs)} image file(s)" if request.image_list else f"{len(request.inputs)} file(s)"
    print(f"predict: {total} rows from {source} -> {request.output_dir}", flush=True)
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
        tables: list[Path | None] = [None] if request.image_list else list(request.inputs)
        for path in tables:
            if path is None:  # image files given directly: a dataset of their paths, written as one jsonl
                kind, name = "json", IMAGE_LIST_OUTPUT
                dataset = ray.data.from_pandas([frame for _, frame in path_chunks(request.inputs, CHUNK_ROWS)])
            else:
                kind, name = table_format(path), path.name
                read = {"json": ray.data.read_json, "csv": ray.data.read_csv, "parquet": ray.data.read_parquet}[kind]
                # Reads and writes take no CPU of their own: the actors may hold every core (a 2-core node with
                # 2 workers) and Ray Data would wait forever to schedule a read or a write task beside them.
                dataset = read(str(path), ray_remote_args={"num_cpus": 0})
            predictor_class, kwargs = request.predictor(path)
            dataset = dataset.map_batches(
                predictor_class, fn_constructor_kwargs=kwargs,
                batch_size=CHUNK_ROWS, batch_format="pandas", concurrency=workers,
                num_cpus=cluster.cpus_per_worker, num_gpus=1 if cluster.use_gpu else 0,
            )  # fmt: skip
            staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=request.output_dir.parent.resolve()))
            try:
                try:
                    getattr(dataset, f"write_{kind}")(str(staging), ray_remote_args={"num_cpus": 0})
                except Exception as exc:  # Ray wraps an actor's error; a missing text or a bad image is the user's
                    error = _user_error(request, path, exc, None)
                    if error is not None:
                        raise error from None
                    raise
                total += _concatenate(sorted(staging.iterdir()), request.output_dir / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        source = f"{len(request.inputs)} image file(s)" if request.image_list else f"{len(request.inputs)} file(s)"
        print(f"predict: {total} rows from {source} on {workers} Ray actor(s) -> {request.output_dir}", flush=True)
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
