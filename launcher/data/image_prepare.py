"""Prepare a stage's images once (tasks image_classification and mae); later runs reuse them while the inputs
are unchanged.

Run as: launcher prepare JOB.yaml   (`launcher run` calls it for stages not prepared yet)

The inputs (image folders, IDX files: `launcher.data.images`) are cut into chunks of images; each chunk
is one task that decodes, checks, resizes and crops its images and writes its own shards of uint8 pixels.
As for text, tasks run in a worker process per core, or as Ray Data tasks across the cluster when the
command joined one (`prepare.run_jobs_on_ray`); the shards and their order are the same either way.
Memory stays bounded by a block of images per task. Without `data.eval`, an image is held out for eval when
a seeded hash of its pixels falls below `data.eval_fraction` (order-free, as for text).
`data.max_train_samples` keeps the first images.

Everything is written into a temporary folder next to `<stage>/data/` and renamed into place last, with
`meta.json` inside: a failed or killed prepare leaves the previous data or none. The image processor
(`CLIPImageProcessor`: the same resize and crop, the normalisation) is saved in `data/tokenizer/`, where a
text stage keeps its tokenizer, and goes out with the export. `meta.json`'s fingerprint covers every
input file (path, size, mtime), the settings that change the pixels and the processor the stage starts
from.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from launcher import atomic
from launcher.data.images import (
    META_FILE,
    IdxReader,
    ImageSource,
    ImageStore,
    from_grey_array,
    idx_header,
    load_image,
    resolve_sources,
    source_files,
)
from launcher.errors import UserError
from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec, StageSpec
from launcher.jobspec.start import resolve_start

META_VERSION = 1
PROCESSOR_FILE = "preprocessor_config.json"
MAX_CHUNK_IMAGES = 8192
MIN_CHUNK_IMAGES = 512
SERIAL_IMAGES = 2048  # up to this many images, in this process
BLOCK_IMAGES = 1024  # images held in memory by a task before they are written


@dataclass(frozen=True)
class ImageJob:
    """One task: images [start, stop) of one input, written as shard `shard` (plain values, absolute paths)."""

    source: ImageSource
    start: int
    stop: int
    shard: int
    out_dir: str
    size: int
    channels: int
    split: str | None  # None: each image's split drawn by `in_eval`
    eval_fraction: float
    seed: int
    labelled: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ImageJob:
        data = json.loads(text)
        source = data["source"]
        data["source"] = ImageSource(**{**source, "files": tuple(source["files"]), "labels": tuple(source["labels"])})
        return cls(**data)


def in_eval(pixels: np.ndarray, seed: int, fraction: float) -> bool:
    """An image's split as a pure function of its pixels: equal images share a split, in any order."""
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _blocks(job: ImageJob) -> Iterator[tuple[np.ndarray, np.ndarray | None, Counter[str]]]:
    """(pixels N x size x size x channels, labels or None, modes seen) per block of the job's images."""
    source = job.source
    if source.kind == "idx":
        images = IdxReader(Path(source.path), 3, job.start)
        labels = IdxReader(Path(source.labels_path), 1, job.start) if source.labels_path else None
        try:
            for first in range(job.start, job.stop, BLOCK_IMAGES):
                count = min(BLOCK_IMAGES, job.stop - first)
                pixels = from_grey_array(images.read(count), job.size, job.channels)
                yield pixels, None if labels is None else labels.read(count), Counter({"L": count})
        finally:
            images.close()
            if labels is not None:
                labels.close()
        return
    for first in range(job.start, job.stop, BLOCK_IMAGES):
        last = min(first + BLOCK_IMAGES, job.stop)
        decoded = [load_image(path, job.size, job.channels) for path in source.files[first:last]]
        ids = np.asarray(source.labels[first:last], dtype=np.int64) if source.labels else None
        yield np.stack([pixels for pixels, _ in decoded]), ids, Counter(mode for _, mode in decoded)


