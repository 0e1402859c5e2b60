"""Run as: .venv/bin/python benchmarks/image_prep.py   (options --workdir DIR --skip-folder)

Image preparation (`launcher prepare`) on all 70,000 Fashion-MNIST images (60,000 train + 10,000 test, Debian's
dataset-fashion-mnist, `make data`), in two layouts:
  idx     the IDX files as Debian ships them (gzip; the labels beside them);
  folder  the same images as 70,000 PNG files in an image folder (`<split>/<class>/<n>.png`, written once under
          --workdir and reused): each image decoded and checked with Pillow, as a folder of a user's photos is.
Each is `launcher prepare` of jobs/vision-mae.yaml's `vit-scratch` stage (labelled image_classification, 28x28,
1 channel, all training images) in a fresh output folder, in its own process. Printed per layout: wall seconds
(process start to exit, imports included), images per second over that wall time, and the peak RSS of the
process tree (the sum of its processes' RSS, sampled every 0.1 s; shared pages count in each process).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_prep import measure

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["tshirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FASHION / f"{split}-images-idx3-ubyte.gz") as stream:
        images = np.frombuffer(stream.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / f"{split}-labels-idx1-ubyte.gz") as stream:
        labels = np.frombuffer(stream.read(), dtype=np.uint8, offset=8)
    return images, labels


def write_folder(root: Path) -> None:
    """`root/{train,test}/<class>/<n>.png`, once (a marker file says it is complete)."""
    from PIL import Image

    if (root / "complete").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    for split, name in (("train", "train"), ("t10k", "test")):
        images, labels = read_split(split)
        for label in LABELS:
            (root / name / label).mkdir(parents=True, exist_ok=True)
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(pixels).save(root / name / LABELS[label] / f"{i:05d}.png")
    (root / "complete").touch()


def job_file(workdir: Path, train: str, test: str) -> Path:
    """jobs/vision-mae.yaml's vit-scratch stage alone, reading `train` and `test`, every training image."""
    job = yaml.safe_load((ROOT / "jobs" / "vision-mae.yaml").read_text())
    stage = next(s for s in job["stages"] if s["name"] == "vit-scratch")
    stage["data"] = {**stage["data"], "train": train, "eval": test}
    stage["data"].pop("max_train_samples", None)
    job["stages"] = [stage]
    path = workdir / f"image-prep-{abs(hash((train, test)))}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "launcher-image-prep")
    parser.add_argument("--skip-folder", action="store_true", help="time the IDX files only")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    layouts = {"idx": (str(FASHION / "train-images-idx3-ubyte.gz"), str(FASHION / "t10k-images-idx3-ubyte.gz"))}
    if not args.skip_folder:
        folder = args.workdir / "fashion-png"
        write_folder(folder)
        layouts["folder"] = (str(folder / "train"), str(folder / "test"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"{os.cpu_count()} cores; 70,000 images (60,000 train + 10,000 test), 28x28 grey")
    print(f"{'layout':<8} {'wall s':>8} {'images/s':>10} {'peak RSS MB':>12}")
    for name, (train, test) in layouts.items():
        out = args.workdir / f"runs-{name}"
        shutil.rmtree(out, ignore_errors=True)
        job = job_file(args.workdir, train, test)
        cmd = [sys.executable, "-m", "launcher", "prepare", str(job), f"output_dir={out}"]
        wall, peak_mb = measure(cmd, env, args.workdir / f"{name}.log")
        print(f"{name:<8} {wall:8.1f} {70_000 / wall:10.0f} {peak_mb:12.0f}", flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
