"""Tokenize and pack a stage's data once, streaming; later runs reuse it while the inputs are unchanged.

Run as: launcher prepare JOB.yaml   (`launcher run` calls it for stages not prepared yet)

The corpus is cut into chunks (`corpus.plan_chunks`); each chunk is one task that tokenizes it in
batches and writes its own shard (`shard_task`). Tasks run on this machine's cores (worker
processes), or as Ray Data tasks across the cluster when the command joined one; the shards and
their order are the same either way (image stages hand their tasks to the same runners). Memory
stays bounded by a batch per task, whatever the corpus size. The vocabulary, when trained, streams
over (a bounded sample of) the training documents.

Everything is written into a temporary folder next to `<stage>/data/` and renamed into place
last, with `meta.json` inside: a killed or failed prepare leaves the previous data or none, never
half of it. `meta.json`'s fingerprint covers the input files (path, size, mtime), the data and
tokenizer settings and the tokenizer the stage starts from.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from launcher import atomic
from launcher.data.corpus import CHUNK_BYTES, Chunk, Fields, plan_chunks, resolve_files
from launcher.data.shard_task import (
    ShardJob,
    caps_reached,
    ray_task,
    run_shard_job,
    split_documents,
    tokenizer_threads,
)
from launcher.data.store import META_FILE, BlockDataset, ShardInfo, TokenStore, block_prefix, token_dtype
from launcher.data.tokenizer import load_tokenizer, separator_id, train_tokenizer
from launcher.data.validation import VALIDATION_FILE, carve
from launcher.errors import UserError
from launcher.jobspec import layout
from launcher.jobspec.models import IMAGE_TASKS, JobSpec, StageSpec
from launcher.jobspec.start import resolve_start

META_VERSION = 3  # 3: sharded streams in the smallest dtype, documents split by a hash of their text
MIN_CHUNK_BYTES = 4 << 20

# Runs a stage's preparation tasks, text (`ShardJob`) or image (`ImageJob`) ones; results in the jobs' order.
JobRunner = Callable[[list[Any]], list[dict]]


class JsonJob(Protocol):
    """A task's job as Ray Data carries it: plain values, written with `to_json` (read back by its task)."""

    def to_json(self) -> str: ...


@dataclass(frozen=True)
class PreparedStage:
    """What a prepared stage holds; `num_train_samples` is blocks (pre-training) or documents."""

    num_train_samples: int
    num_eval_samples: int
    num_train_tokens: int
    vocab_size: int


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def fingerprint(spec: JobSpec, stage: StageSpec) -> str:
    index = spec.stages.index(stage)
    files = [
        path
        for i, source in enumerate(stage.data.train_sources())
        for path in resolve_files(source.path, source_field(stage, index, i))
    ]
    files += resolve_files(stage.data.eval, f"stages.{index}.data.eval")
    origin = resolve_start(spec, stage).tokenizer
    record = {
        "version": META_VERSION,
        "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "data": stage.data.model_dump(exclude={"document_mask", "group_by_length"}),  # used in training, not prepared
        "tokenizer": stage.tokenizer.model_dump(exclude={"source"}),
        "family": stage.model.family,
        "task": stage.task,
        "seed": spec.seed,
        "origin": None if origin is None else _file_digest(origin / "tokenizer.json"),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(spec: JobSpec, stage: StageSpec) -> dict | None:
    meta = atomic.read_json(layout.data_dir(spec, stage.name) / META_FILE, if_torn="the data is prepared again")
    return meta if isinstance(meta, dict) and "fingerprint" in meta else None


def _image_jobs(jobs: Sequence[Any]) -> bool:
    from launcher.data.image_prepare import ImageJob

    return bool(jobs) and isinstance(jobs[0], ImageJob)


def run_jobs_locally(jobs: list[Any]) -> list[dict]:
    """One job runs here with the tokenizer's threads; more run in worker processes, one per core.
    Image jobs: `image_prepare.run_image_jobs`."""
    if _image_jobs(jobs):
        from launcher.data.image_prepare import run_image_jobs

        return run_image_jobs(jobs)
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1 or any(job.limits for job in jobs):
        return list(_serial(jobs))
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fork would copy this process's tokenizer threads (and Ray's, when it runs).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        return list(pool.map(run_shard_job, jobs))