def run_image_job(job: ImageJob) -> dict:
    """Write the job's images as `<split>.<shard>` files; returns the shards written (or the user error)."""
    try:
        out = Path(job.out_dir)
        streams: dict[str, Any] = {}
        labels: dict[str, list[np.ndarray]] = {}
        modes: Counter[str] = Counter()
        for pixels, block_labels, block_modes in _blocks(job):
            modes.update(block_modes)
            if job.split is not None:
                chosen = np.full(len(pixels), job.split == "eval")
            else:
                chosen = np.fromiter((in_eval(p, job.seed, job.eval_fraction) for p in pixels), bool, len(pixels))
            for split, keep in (("train", ~chosen), ("eval", chosen)):
                if not keep.any():
                    continue
                if split not in streams:
                    streams[split] = (out / f"{split}.{job.shard:05d}.images.bin").open("wb")
                    labels[split] = []
                np.ascontiguousarray(pixels[keep]).tofile(streams[split])
                if block_labels is not None:
                    labels[split].append(block_labels[keep].astype(np.int64))
        splits = {}
        for split, stream in streams.items():
            stream.close()
            name = f"{split}.{job.shard:05d}"
            values = np.concatenate(labels[split]) if labels[split] else np.zeros(0, dtype=np.int64)
            if job.labelled:
                np.save(out / f"{name}.labels.npy", values)
            splits[split] = {"name": name, "num_images": (out / f"{name}.images.bin").stat().st_size
                             // (job.size * job.size * job.channels)}  # fmt: skip
        return {"shard": job.shard, "splits": splits, "modes": dict(modes),
                "process": f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip
    except UserError as exc:
        return {"shard": job.shard, "error": str(exc)}


def ray_image_task(row: dict) -> dict:
    """Ray Data's `map` over image jobs, as `shard_task.ray_task` over text ones: the job as JSON in, what it
    wrote as JSON out."""
    return {"result": json.dumps(run_image_job(ImageJob.from_json(row["job"])))}


def run_image_jobs(jobs: list[ImageJob]) -> list[dict]:
    """Few images are decoded here (a worker's start costs more); more in worker processes, one per core
    (spawned: no copied threads)."""
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1 or sum(job.stop - job.start for job in jobs) <= SERIAL_IMAGES:
        return [run_image_job(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from launcher.data.prepare import _die_with_parent

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        return list(pool.map(run_image_job, jobs))


ImageRunner = Callable[[list[ImageJob]], list[dict]]


def processor_origin(spec: JobSpec, stage: StageSpec) -> Path | None:
    """The image processor a stage keeps: the one of the stage or model folder it starts from (the folder its
    tokenizer would come from), when that has one."""
    start = resolve_start(spec, stage)
    origin = start.tokenizer
    if origin is None or (start.tokenizer_stage is None and not (origin / PROCESSOR_FILE).is_file()):
        return None
    return origin


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def fingerprint(spec: JobSpec, stage: StageSpec, sources: dict[str, list[ImageSource]]) -> str:
    files = [Path(f) for split in sources.values() for source in split for f in source_files(source)]
    origin = processor_origin(spec, stage)
    record = {
        "version": META_VERSION,
        "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "data": stage.data.model_dump(
            include={"train", "eval", "eval_fraction", "labels", "max_train_samples", "max_eval_samples"}
        ),
        "image": stage.image.model_dump(include={"size", "channels", "mean", "std"}),
        "task": stage.task,
        "seed": spec.seed,
        "origin": None if origin is None else _digest(origin / PROCESSOR_FILE),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _sources(spec: JobSpec, index: int) -> dict[str, list[ImageSource]]:
    stage = spec.stages[index]
    labelled = stage.task == "image_classification"
    field = f"stages.{index}.data"
    found = {"train": resolve_sources(stage.data.train, stage.data.labels, labelled, f"{field}.train")}
    if stage.data.eval:
        found["eval"] = resolve_sources(stage.data.eval, stage.data.labels, labelled, f"{field}.eval")
    return found


def prepare_images(spec: JobSpec, index: int, run_jobs: ImageRunner = run_image_jobs) -> Any:
    """Prepare stage `index`'s images (cached); returns its `PreparedStage` (samples are images). `run_jobs` runs
    the tasks (`prepare.run_jobs_on_ray`: as Ray Data tasks on the cluster joined)."""
    from launcher.data.prepare import into_place, read_meta

    stage = spec.stages[index]
    sources = _sources(spec, index)
    return into_place(layout.data_dir(spec, stage.name), fingerprint(spec, stage, sources), read_meta(spec, stage),
                      lambda work: _prepare_into(spec, index, sources, work, run_jobs))  # fmt: skip


def _chunk_images(total: int) -> int:
    """Chunks small enough that every core gets some work, large enough to amortise a task's start."""
    return max(MIN_CHUNK_IMAGES, min(MAX_CHUNK_IMAGES, total // (2 * (os.cpu_count() or 1)) + 1))


def _plan(
    stage: StageSpec, sources: list[ImageSource], split: str | None, first_shard: int, work: Path, seed: int,
    cap: int | None,
) -> list[ImageJob]:  # fmt: skip
    """Jobs over `sources` in order; with `cap` (a split given by its own files) only its first images."""
    size, labelled = stage.image.size, stage.task == "image_classification"
    for source in sources:
        if source.kind == "idx":
            (_, rows, cols), _ = idx_header(Path(source.path), 3)
            if min(rows, cols) < size:
                raise UserError(
                    f"{source.path}: its {cols}x{rows}-pixel images are smaller than image.size {size} (the crop the "
                    "model sees); lower image.size"
                )
    chunk = _chunk_images(sum(len(source) for source in sources))
    jobs: list[ImageJob] = []
    left = cap if cap is not None else sys.maxsize
    for source in sources:
        for start in range(0, min(len(source), left), chunk):
            stop = min(start + chunk, len(source), left)
            part = source  # a folder's job carries only its own files (one pickle per task)
            if source.kind == "folder":
                files, ids = source.files[start:stop], source.labels[start:stop]
                part, start, stop = replace(source, files=files, labels=ids), 0, stop - start
            jobs.append(ImageJob(part, start, stop, first_shard + len(jobs), str(work), size, stage.image.channels,
                                 split, stage.data.eval_fraction, seed, labelled))  # fmt: skip
        left -= min(len(source), left)
        if left <= 0:
            break
    return jobs


def _assemble(results: list[dict]) -> tuple[dict[str, list[dict]], Counter[str]]:
    """Shards per split in input order and the image modes seen; the first error is the user's."""
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    modes: Counter[str] = Counter()
    for result in results:
        if "error" in result:
            raise UserError(result["error"])
        modes.update(result["modes"])
        for split in ("train", "eval"):
            if split in result["splits"] and result["splits"][split]["num_images"]:
                splits[split].append(result["splits"][split])
    return splits, modes


def _cut(shards: list[dict], cap: int | None) -> list[dict]:
    """The first `cap` images of a split's shards (the files keep the rest, unread)."""
    if cap is None:
        return shards
    kept, left = [], cap
    for shard in shards:
        if left <= 0:
            break
        kept.append({**shard, "num_images": min(shard["num_images"], left)})
        left -= kept[-1]["num_images"]
    return kept


def _statistics(store: ImageStore) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the split's pixels in [0, 1], streamed over blocks."""
    total = np.zeros(store.channels)
    squares = np.zeros(store.channels)
    count = 0
    for block in store.blocks():
        values = block.reshape(-1, store.channels).astype(np.float64) / 255.0
        total += values.sum(axis=0)
        squares += (values * values).sum(axis=0)
        count += len(values)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean * mean, 1e-12))
    return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]


def _three(values: list[float]) -> list[float]:
    return list(values) * 3 if len(values) == 1 else list(values)


def _normalisation(spec: JobSpec, index: int, train: ImageStore) -> tuple[list[float], list[float]]:
    """The spec's mean and std, else the start model's processor's, else measured on the training images;
    the start model's image size must be the stage's."""
    stage = spec.stages[index]
    origin = processor_origin(spec, stage)
    saved = atomic.read_json(origin / PROCESSOR_FILE) if origin is not None else None
    start = resolve_start(spec, stage).weights
    config = atomic.read_json(start / "config.json") if start is not None and start.is_dir() else None
    size = stage.image.size
    for where, value in ((origin, (saved or {}).get("crop_size")), (start, (config or {}).get("image_size"))):
        theirs = value.get("height") if isinstance(value, dict) else value
        if isinstance(theirs, int) and theirs != size:
            raise UserError(
                f"stages.{index}.image.size: {size}, but the model it starts from ({where}) takes {theirs}-pixel "
                f"images; set image.size: {theirs}"
            )
    if stage.image.mean is not None and stage.image.std is not None:
        return _three(stage.image.mean), _three(stage.image.std)
    if isinstance(saved, dict) and "image_mean" in saved and "image_std" in saved:
        mean, std = saved["image_mean"], saved["image_std"]
    else:
        mean, std = _statistics(train)
    return _three(stage.image.mean or mean), _three(stage.image.std or std)


def processor_config(size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """transformers' `CLIPImageProcessor` settings for inference to see what training saw: to RGB, shorter side
    to `size` (bilinear), centre crop, rescale to [0, 1], normalise. Written as its `preprocessor_config.json`
    (what `save_pretrained` writes; a test checks they agree) so that preparing needs neither torch nor
    transformers."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 2,  # PIL.Image.Resampling.BILINEAR, as `resize_crop` stores the images
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }


def save_processor(out: Path, size: int, mean: list[float], std: list[float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / PROCESSOR_FILE, processor_config(size, mean, std))


def _prepare_into(
    spec: JobSpec, index: int, sources: dict[str, list[ImageSource]], work: Path, run_jobs: ImageRunner
) -> Any:
    from launcher.data.prepare import PreparedStage

    stage, data = spec.stages[index], spec.stages[index].data
    field = f"stages.{index}.data"
    own_eval = "eval" in sources
    jobs = _plan(stage, sources["train"], "train" if own_eval else None, 0, work, spec.seed,
                 data.max_train_samples if own_eval else None)  # fmt: skip
    if own_eval:
        jobs += _plan(stage, sources["eval"], "eval", len(jobs), work, spec.seed, data.max_eval_samples)
    results = run_jobs(jobs)
    splits, modes = _assemble(results)
    splits = {
        "train": _cut(splits["train"], data.max_train_samples),
        "eval": _cut(splits["eval"], data.max_eval_samples),
    }
    processes = {result["process"] for result in results}
    print(f"{field}: {len(jobs)} task(s) in {len(processes)} process(es), {sum(modes.values())} images", flush=True)
    target = "L" if stage.image.channels == 1 else "RGB"
    converted = {mode: n for mode, n in modes.items() if mode != target}
    if converted:
        seen = ", ".join(f"{n} {mode}" for mode, n in sorted(converted.items()))
        print(f"{field}: converted {seen} image(s) to {target} (image.channels {stage.image.channels})", flush=True)
    if not splits["train"]:
        raise UserError(f"{field}.train: no training images (all of them fell into the eval split)")
    if not splits["eval"]:
        raise UserError(
            f"{field}.eval_fraction: {data.eval_fraction} leaves no eval images; raise it or name data.eval"
        )
    labelled = stage.task == "image_classification"
    meta = {"kind": "images", "size": stage.image.size, "channels": stage.image.channels, "labelled": labelled,
            "splits": splits}  # fmt: skip
    atomic.write_json(work / META_FILE, meta)
    train, evaluation = ImageStore.read(work, "train"), ImageStore.read(work, "eval")
    if labelled:
        for split, store in (("train", train), ("eval", evaluation)):
            values = store.labels
            assert values is not None
            if len(values) and int(values.max()) >= len(data.labels):
                raise UserError(
                    f"{field}.{split}: a label id {int(values.max())} has no name in data.labels ({len(data.labels)} "
                    "labels, ids from 0)"
                )
    mean, std = _normalisation(spec, index, train)
    save_processor(work / "tokenizer", stage.image.size, mean, std)
    atomic.write_json(work / META_FILE, {**meta, "mean": mean, "std": std})
    return PreparedStage(len(train), len(evaluation), len(train), 0)
