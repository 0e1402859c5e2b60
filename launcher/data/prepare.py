"""Tokenize and pack a stage's data once; later runs reuse it while the inputs are unchanged.

Run as: launcher prepare JOB.yaml   (`launcher run` calls it for stages not prepared yet)

Writes `<stage>/tokenizer/` and `<stage>/data/{train,eval}.*.npy` plus `data/meta.json`, whose
fingerprint covers the input files (path, size, mtime), the data and tokenizer settings and the
tokenizer it started from.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from launcher.data.corpus import Documents, read_documents, resolve_files
from launcher.data.store import BlockDataset, TokenStore, block_prefix, pack_stream
from launcher.data.tokenizer import load_tokenizer, separator_id, train_tokenizer
from launcher.errors import UserError
from launcher.spec import layout
from launcher.spec.models import JobSpec, StageSpec

META_VERSION = 2  # 2: mlm blocks start with [CLS]


@dataclass(frozen=True)
class PreparedStage:
    """What a prepared stage holds; `num_train_samples` is blocks (pre-training) or documents."""

    num_train_samples: int
    num_eval_samples: int
    num_train_tokens: int
    vocab_size: int


def _tokenizer_origin(spec: JobSpec, stage: StageSpec) -> Path | None:
    """The directory to copy the tokenizer from, or None to train one on this stage's corpus."""
    source = stage.tokenizer.source or stage.init_from
    names = [s.name for s in spec.stages]
    if source in names:
        return layout.tokenizer_dir(spec, source)
    if source is not None:
        return Path(source)
    if stage.model.path is not None:
        return Path(stage.model.path)
    return None


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def fingerprint(spec: JobSpec, stage: StageSpec) -> str:
    index = spec.stages.index(stage)
    files = resolve_files(stage.data.train, f"stages.{index}.data.train")
    files += resolve_files(stage.data.eval, f"stages.{index}.data.eval")
    origin = _tokenizer_origin(spec, stage)
    record = {
        "version": META_VERSION,
        "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "data": stage.data.model_dump(),
        "tokenizer": stage.tokenizer.model_dump(exclude={"source"}),
        "family": stage.model.family,
        "task": stage.task,
        "seed": spec.seed,
        "origin": None if origin is None else _file_digest(origin / "tokenizer.json"),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(spec: JobSpec, stage: StageSpec) -> dict | None:
    path = layout.data_dir(spec, stage.name) / "meta.json"
    return json.loads(path.read_text()) if path.exists() else None


def _split(docs: Documents, fraction: float, seed: int) -> tuple[Documents, Documents]:
    order = list(range(len(docs.texts)))
    random.Random(seed).shuffle(order)
    num_eval = max(1, round(fraction * len(order)))
    if num_eval >= len(order):
        raise UserError(f"data.eval_fraction: {fraction} leaves no training documents out of {len(order)}")

    def take(indices: list[int]) -> Documents:
        labels = None if docs.labels is None else [docs.labels[i] for i in indices]
        return Documents([docs.texts[i] for i in indices], labels)

    return take(sorted(order[num_eval:])), take(sorted(order[:num_eval]))


def _cap(docs: Documents, limit: int | None) -> Documents:
    if limit is None:
        return docs
    return Documents(docs.texts[:limit], None if docs.labels is None else docs.labels[:limit])


def prepare_stage(spec: JobSpec, index: int) -> PreparedStage:
    """Prepare one stage (earlier stages whose tokenizer it reuses must be prepared first)."""
    stage = spec.stages[index]
    out = layout.data_dir(spec, stage.name)
    key = fingerprint(spec, stage)
    meta = read_meta(spec, stage)
    if meta is not None and meta["fingerprint"] == key:
        return PreparedStage(**meta["prepared"])

    data = stage.data
    classify = stage.task == "classification"
    field = f"stages.{index}.data"
    label_args = {"label_field": data.label_field, "labels": data.labels} if classify else {}
    train = read_documents(data.train, f"{field}.train", data.text_field, **label_args)
    if data.eval:
        evaluation = read_documents(data.eval, f"{field}.eval", data.text_field, **label_args)
    else:
        train, evaluation = _split(train, data.eval_fraction, spec.seed)
    train, evaluation = _cap(train, data.max_train_samples), _cap(evaluation, data.max_eval_samples)

    tok_dir = layout.tokenizer_dir(spec, stage.name)
    origin = _tokenizer_origin(spec, stage)
    if origin is None:
        texts = train.texts[: stage.tokenizer.max_train_docs]
        tok = train_tokenizer(texts, stage.model.family, stage.tokenizer.vocab_size, stage.tokenizer.lowercase, tok_dir)
    else:
        tok = load_tokenizer(origin, f"stages.{index}.tokenizer.source")
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        tok.save_pretrained(str(tok_dir))

    shutil.rmtree(out, ignore_errors=True)
    if classify:
        for split, docs in (("train", train), ("eval", evaluation)):
            ids = tok(docs.texts, truncation=True, max_length=data.seq_len)["input_ids"]
            TokenStore.write(out, split, ids, docs.labels)
        num_train, num_eval = len(train.texts), len(evaluation.texts)
    else:
        sep = separator_id(tok)
        for split, docs in (("train", train), ("eval", evaluation)):
            ids = tok(docs.texts, add_special_tokens=False)["input_ids"]
            TokenStore.write(out, split, [pack_stream(ids, sep).tolist()], None)
        prefix = block_prefix(stage.task, tok)
        num_train = len(BlockDataset(TokenStore.read(out, "train"), data.seq_len, prefix))
        num_eval = len(BlockDataset(TokenStore.read(out, "eval"), data.seq_len, prefix))
    prepared = PreparedStage(
        num_train_samples=num_train,
        num_eval_samples=num_eval,
        num_train_tokens=len(TokenStore.read(out, "train").tokens),
        vocab_size=len(tok),
    )
    (out / "meta.json").write_text(json.dumps({"fingerprint": key, "prepared": prepared.__dict__}, indent=1))
    return prepared


def prepare_job(spec: JobSpec, log: bool = True, only: str | None = None) -> dict[str, PreparedStage]:
    """Prepare every stage (or only the one named `only`) in order; bad data fails before any training."""
    prepared: dict[str, PreparedStage] = {}
    for index, stage in enumerate(spec.stages):
        if only is not None and stage.name != only:
            continue
        prepared[stage.name] = prepare_stage(spec, index)
        if log:
            info = prepared[stage.name]
            print(
                f"data {stage.name}: {info.num_train_samples} train / {info.num_eval_samples} eval samples, "
                f"{info.num_train_tokens} train tokens, vocab {info.vocab_size}",
                flush=True,
            )
    return prepared
