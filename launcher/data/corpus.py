"""Read corpus files through `datasets`: txt (a document per line), jsonl/json, csv, parquet; globs.

Errors name the file (and the byte offset of bad UTF-8, the row of a bad label).
"""

from __future__ import annotations

import codecs
import glob
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError

_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst"}


@dataclass
class Documents:
    """Texts (and class ids for classification) in file order."""

    texts: list[str]
    labels: list[int] | None


def resolve_files(patterns: list[str], field: str) -> list[Path]:
    """Expand globs; a pattern that matches nothing or an unreadable file is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"{field}: {pattern!r} matches no file")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise UserError(f"{field}: {match}: no such file")
            try:
                with path.open("rb"):
                    pass
            except OSError as exc:
                raise UserError(f"{field}: {match}: cannot read ({exc.strerror})") from None
            files.append(path)
    return files


def file_format(path: Path, field: str) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise UserError(f"{field}: {path}: unknown file type (use .txt, .jsonl, .json, .csv or .parquet)")
    return fmt


def check_utf8(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Raise a UserError naming the byte offset of the first invalid UTF-8 sequence."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as stream:
        while chunk := stream.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: not valid UTF-8 at byte offset {offset + exc.start}") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid UTF-8 at byte offset {offset} (truncated sequence)") from None


def read_documents(
    patterns: list[str],
    field: str,
    text_field: str,
    label_field: str | None = None,
    labels: list[str] | None = None,
) -> Documents:
    """Load every file; empty texts are dropped; labels are mapped to ids in `labels` order."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    texts: list[str] = []
    label_ids: list[int] | None = [] if label_field else None
    label_index = {name: i for i, name in enumerate(labels or [])}
    for path in resolve_files(patterns, field):
        fmt = file_format(path, field)
        if fmt != "parquet" and path.suffix.lower() not in _COMPRESSION:
            check_utf8(path)
        try:
            table = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types; the user needs the file and the reason
            raise UserError(f"{path}: cannot load as {fmt}: {' '.join(str(exc).split())[:300]}") from None
        column = "text" if fmt == "text" else text_field
        if column not in table.column_names:
            raise UserError(f"{field}: {path}: no column {column!r} (columns: {', '.join(table.column_names)})")
        file_texts = table[column]
        file_labels = None
        if label_ids is not None:
            if label_field not in table.column_names:
                raise UserError(
                    f"{field}: {path}: no label column {label_field!r} (columns: {', '.join(table.column_names)})"
                )
            file_labels = table[label_field]
        for row, text in enumerate(file_texts):
            if text is None or not str(text).strip():
                continue
            texts.append(str(text))
            if label_ids is not None:
                value = "" if file_labels[row] is None else str(file_labels[row])
                if value not in label_index:
                    raise UserError(f"{path}: row {row + 1}: label {value!r} is not in data.labels {list(label_index)}")
                label_ids.append(label_index[value])
    if not texts:
        raise UserError(f"{field}: the corpus is empty (no non-blank {text_field!r} in {', '.join(patterns)})")
    return Documents(texts, label_ids)