def _die_with_parent(parent: int) -> None:
    """A worker of a prepare that is killed (SIGKILL, OOM) ends too, instead of writing on unseen."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1  # from linux/prctl.h
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker ends when its task queue closes
        pass
    if os.getppid() != parent:  # the parent died while this worker was starting
        os._exit(1)


def _serial(jobs: list[ShardJob]) -> Iterator[dict]:
    """In order, in this process; caps on document counts carry from one chunk to the next."""
    remaining = dict(jobs[0].limits) if jobs else {}
    for job in jobs:
        if caps_reached(remaining, job.split):
            yield {"shard": job.shard, "path": job.chunk.path, "splits": {}, "skipped": True}  # caps reached
            continue
        result = run_shard_job(replace(job, limits=dict(remaining), threads=True))
        yield result
        if "error" in result:
            return
        for split, entry in result["splits"].items():
            if split in remaining:
                remaining[split] -= entry["num_docs"]


def run_jobs_on_ray(jobs: list[Any]) -> list[dict]:
    """One Ray Data task per chunk (text) or block of images, anywhere in the cluster; each writes its shard to
    the shared folder."""
    if _image_jobs(jobs):
        from launcher.data.image_prepare import ray_image_task

        return run_tasks_on_ray(jobs, ray_image_task)
    if any(job.limits for job in jobs):
        return run_jobs_locally(jobs)  # capped samples: a small, ordered read
    return run_tasks_on_ray(jobs, ray_task)


def run_tasks_on_ray(jobs: Sequence[JsonJob], task: Callable[[dict], dict]) -> list[dict]:
    """One Ray Data task per job: `task` maps a row {"job": job.to_json()} to {"result": its result as JSON};
    the results come back sorted by shard, as the jobs were."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.from_items([{"job": job.to_json()} for job in jobs], override_num_blocks=len(jobs))
    print(f"preparation: {len(jobs)} Ray Data task(s) on the cluster", flush=True)
    rows = dataset.map(task, num_cpus=1).take_all()
    return sorted((json.loads(row["result"]) for row in rows), key=lambda result: result["shard"])


def _chunk_bytes(files: list[Path]) -> int:
    """Chunks small enough that every core gets some work, large enough to amortise a task's start."""
    total = sum(path.stat().st_size for path in files)
    return max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, total // (2 * (os.cpu_count() or 1)) + 1))


def _train_texts(
    source_chunks: list[list[Chunk]],
    weights: list[float],
    fields: Fields,
    stage: StageSpec,
    seed: int,
    split: str | None,
) -> Iterator[str]:
    """Training documents for the vocabulary, in corpus order: each source up to its weight's share of the
    tokenizer's byte budget, all of them up to its document budget."""
    limit = min(x for x in (stage.tokenizer.max_train_docs, stage.data.max_train_samples, sys.maxsize) if x)
    count = 0
    for chunks, weight in zip(source_chunks, weights, strict=True):
        budget = stage.tokenizer.max_train_bytes * weight / sum(weights)
        for chunk in chunks:
            for name, text, _ in split_documents(chunk, fields, split, seed, stage.data.eval_fraction):
                if name != "train":
                    continue
                yield text
                count += 1
                budget -= len(text)
                if count >= limit:
                    return
                if budget <= 0:
                    break
            if budget <= 0:
                break


def _build_tokenizer(  # noqa: ANN202
    spec: JobSpec,
    index: int,
    source_chunks: list[list[Chunk]],
    weights: list[float],
    fields: Fields,
    split: str | None,
    out: Path,
):
    stage = spec.stages[index]
    start = resolve_start(spec, stage)
    origin = start.tokenizer
    if origin is None:
        texts = _train_texts(source_chunks, weights, fields, stage, spec.seed, split)
        with tokenizer_threads(True):
            return train_tokenizer(
                texts, stage.model.family, stage.tokenizer.vocab_size, stage.tokenizer.lowercase, out
            )
    tok = load_tokenizer(origin, start.tokenizer_field)
    tok.save_pretrained(str(out))
    return tok


