"""Streaming reads and atomic writes of the table formats `launcher predict` takes: jsonl, csv, parquet.

Memory stays bounded by the chunk size whatever the file's size; an output file is written to a
`.partial` name and renamed when complete, so nothing half-written is left under its real name.
An image-classification export also takes image files themselves (a folder, searched recursively, or a
glob of png, jpg, ... files): they are read as one table of their paths (`image_files`, `path_chunks`),
whose predictions go to one `predictions.jsonl` with a `path` column.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher.errors import UserError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
PATH_COLUMN = "path"  # image files given directly: the column of their paths (as found from --input)
IMAGE_LIST_OUTPUT = "predictions.jsonl"  # ... and the one output table their predictions go to


def table_format(path: Path) -> str:
    """json, csv or parquet, from the file name (a `.gz`/`.bz2`/`.xz`/`.zst` suffix after it is read through)."""
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    kind = FORMATS.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise UserError(f"--input: {path}: not a jsonl, csv or parquet file")
    return kind


def expand_inputs(pattern: str) -> list[Path]:
    """The files a path or glob names, sorted; a user error when none."""
    paths = sorted(Path(p) for p in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
    files = [p for p in paths if p.is_file()]
    if not files:
        raise UserError(f"--input: {pattern}: no such file")
    for path in files:
        table_format(path)
    return files


def image_files(pattern: str) -> list[Path] | None:
    """The image files a folder (searched recursively), a glob or a file names, sorted; None when it names
    tables (or nothing: `expand_inputs` says so). A glob that mixes images and other files is a user error."""
    from launcher.data.images import IMAGE_SUFFIXES

    def is_image(path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES

    if Path(pattern).is_dir():
        files = sorted(p for p in Path(pattern).rglob("*") if is_image(p))
        if not files:
            raise UserError(f"--input: {pattern}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    paths = sorted(Path(p) for p in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
    files = [p for p in paths if p.is_file()]
    images = [p for p in files if is_image(p)]
    if not images:
        return None
    if len(images) < len(files):
        other = next(p for p in files if not is_image(p))
        raise UserError(f"--input: {pattern}: names image files and {other}; give images or tables, not both")
    return images


def path_chunks(files: list[Path], rows: int) -> Iterator[tuple[int, Any]]:
    """`read_chunks` for image files given directly: (first row number, DataFrame of a `path` column)."""
    import pandas as pd

    for start in range(0, len(files), rows):
        yield start, pd.DataFrame({PATH_COLUMN: [str(p) for p in files[start : start + rows]]})


def read_chunks(path: Path, rows: int) -> Iterator[tuple[int, Any]]:
    """(first row number, pandas DataFrame) of at most `rows` rows each, in file order."""
    import pandas as pd

    kind = table_format(path)
    start = 0
    if kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            frame = batch.to_pandas()
            yield start, frame
            start += len(frame)
        return
    reader = (
        pd.read_json(path, lines=True, chunksize=rows, dtype=False)
        if kind == "json"
        else pd.read_csv(path, chunksize=rows, keep_default_na=False, na_values=[])
    )
    with reader:
        for frame in reader:
            yield start, frame
            start += len(frame)


def line_of(kind: str, row: int) -> int:
    """The 1-based line of data row `row` (0-based) in a jsonl or csv file (csv has a header line)."""
    return row + (2 if kind == "csv" else 1)


class TableWriter:
    """Appends DataFrames to `path` in the format of its name; `close()` renames the `.partial` file into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kind = table_format(path)
        self.partial = path.with_name(path.name + ".partial")
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.partial.unlink(missing_ok=True)
        self._parquet: Any = None
        self._header = True

    def write(self, frame: Any) -> None:
        if self.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.partial, table.schema)
            self._parquet.write_table(table)
        elif self.kind == "csv":
            frame.to_csv(self.partial, mode="a", header=self._header, index=False)
        else:
            with self.partial.open("a") as stream:
                frame.to_json(stream, orient="records", lines=True, force_ascii=False)
        self._header = False

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        self.partial.touch()
        self.partial.replace(self.path)

    def abort(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        self.partial.unlink(missing_ok=True)
