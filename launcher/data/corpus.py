"""Stream documents out of corpus files: txt (a document per line), jsonl/json (an object per line),
csv, parquet; each optionally compressed (.gz, .bz2, .xz, .zst). Nothing holds a whole file.

A large uncompressed line file is cut into byte ranges (`Chunk`s) that separate tasks read in
parallel: a range owns every line that *starts* inside it. Compressed files and csv are one chunk
each (no seeking into them), parquet one chunk per group of row groups.

Errors name the file and the place: the line (and byte offset) of bad JSON, a missing field or
bad UTF-8; the byte offset counts the decompressed text for compressed files.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import io
import json
import lzma
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from launcher.errors import UserError

_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".conll": "conll",  # token_classification: a word per line, its tag last, sentences split by blank lines
}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst"}
CHUNK_BYTES = 64 << 20  # one parallel task reads about this much uncompressed line text


@dataclass(frozen=True)
class Chunk:
    """A piece of one file that one task reads: bytes [start, end) of a line file, or row groups
    [start, end) of a parquet file; end -1 means to the end of the file."""

    path: str
    fmt: str
    start: int = 0
    end: int = -1


@dataclass(frozen=True)
class Fields:
    """Which columns to read and how to check them (classification reads labels too; token_classification
    reads word and tag lists instead of a text, `tags` set)."""

    text: str = "text"
    label: str | None = None
    labels: tuple[str, ...] = ()
    max_document_bytes: int = 16 << 20
    tokens: str | None = None
    tags: str | None = None
    label_all_subtokens: bool = False


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


def compression(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return suffix if suffix in _COMPRESSION else None


def file_format(path: Path, field: str) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise UserError(f"{field}: {path}: unknown file type (use .txt, .jsonl, .json, .csv, .parquet or .conll)")
    return fmt


def plan_chunks(files: list[Path], field: str, chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Cut the files into the pieces that tasks read, in corpus order."""
    chunks: list[Chunk] = []
    for path in files:
        fmt = file_format(path, field)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as exc:  # pyarrow raises several types for a file that is not parquet
                raise UserError(
                    f"{field}: {path}: cannot read as parquet: {' '.join(str(exc).split())[:200]}"
                ) from None
            start, size = 0, 0
            for group in range(meta.num_row_groups):
                size += meta.row_group(group).total_byte_size
                if size >= chunk_bytes or group == meta.num_row_groups - 1:
                    chunks.append(Chunk(str(path), fmt, start, group + 1))
                    start, size = group + 1, 0
            continue
        size = path.stat().st_size
        if fmt in ("csv", "conll") or compression(path) is not None or size <= chunk_bytes:
            chunks.append(Chunk(str(path), fmt))
            continue
        for start in range(0, size, chunk_bytes):
            chunks.append(Chunk(str(path), fmt, start, min(start + chunk_bytes, size)))
    return chunks


def _open_binary(path: Path) -> IO[bytes]:
    kind = compression(path)
    if kind == ".gz":
        return gzip.open(path, "rb")
    if kind == ".bz2":
        return bz2.open(path, "rb")
    if kind == ".xz":
        return lzma.open(path, "rb")
    if kind == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return path.open("rb")


def _where(path: Path, line: int | None, offset: int) -> str:
    of = " of the decompressed text" if compression(path) else ""
    return (
        f"{path}: line {line} (byte offset {offset}{of})" if line is not None else f"{path}: byte offset {offset}{of}"
    )


