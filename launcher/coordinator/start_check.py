"""Check, on the driver, the model a stage starts from, before any of its workers start.

An `init_from` export (or `model.path`) whose weights are truncated, whose embeddings are smaller
than the stage's vocabulary, whose learned positions are fewer than `seq_len`, or which is a
classifier of another label count fails inside every worker with a traceback. Read here with the
standard library only (the header of a safetensors file says how long its data must be), each is
one message naming the field, exit 2, and nothing of the run is written yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.errors import UserError
from launcher.jobspec import layout
from launcher.jobspec.models import JobSpec
from launcher.jobspec.start import resolve_start

# The head a labelled task's export carries (its `architectures` entry ends so); its label count must match.
_HEADS = {
    "classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
    "image_classification": "ForImageClassification",
}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (None: its size is what its header describes)."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            return f"{path.name} is truncated (its header is incomplete)"
        try:
            header = json.loads(stream.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{path.name} has an unreadable header"
    if 8 + length + end != size:
        return f"{path.name} holds {size} bytes where its header describes {8 + length + end} (truncated or padded)"
    return None


def _weights_problem(folder: Path) -> str | None:
    if (folder / "model.safetensors").is_file():
        return safetensors_problem(folder / "model.safetensors")
    index = atomic.read_json(folder / "model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        for name in sorted(set(index["weight_map"].values())):
            if not (folder / name).is_file():
                return f"{name} (listed in model.safetensors.index.json) is missing"
            if (problem := safetensors_problem(folder / name)) is not None:
                return problem
        return None
    if (folder / "pytorch_model.bin").is_file():
        return None
    return f"holds no weights (none of {', '.join(_WEIGHTS)})"


def _vocabulary(tokenizer_json: Path) -> dict[str, int] | None:
    data = atomic.read_json(tokenizer_json)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return None
    vocab = data["model"].get("vocab")
    return vocab if isinstance(vocab, dict) else None


def check_start(spec: JobSpec, index: int, vocab_size: int) -> None:
    """Refuse (UserError) a start model that the stage cannot load or would train on wrongly.

    `vocab_size`: the size of the vocabulary the stage's data was tokenized with.
    """
    stage = spec.stages[index]
    start = resolve_start(spec, stage)
    if start.weights is None:
        return
    folder, field = start.weights, start.field
    config: Any = atomic.read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise UserError(f"{field}: {folder / 'config.json'} is missing or unreadable")
    if stage.task == "rtd" and config.get("model_type") != "electra":
        raise UserError(
            f"{field}: the model in {folder} is a {config.get('model_type')} model; task rtd continues an ELECTRA "
            "discriminator (an rtd export); continue other encoders with task mlm"
        )
    problem = _weights_problem(folder)
    if problem is not None:
        raise UserError(f"{field}: {folder}{' ' if problem.startswith('holds') else ': '}{problem}")
    embeddings = config.get("vocab_size")
    if isinstance(embeddings, int) and vocab_size > embeddings:
        raise UserError(
            f"stages.{index}.tokenizer.source: its vocabulary has {vocab_size} tokens, the model in {folder} embeds "
            f"{embeddings}; use that model's own tokenizer (leave tokenizer.source unset)"
        )
    if stage.tokenizer.source is not None and (folder / "tokenizer.json").is_file():
        ours, theirs = (_vocabulary(d / "tokenizer.json") for d in (layout.tokenizer_dir(spec, stage.name), folder))
        if ours is not None and theirs is not None and ours != theirs:
            raise UserError(
                f"stages.{index}.tokenizer.source: {stage.tokenizer.source} is not the vocabulary the model in "
                f"{folder} was trained with; leave tokenizer.source unset to use that model's own"
            )
    positions = None if config.get("model_type") == "llama" else config.get("max_position_embeddings")
    positions = positions or config.get("n_positions")
    if isinstance(positions, int) and stage.data.seq_len > positions:
        raise UserError(
            f"stages.{index}.data.seq_len: {stage.data.seq_len} exceeds the {positions} positions of the model in "
            f"{folder}; set data.seq_len to at most {positions}"
        )
    architectures = config.get("architectures") or []
    labels = config.get("id2label") or {}
    head = _HEADS.get(stage.task)
    classifier = head is not None and any(str(name).endswith(head) for name in architectures)
    if classifier and labels and len(labels) != len(stage.data.labels):
        raise UserError(
            f"stages.{index}.data.labels: {len(stage.data.labels)} labels, but the model in {folder} is a classifier "
            f"of {len(labels)} ({', '.join(str(v) for v in labels.values())}); start from a model without a "
            "classification head (e.g. the pre-training export) or keep its labels"
        )