def _assemble(results: list[dict], chunks: list[Chunk], field: str) -> dict[str, list[ShardInfo]]:
    """Shards per split in corpus order; files without text are named, a corpus without any is refused."""
    processes = sorted({result["process"] for result in results if "process" in result})
    hosts = {process.split(":")[0] for process in processes}
    print(f"{field}: {len(results)} task(s) in {len(processes)} process(es) on {len(hosts)} host(s)", flush=True)
    docs_per_file: dict[str, int] = {}
    splits: dict[str, list[ShardInfo]] = {"train": [], "eval": []}
    for result in results:
        if "error" in result:
            raise UserError(result["error"])
        if result.get("skipped"):
            continue
        docs_per_file[result["path"]] = docs_per_file.get(result["path"], 0)
        for split in ("train", "eval"):
            if split in result["splits"]:
                shard = ShardInfo(**result["splits"][split])
                docs_per_file[result["path"]] += shard.num_docs
                if shard.num_docs:
                    splits[split].append(shard)
    paths = list(dict.fromkeys(chunk.path for chunk in chunks))
    empty = [path for path in docs_per_file if docs_per_file[path] == 0]
    if len(empty) == len(paths):
        raise UserError(f"{field}: the corpus is empty (no non-blank text in {', '.join(paths)})")
    for path in empty:
        print(f"warning: {field}: {path} holds no non-blank text; skipped", file=sys.stderr, flush=True)
    return splits


def prepare_stage(spec: JobSpec, index: int, run_jobs: JobRunner = run_jobs_locally) -> PreparedStage:
    """Prepare one stage (earlier stages whose tokenizer it reuses must be prepared first)."""
    stage = spec.stages[index]
    if stage.task in IMAGE_TASKS:  # images: decoded, checked and stored as pixels (launcher.data.image_prepare)
        from launcher.data.image_prepare import prepare_images

        return prepare_images(spec, index, run_jobs)
    out = layout.data_dir(spec, stage.name)
    return into_place(out, fingerprint(spec, stage), read_meta(spec, stage),
                      lambda work: _prepare_into(spec, index, work, run_jobs))  # fmt: skip


def into_place(out: Path, key: str, meta: dict | None, build: Callable[[Path], PreparedStage]) -> PreparedStage:
    """A stage's prepared data in `out`: reused when its `meta` (the meta.json there) has fingerprint `key`, else
    `build(work)` writes it into a temporary folder beside `out`, the key goes into its meta.json, and the folder
    is renamed into place (the old data moved aside first, then removed). Temporary folders of a prepare that
    was killed are removed first."""
    for stale in out.parent.glob(".data-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if meta is not None and meta["fingerprint"] == key:
        return PreparedStage(**meta["prepared"])
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".data-", dir=out.parent)).resolve()
    try:
        prepared = build(work)
        meta = {"fingerprint": key, "prepared": prepared.__dict__, **atomic.read_json(work / META_FILE)}
        atomic.write_json(work / META_FILE, meta)
        if out.exists():
            old = out.with_name(f".data-old-{os.getpid()}")
            out.rename(old)
            shutil.rmtree(old)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return prepared


