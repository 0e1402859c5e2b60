"""Images (tasks image_classification and mae): read the inputs, check them, and the prepared store.

Two input layouts, the conventions of torchvision's `ImageFolder` / HF's `imagefolder` and of MNIST:
  - an image folder: `root/<class>/<file>` (png, jpg, ...; any depth below the class folder), the class
    folder's name being a label of `data.labels`; task mae reads every image under `root`, unlabelled;
  - IDX array files (`*-images-idx3-ubyte[.gz]`, LeCun's MNIST format, as Fashion-MNIST ships): N
    grey images of rows x columns bytes; the labels are the `*-labels-idx1-ubyte[.gz]` file beside it.

Every image is stored as `image.size` x `image.size` uint8 pixels with `image.channels` channels: its
shorter side resized to the size (bilinear), the centre cropped, what `CLIPImageProcessor` does with
`shortest_edge` and `crop_size` (the processor saved with the export, so inference sees the same
pixels). Checks, each a one-line `UserError` naming the file: an unreadable or truncated image, an
image smaller than the size, an image folder with one class, a class folder outside `data.labels`, an
IDX file that is not one or ends early, a label outside `data.labels`.

The store (`<split>.<k>.images.bin`: N x size x size x channels bytes, `<split>.<k>.labels.npy`) is
read through memory maps: a sample costs its own pixels, whatever the number of images.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from launcher.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IDX_IMAGES, IDX_LABELS = "-images-idx3-ubyte", "-labels-idx1-ubyte"
MODES = {1: "L", 3: "RGB"}  # image.channels -> the PIL mode stored
META_FILE = "meta.json"


# --- inputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """One input: an image folder (its files and their class ids) or an IDX images file (its record count)."""

    path: str
    kind: str  # "folder" or "idx"
    files: tuple[str, ...] = ()  # folder: image files, in order
    labels: tuple[int, ...] = ()  # folder: a class id per file (empty when unlabelled)
    num_images: int = 0
    labels_path: str | None = None  # idx: the labels file (None when unlabelled)

    def __len__(self) -> int:
        return len(self.files) if self.kind == "folder" else self.num_images


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def idx_header(path: Path, rank: int) -> tuple[tuple[int, ...], int]:
    """(dimensions, header bytes) of an IDX file of unsigned bytes with `rank` dimensions (3: images, 1: labels)."""
    try:
        with _open(path) as stream:
            head = stream.read(4 + 4 * rank)
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: unreadable IDX file ({exc})") from None
    if len(head) < 4 + 4 * rank or head[:2] != b"\0\0" or head[2] != 0x08 or head[3] != rank:
        what = "images (0x00000803)" if rank == 3 else "labels (0x00000801)"
        raise UserError(f"{path}: not an IDX file of unsigned-byte {what}: its header is {head[:4].hex()}")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    return dims, len(head)


class IdxReader:
    """Records of an IDX file read in order from `start` (one open stream: a .gz file decompresses once)."""

    def __init__(self, path: Path, rank: int, start: int) -> None:
        self.path, self.rank = path, rank
        self.dims, header = idx_header(path, rank)
        self.record = int(np.prod(self.dims[1:], dtype=np.int64)) if rank > 1 else 1
        self.position = start
        self.stream = _open(path)
        try:
            self.stream.seek(header + start * self.record)
        except (OSError, EOFError) as exc:
            raise UserError(f"{path}: unreadable IDX file ({exc})") from None

    def read(self, count: int) -> np.ndarray:
        """The next `count` records (uint8, one row each); a file that ends early is an error."""
        try:
            data = self.stream.read(count * self.record)
        except (OSError, EOFError) as exc:
            raise UserError(f"{self.path}: unreadable IDX file ({exc})") from None
        if len(data) != count * self.record:
            held = self.position + len(data) // self.record
            raise UserError(
                f"{self.path}: truncated: its header announces {self.dims[0]} records, the file holds {held}"
            )
        self.position += count
        return np.frombuffer(data, dtype=np.uint8).reshape((count, *self.dims[1:]))

    def close(self) -> None:
        self.stream.close()


def _image_files(folder: Path) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        found += [os.path.join(directory, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def list_source(path: Path, labels: list[str], labelled: bool, field: str) -> ImageSource:
    """An input of `field`: an image folder (by class when `labelled`) or an IDX images file, checked."""
    if path.is_dir():
        if not labelled:
            files = _image_files(path)
            if not files:
                raise UserError(f"{field}: {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            return ImageSource(str(path), "folder", tuple(files))
        classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        if len(classes) < 2:
            found = f"one class folder ({classes[0]!r})" if classes else "no class folder"
            raise UserError(
                f"{path}: holds {found}; image_classification reads a folder per class (root/<class>/<image>)"
            )
        index = {name: i for i, name in enumerate(labels)}
        files, ids = [], []
        for name in classes:
            if name not in index:
                raise UserError(f"{path / name}: class folder {name!r} is not in data.labels {labels}")
            members = _image_files(path / name)
            files += members
            ids += [index[name]] * len(members)
        if not files:
            raise UserError(f"{field}: {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        return ImageSource(str(path), "folder", tuple(files), tuple(ids))
    if IDX_IMAGES in path.name:
        dims, _ = idx_header(path, 3)
        labels_path = path.with_name(path.name.replace(IDX_IMAGES, IDX_LABELS))
        if not labelled:
            return ImageSource(str(path), "idx", num_images=dims[0])
        if not labels_path.is_file():
            raise UserError(f"{field}: {path} has no labels file beside it ({labels_path.name})")
        (count,), _ = idx_header(labels_path, 1)
        if count != dims[0]:
            raise UserError(f"{labels_path}: {count} labels for the {dims[0]} images of {path.name}")
        return ImageSource(str(path), "idx", num_images=dims[0], labels_path=str(labels_path))
    raise UserError(
        f"{field}: {path} is neither an image folder nor an IDX images file (*{IDX_IMAGES}, optionally .gz)"
    )


def resolve_sources(patterns: list[str], labels: list[str], labelled: bool, field: str) -> list[ImageSource]:
    import glob

    sources = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not Path(matches[0]).exists():
            raise UserError(f"{field}: {pattern!r} matches no folder or file")
        sources += [list_source(Path(match), labels, labelled, field) for match in matches]
    return sources


def source_files(source: ImageSource) -> list[str]:
    """Every file an input reads (for the fingerprint)."""
    if source.kind == "folder":
        return list(source.files)
    return [source.path] + ([source.labels_path] if source.labels_path else [])


# --- one image ---------------------------------------------------------------------------------------------------


def resize_crop(image: Any, size: int) -> Any:
    """The shorter side resized to `size` (bilinear), then the centre `size` x `size` (CLIPImageProcessor's
    `shortest_edge` resize and centre crop)."""
    from PIL import Image

    width, height = image.size
    if (width, height) != (size, size):
        short, long = min(width, height), max(width, height)
        other = int(size * long / short)
        target = (size, other) if width <= height else (other, size)
        image = image.resize(target, Image.Resampling.BILINEAR)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def load_image(path: str, size: int, channels: int) -> tuple[np.ndarray, str]:
    """(size x size x channels uint8 pixels, the file's own mode); unreadable, truncated or small files refused."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here
            mode, (width, height) = image.mode, image.size
            if min(width, height) < size:
                raise UserError(
                    f"{path}: {width}x{height} pixels is smaller than image.size {size} (the crop the model sees); "
                    "lower image.size or drop the image"
                )
            converted = image if mode == MODES[channels] else image.convert(MODES[channels])
            pixels = np.asarray(resize_crop(converted, size), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: unreadable image ({' '.join(str(exc).split())[:160]})") from None
    return pixels.reshape(size, size, channels), mode


def from_grey_array(pixels: np.ndarray, size: int, channels: int) -> np.ndarray:
    """IDX records (N x rows x cols grey) as N x size x size x channels."""
    _, rows, cols = pixels.shape
    assert min(rows, cols) >= size, "small IDX images are refused when the jobs are planned"
    if (rows, cols) != (size, size):
        from PIL import Image

        pixels = np.stack([np.asarray(resize_crop(Image.fromarray(p), size)) for p in pixels])
    pixels = pixels[..., None]
    return np.repeat(pixels, channels, axis=-1) if channels != 1 else pixels


# --- the prepared store ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageShard:
    name: str
    num_images: int


class ImageStore:
    """A split (train or eval) as prepared: its shards' pixels and labels, memory-mapped."""

    def __init__(self, directory: Path, shards: list[ImageShard], size: int, channels: int, labelled: bool) -> None:
        self.directory, self.shards, self.size, self.channels = directory, shards, size, channels
        self.labelled = labelled
        self.starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.num_images for s in shards], out=self.starts[1:])
        self._pixels: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}

    @classmethod
    def read(cls, directory: Path, split: str) -> ImageStore:
        meta = json.loads((directory / META_FILE).read_text())
        shards = [ImageShard(**entry) for entry in meta["splits"][split]]
        return cls(directory, shards, meta["size"], meta["channels"], meta["labelled"])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_pixels(self, k: int) -> np.ndarray:
        if k not in self._pixels:
            shard, side = self.shards[k], self.size
            self._pixels[k] = np.memmap(
                self.directory / f"{shard.name}.images.bin", dtype=np.uint8, mode="r",
                shape=(shard.num_images, side, side, self.channels),
            )  # fmt: skip
        return self._pixels[k]

    def _shard_labels(self, k: int) -> np.ndarray:
        if k not in self._labels:
            self._labels[k] = np.load(self.directory / f"{self.shards[k].name}.labels.npy", mmap_mode="r")
        return self._labels[k]

    def _locate(self, index: int) -> tuple[int, int]:
        assert 0 <= index < len(self), f"image {index} out of range"
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return k, index - int(self.starts[k])

    def pixels(self, index: int) -> np.ndarray:
        k, local = self._locate(index)
        return self.shard_pixels(k)[local]

    def label(self, index: int) -> int:
        k, local = self._locate(index)
        return int(self._shard_labels(k)[local])

    @property
    def labels(self) -> np.ndarray | None:
        """Every label of the split, or None when unlabelled (mae)."""
        if not self.labelled:
            return None
        parts = [np.asarray(self._shard_labels(k)[: s.num_images]) for k, s in enumerate(self.shards)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def blocks(self, rows: int = 4096) -> Iterator[np.ndarray]:
        """The split's pixels in blocks of at most `rows` images (bounded memory)."""
        for k, shard in enumerate(self.shards):
            pixels = self.shard_pixels(k)
            for start in range(0, shard.num_images, rows):
                yield pixels[start : min(start + rows, shard.num_images)]


class ImageDataset:
    """A sample is one image's pixels (and its label when labelled), its index, and `augment`: whether it is of
    the training split."""

    def __init__(self, store: ImageStore, augment: bool) -> None:
        self.store, self.augment = store, augment

    def __len__(self) -> int:
        return len(self.store)

    def for_epoch(self, epoch: int) -> ImageDataset:
        return self

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {"pixels": self.store.pixels(index), "augment": self.augment, "index": index}
        if self.store.labelled:
            sample["label"] = self.store.label(index)
        return sample