def _line_number(path: Path, offset: int) -> int | None:
    """The 1-based line holding `offset` (only computed for an error, by counting newlines)."""
    if compression(path) is not None:
        return None
    count = 0
    with path.open("rb") as stream:
        while offset > 0:
            block = stream.read(min(offset, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count + 1


def _lines(chunk: Chunk, limit: int) -> Iterator[tuple[int, int | None, bytes]]:
    """(byte offset, line number when known, line without its newline) of every line the chunk owns."""
    path = Path(chunk.path)
    with _open_binary(path) as stream:
        position, number = chunk.start, 1 if chunk.start == 0 else None
        if chunk.start > 0:  # the line running into the range belongs to the previous chunk
            stream.seek(chunk.start - 1)
            if stream.read(1) != b"\n":
                while True:
                    rest = stream.readline(1 << 20)
                    position += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
        while chunk.end < 0 or position < chunk.end:
            line = stream.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                where = _where(path, number or _line_number(path, position), position)
                raise UserError(
                    f"{where}: a document longer than {limit} bytes; split it into lines or raise "
                    "data.max_document_bytes"
                )
            yield position, number, line.rstrip(b"\r\n") if line.endswith(b"\n") else line
            position += len(line)
            if number is not None:
                number += 1


def _decode(path: Path, raw: bytes, offset: int, number: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = offset + exc.start
        raise UserError(f"{_where(path, number or _line_number(path, bad), bad)}: not valid UTF-8") from None


def _label_id(value: object, fields: Fields, where: Callable[[], str]) -> int:
    """The class id of a label; `where` names the place, computed only for an error."""
    name = "" if value is None else str(value)
    if name not in fields.labels:
        raise UserError(f"{where()}: label {name!r} is not in data.labels {list(fields.labels)}")
    return fields.labels.index(name)


def iter_documents(chunk: Chunk, fields: Fields) -> Iterator[tuple[str, int | None]]:
    """(text, label id or None) of every non-blank document in the chunk, in order."""
    path = Path(chunk.path)
    if chunk.fmt == "conll":
        raise UserError(f"{path}: CoNLL column files are read by task token_classification only")
    if chunk.fmt == "parquet":
        yield from _parquet_documents(chunk, fields)
    elif chunk.fmt == "csv":
        yield from _csv_documents(path, fields)
    else:
        for offset, number, raw in _lines(chunk, fields.max_document_bytes):
            if chunk.fmt == "text":
                text = _decode(path, raw, offset, number)
                if text.strip():
                    yield text, None
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError:
                _decode(path, raw, offset, number)
                raise
            except ValueError as exc:
                place = _where(path, number or _line_number(path, offset), offset)
                raise UserError(f"{place}: not a JSON object ({exc.args[0][:100]})") from None

            def where(offset: int = offset, number: int | None = number) -> str:
                return _where(path, number or _line_number(path, offset), offset)

            if not isinstance(record, dict) or fields.text not in record:
                raise UserError(f"{where()}: no field {fields.text!r} (data.text_field)")
            text = record[fields.text]
            if text is None or not str(text).strip():
                continue
            label = None
            if fields.label is not None:
                if fields.label not in record:
                    raise UserError(f"{where()}: no field {fields.label!r} (data.label_field)")
                label = _label_id(record[fields.label], fields, where)
            yield str(text), label


def check_text(stream: IO[bytes], path: Path, max_line_bytes: int) -> None:
    """Raise a UserError naming the place of the first invalid UTF-8 sequence or over-long line.

    Reads blocks no larger than `max_line_bytes`, so only a line running across blocks can be longer
    than that, and the count of bytes since the last newline catches it.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = since_newline = 0
    while block := stream.read(min(1 << 20, max_line_bytes)):
        try:
            decoder.decode(block)
        except UnicodeDecodeError as exc:
            bad = offset + exc.start
            raise UserError(f"{_where(path, _line_number(path, bad), bad)}: not valid UTF-8") from None
        first = block.find(b"\n")
        if since_newline + (len(block) if first < 0 else first) > max_line_bytes:
            start = offset - since_newline
            raise UserError(
                f"{_where(path, _line_number(path, start), start)}: a line longer than {max_line_bytes} bytes; "
                "raise data.max_document_bytes"
            )
        since_newline = since_newline + len(block) if first < 0 else len(block) - block.rfind(b"\n") - 1
        offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{_where(path, None, offset)}: not valid UTF-8 (truncated sequence)") from None


def _csv_documents(path: Path, fields: Fields) -> Iterator[tuple[str, int | None]]:
    with _open_binary(path) as stream:
        # The csv module can say neither where bad bytes are nor stop a huge line; a first pass can.
        check_text(stream, path, fields.max_document_bytes)
    csv.field_size_limit(fields.max_document_bytes)
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8", newline="") as text_stream:
        reader = csv.DictReader(text_stream)
        columns = reader.fieldnames or []
        for name, what in ((fields.text, "text_field"), (fields.label, "label_field")):
            if name is not None and name not in columns:
                raise UserError(f"{path}: no column {name!r} (data.{what}; columns: {', '.join(columns)})")
        try:
            for row in reader:
                text = row.get(fields.text)
                if text is None or not text.strip():
                    continue
                label = None
                if fields.label is not None:
                    label = _label_id(row.get(fields.label), fields, lambda: f"{path}: line {reader.line_num}")
                yield text, label
        except csv.Error as exc:
            raise UserError(f"{path}: line {reader.line_num}: {exc}") from None


def _parquet_documents(chunk: Chunk, fields: Fields) -> Iterator[tuple[str, int | None]]:
    import pyarrow.parquet as pq

    source = pq.ParquetFile(chunk.path)
    columns = source.schema_arrow.names
    for name, what in ((fields.text, "text_field"), (fields.label, "label_field")):
        if name is not None and name not in columns:
            raise UserError(f"{chunk.path}: no column {name!r} (data.{what}; columns: {', '.join(columns)})")
    wanted = [fields.text] if fields.label is None else [fields.text, fields.label]
    row = 0
    groups = list(range(chunk.start, chunk.end if chunk.end >= 0 else source.metadata.num_row_groups))
    for batch in source.iter_batches(batch_size=4096, row_groups=groups, columns=wanted):
        texts = batch.column(0).to_pylist()
        labels = batch.column(1).to_pylist() if fields.label is not None else [None] * len(texts)
        for text, value in zip(texts, labels, strict=True):
            row += 1
            if text is None or not str(text).strip():
                continue
            label = None
            if fields.label is not None:
                label = _label_id(value, fields, lambda row=row: f"{chunk.path}: row group {chunk.start}+, row {row}")
            yield str(text), label