def _prepare_into(spec: JobSpec, index: int, work: Path, run_jobs: JobRunner) -> PreparedStage:
    stage, data = spec.stages[index], spec.stages[index].data
    tagged = stage.task == "token_classification"
    classify = stage.task == "classification" or tagged  # whole documents (sentences), not packed blocks
    field = f"stages.{index}.data"
    fields = Fields(
        text=data.text_field,
        label=data.label_field if stage.task == "classification" else None,
        labels=tuple(data.labels) if classify else (),
        max_document_bytes=data.max_document_bytes,
        tokens=data.tokens_field if tagged else None,
        tags=data.tags_field if tagged else None,
        label_all_subtokens=data.label_all_subtokens and tagged,
    )
    sources = data.train_sources()
    names = [source_field(stage, index, i) for i in range(len(sources))]
    source_files = [resolve_files(src.path, name) for src, name in zip(sources, names, strict=True)]
    eval_files = resolve_files(data.eval, f"{field}.eval")
    size = _chunk_bytes([p for files in source_files for p in files] + eval_files)
    source_chunks = [
        plan_chunks([p.resolve() for p in files], name, size) for files, name in zip(source_files, names, strict=True)
    ]
    eval_chunks = plan_chunks([p.resolve() for p in eval_files], f"{field}.eval", size)
    auto_split = None if not eval_chunks else "train"

    weights = [src.weight for src in sources]
    tok = _build_tokenizer(spec, index, source_chunks, weights, fields, auto_split, work / "tokenizer")
    dtype = token_dtype(len(tok)).name
    # Capped document counts: tasks then run in order and stop once every cap is reached.
    caps = {"train": data.max_train_samples, "eval": data.max_eval_samples}
    limits = {split: cap for split, cap in caps.items() if cap is not None}

    tokenizer_file = str(work / "tokenizer" / "tokenizer.json")
    separator = None if classify else separator_id(tok)

    def jobs_for(chunks: list[Chunk], split: str | None, first: int) -> list[ShardJob]:
        own = {s: n for s, n in limits.items() if split is None or s == split}
        return [
            ShardJob(
                chunk=chunk, shard=first + k, out_dir=str(work), tokenizer_file=tokenizer_file, fields=fields,
                pack=not classify, seq_len=data.seq_len, separator=separator, dtype=dtype, split=split,
                eval_fraction=data.eval_fraction, seed=spec.seed, limits=own,
            )
            for k, chunk in enumerate(chunks)
        ]  # fmt: skip

    # Every source's tasks run together (with caps: each source's in turn, capped on its own); results
    # come back in task order and are split by source again.
    train_chunks = [chunk for chunks in source_chunks for chunk in chunks]
    jobs = jobs_for(train_chunks, auto_split, 0)
    if limits:
        bounds = itertools.pairwise(np.cumsum([0] + [len(chunks) for chunks in source_chunks]))
        results = [result for a, b in bounds for result in run_jobs(jobs[a:b])]
    else:
        results = run_jobs(jobs)
    splits: dict[str, list[ShardInfo]] = {"train": [], "eval": []}
    layout_of_sources = []
    start = 0
    for chunks, name, weight in zip(source_chunks, names, weights, strict=True):
        part = _assemble(results[start : start + len(chunks)], chunks, name)
        start += len(chunks)
        splits["train"] += part["train"]
        splits["eval"] += part["eval"]
        layout_of_sources.append({"weight": weight, "num_shards": len(part["train"])})
        if not part["train"]:
            raise UserError(f"{name}: no training documents (all of them fell into the eval split)")
    if eval_chunks:
        results = run_jobs(jobs_for(eval_chunks, "eval", len(train_chunks)))
        splits["eval"] = _assemble(results, eval_chunks, f"{field}.eval")["eval"]
    elif not splits["eval"]:
        raise UserError(
            f"{field}.eval_fraction: {data.eval_fraction} leaves no eval documents; raise it or name data.eval files"
        )
    shard_lists = {split: [shard.__dict__ for shard in shards] for split, shards in splits.items()}
    atomic.write_json(work / META_FILE, {"dtype": dtype, "splits": shard_lists, "sources": layout_of_sources})
    train, evaluation = TokenStore.read(work, "train"), TokenStore.read(work, "eval")
    if classify and data.validation_fraction is not None:
        # The validation set is carved from the training documents; the eval split becomes the test set.
        labels = train.labels if stage.task == "classification" else None
        held = carve(train.num_docs, data.validation_fraction, spec.seed, labels, f"{field}.validation_fraction")
        np.save(work / VALIDATION_FILE, held)
        num_train, num_eval = train.num_docs - len(held), len(held)
    elif classify:
        num_train, num_eval = train.num_docs, evaluation.num_docs
    else:
        prefix = block_prefix(stage.task, tok)
        parts = [TokenStore.read(work, "train", source) for source in range(len(sources))]
        num_train = sum(len(BlockDataset(part, data.seq_len, prefix)) for part in parts)
        num_eval = len(BlockDataset(evaluation, data.seq_len, prefix))
    return PreparedStage(num_train, num_eval, train.num_tokens, len(tok))


def source_field(stage: StageSpec, index: int, source: int) -> str:
    """The spec field that names a training source's files, for messages."""
    if stage.data.sources:
        return f"stages.{index}.data.sources.{source}.path"
    return f"stages.{index}.data.train"


def prepare_job(
    spec: JobSpec, log: bool = True, only: str | None = None, run_jobs: JobRunner = run_jobs_locally
) -> dict[str, PreparedStage]:
    """Prepare every stage (or only the one named `only`) in order; bad data fails before any training."""
    prepared: dict[str, PreparedStage] = {}
    for index, stage in enumerate(spec.stages):
        if only is not None and stage.name != only:
            continue
        prepared[stage.name] = prepare_stage(spec, index, run_jobs)
        if log:
            info = prepared[stage.name]
            what = f"{info.num_train_tokens} train tokens, vocab {info.vocab_size}"
            if stage.task in IMAGE_TASKS:
                what = f"images of {stage.image.size}x{stage.image.size} pixels"
            print(
                f"data {stage.name}: {info.num_train_samples} train / {info.num_eval_samples} eval samples, {what}",
                flush=True,
            )
    return prepared
