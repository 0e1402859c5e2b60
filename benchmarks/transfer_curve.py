"""Label-efficiency curve: test accuracy against the number of labeled reviews (or images), one line per start.

Run as: .venv/bin/python benchmarks/transfer_curve.py [--sizes 250,500,1000,2000,5000,all] [--seeds 0,1,2]
            [--starts random,demo,minilm] [--lr 1e-3,minilm=2e-4] [--cache runs/transfer] [--split test|validation]
            [--choose-lr 2e-4,1e-3,3e-3 [--choose-at 2000]] [--plot-only]
    or: .venv/bin/python benchmarks/transfer_curve.py --images [--sizes 500,1000,5000,all] [--starts mae,vit,resnet]
            (the same flags; cache runs/vision-curve)

Every point is `launcher run benchmarks/transfer-finetune.yaml --local` with overrides (no side path):
the same recipe for every start and size (3 epochs of the first N labeled reviews, at least
--min-steps optimizer steps so that small sets get enough updates), scored on the 2,000 held-out
test reviews, or with `--split validation` on 10% carved from the labeled training reviews (to choose
settings without looking at the test set). The learning rate is the one setting chosen per start (on
the validation split): `--lr RATE[,START=RATE...]`, or `--choose-lr RATES`: per start, one `launcher sweep`
(Ray Tune) of the rates x the seeds at `--choose-at` labels on the validation split, the best mean accuracy
chosen. Starting points, each made once through `launcher run`:
  random        the demo's small BERT from random initialisation (the demo's tokenizer: only weights differ)
  demo          the demo's pre-training export (`jobs/demo.yaml --stage pretrain --local`, ~4 min): masked LM
                from co-occurrence embeddings (`embedding_init.method: cooccurrence`), as jobs/transfer.yaml's
  demo-4x       the same pre-training for 4x the steps; any demo-<N>x (demo-4x ~12 min, demo-16x ~51 min)
  mlm           the same masked LM from random token embeddings (`embedding_init.method: random`): masked LM alone;
                mlm-<N>x: N times the steps (mlm-4x ~13 min, mlm-16x ~50 min)
  rtd           jobs/transfer-rtd.yaml's ELECTRA-style pre-training (`task: rtd`) of the same encoder, the
                demo's steps; rtd-<N>x: N times the steps
  minilm        the packaged all-MiniLM-L6-v2 (pre-trained at scale by others)
  minilm-dapt   MiniLM after jobs/dapt-minilm.yaml's continued masked-LM pre-training on the reviews
With --images, the same runner fine-tunes benchmarks/vision-finetune.yaml (Fashion-MNIST's 60,000 labeled
training images, scored on its 10,000 test images; 3 epochs at batch 64, at least 1,000 steps: the small
ViT from scratch is still far from trained at 250) from:
  vit           jobs/vision-mae.yaml's small ViT from random initialisation
  resnet        the same job's small ResNet from random initialisation
  mae           that ViT's encoder after the job's masked-autoencoder pre-training on the 60,000 training images
                without their labels (600 steps of 256 images); mae-<N>x: N times the steps
Everything lands under --cache (starts/, points/<split>/lr<lr>/): a point whose summary is there is not run again, so
re-plotting (or adding a seed) costs only what is new (the steps are not in the key: another --min-steps needs its
own --cache). Fine-tuned weights are deleted after scoring.
Writes every cached point of the split, this run's and earlier ones', to <cache>/curve-<split>.csv
(start, labels, seed, accuracy, majority, steps, wall_s) and a PNG beside it:
accuracy against labeled examples (log scale), one line per start (mean over seeds, min-max band),
the majority class dashed. matplotlib is installed with its missing dependencies into
runs/bench-deps (the benchmarks' own folder), not into the project.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from functools import cache, partial
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / "data" / "models" / "all-minilm-l6-v2"
DEPS = ROOT / "runs" / "bench-deps"
PLOT_PACKAGES = ("matplotlib==3.11.2", "contourpy==1.3.3", "cycler==0.12.1", "fonttools==4.68.0",
                 "kiwisolver==1.5.1", "pyparsing==3.3.3")  # fmt: skip
FASHION = Path("/usr/share/datasets/fashion-mnist")


class Curve(NamedTuple):
    """What differs between the text curve and the image curve; the runner is the same."""

    job: Path  # the fine-tuning recipe: one stage, `finetune`
    train: Path  # its labeled training data (the count of `all`)
    unit: str  # what a label is given to
    batch: int  # the recipe's global batch (steps = 3 epochs of it, at least min_steps)
    min_steps: int  # --min-steps' default
    # Job and overrides whose stage `pretrain` makes a start's export, and its steps at 1x.
    pretrainings: dict[str, tuple[Path, tuple[str, ...]]]
    pretrain_steps: int
    fixed: dict[str, tuple[str, ...]]  # starts made by overrides alone
    starts: tuple[str, ...]
    defaults: dict[str, str]  # --sizes, --starts, --lr, --cache
    missing: str  # what to run when `train` is missing

    def labeled(self) -> int:
        if self.train.suffix == ".gz":  # an IDX label file: its item count is the second big-endian word
            with gzip.open(self.train) as stream:
                return int.from_bytes(stream.read(8)[4:], "big")
        with self.train.open(newline="") as stream:
            return sum(1 for _ in csv.DictReader(stream))


TEXT = Curve(
    job=ROOT / "benchmarks" / "transfer-finetune.yaml",
    train=ROOT / "data" / "demo" / "train.csv",
    unit="reviews",
    batch=32,
    min_steps=250,
    pretrainings={
        "demo": (Path("jobs/demo.yaml"), ()),
        "mlm": (Path("jobs/demo.yaml"), ("stages.0.embedding_init.method=random",)),
        "rtd": (Path("jobs/transfer-rtd.yaml"), ()),
    },
    pretrain_steps=800,  # the pre-training steps of jobs/demo.yaml, jobs/transfer.yaml and jobs/transfer-rtd.yaml
    fixed={"minilm": (f"stages.0.init_from={MINILM}",)},
    starts=("random", "demo", "demo-4x", "mlm", "mlm-4x", "mlm-16x", "rtd", "rtd-4x", "minilm", "minilm-dapt"),
    # Chosen with --split validation at 2,000 labels (3 seeds, 2026-12-04): random init 0.614 / 0.675 / 0.618
    # at 2e-4 / 1e-3 / 3e-3; the demo's 4x pre-training 0.583 / 0.639 at 2e-4 / 1e-3 (the best of both at 1e-3).
    # MiniLM (22M parameters, pre-trained at scale) at 2,000 labels, seed 0 (2026-12-04): 0.804 / 0.709 at
    # 2e-4 / 1e-3; minilm-dapt is the same encoder and takes MiniLM's rate.
    defaults={
        "sizes": "250,500,1000,2000,5000,all",
        "starts": "random,demo,minilm",
        "lr": "1e-3,minilm=2e-4,minilm-dapt=2e-4",
        "cache": "runs/transfer",
    },
    missing="make data",
)
IMAGES = Curve(
    job=ROOT / "benchmarks" / "vision-finetune.yaml",
    train=FASHION / "train-labels-idx1-ubyte.gz",
    unit="images",
    batch=64,
    min_steps=1000,
    pretrainings={"mae": (Path("jobs/vision-mae.yaml"), ())},
    pretrain_steps=600,
    fixed={
        "vit": (),
        "resnet": ("stages.0.model={family: resnet, hidden_size: 32, num_layers: 3, depths: [1, 1, 1]}",),
    },
    starts=("mae", "mae-4x", "vit", "resnet"),
    defaults={"sizes": "500,1000,5000,all", "starts": "mae,vit,resnet", "lr": "1e-3", "cache": "runs/vision-curve"},
    missing="make data (Debian's dataset-fashion-mnist)",
)


def start_names(curve: Curve, text: str) -> list[str]:
    """`--starts`: each one of the curve's starts or a pre-training at a multiple of its steps (`mlm-8x`)."""
    starts = text.split(",")
    for start in starts:
        kind, _, times = start.partition("-")
        multiple = times.endswith("x") and times[:-1].isdigit() and int(times[:-1]) > 0
        if start not in curve.starts and not (kind in curve.pretrainings and multiple):
            example = next(iter(curve.pretrainings)) + "-8x"
            raise argparse.ArgumentTypeError(
                f"unknown start {start!r} (one of {', '.join(curve.starts)}, or e.g. {example})"
            )
    return starts


def whole_numbers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None


def rate_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of rates") from None


def label_counts(text: str) -> list[int | None]:
    """`--sizes`: whole numbers, `all` (None) for every labeled review."""
    return [None if part == "all" else whole_numbers(part)[0] for part in text.split(",")]


def launcher(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"launcher {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def start_overrides(curve: Curve, start: str, cache: Path, pretrain_steps: int | None) -> list[str]:
    """The fine-tuning job's overrides for a starting point; its export is made first when missing."""
    if start in curve.fixed:
        return list(curve.fixed[start])
    if start == "random" or start.split("-")[0] in curve.pretrainings:
        base = "demo" if start == "random" else start
        kind, _, times = base.partition("-")
        job, extra = curve.pretrainings[kind]
        steps = pretrain_steps or curve.pretrain_steps * int(times[:-1] or 1)
        out = cache / "starts" / base
        export = out / job.stem / "pretrain" / "model"
        if not (export / "config.json").is_file():
            print(f"pre-training {base} ({steps} steps) ...", flush=True)
            launcher("run", str(job), "--local", "--stage", "pretrain", f"output_dir={out}",
                     f"stages.0.max_steps={steps}", "stages.0.checkpoint_every=0", *extra)  # fmt: skip
        # A random start reads the demo's tokenizer, so that only the weights differ from `demo`.
        return [f"stages.0.tokenizer.source={export}"] if start == "random" else [f"stages.0.init_from={export}"]
    if start == "minilm-dapt":
        out = cache / "starts" / "minilm-dapt"
        export = out / "dapt-minilm" / "continue" / "model"
        if not (export / "config.json").is_file():
            print("continuing MiniLM's pre-training ...", flush=True)
            steps = [f"stages.0.max_steps={pretrain_steps}"] if pretrain_steps else []
            launcher("run", "jobs/dapt-minilm.yaml", "--local", "--stage", "continue", f"output_dir={out}", *steps)
        return [f"stages.0.init_from={export}"]
    raise AssertionError(f"start {start!r} passed --starts' check but has no recipe")


class Rates(NamedTuple):
    """`--lr`: the fine-tuning rate of every start, and the starts that have their own."""

    default: float
    own: dict[str, float]

    def of(self, start: str) -> float:
        return self.own.get(start, self.default)


def learning_rates(curve: Curve, spec: str) -> Rates:
    """Parses `--lr`'s "RATE[,START=RATE...]"."""
    default, own = None, {}
    for part in spec.split(","):
        start, _, rate = part.rpartition("=")
        try:
            value = float(rate)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not RATE or START=RATE") from None
        if start:
            start_names(curve, start)
            own[start] = value
        else:
            default = value
    if default is None:
        raise argparse.ArgumentTypeError(f"{spec!r} names no rate for the other starts (e.g. 1e-3,minilm=2e-4)")
    return Rates(default, own)


def points_root(cache: Path, split: str, lr: float) -> Path:
    """A recipe's points: a changed learning rate never reuses another's cached scores."""
    return cache / "points" / split / f"lr{lr:g}"


def point_dir(cache: Path, split: str, lr: float, start: str, size: int | None, seed: int) -> Path:
    return points_root(cache, split, lr) / start / f"n{size or 'all'}" / f"seed{seed}"


@cache
def job_name(job: Path) -> str:
    return yaml.safe_load(job.read_text())["name"]


def summary_path(curve: Curve) -> Path:
    """A point's stage summary under its folder: <job name>/finetune/summary.json."""
    return Path(job_name(curve.job)) / "finetune" / "summary.json"


def recipe_overrides(start: str, size: int | None, split: str, args: argparse.Namespace, total: int) -> list[str]:
    """The recipe at a start and a size: the start, the first `size` labeled reviews, the steps, the eval split."""
    labels = size or total
    steps = max(math.ceil(3 * labels / args.curve.batch), args.min_steps)
    overrides = [
        *start_overrides(args.curve, start, args.cache, args.pretrain_steps),
        f"stages.0.max_steps={args.max_steps or steps}",
    ]
    if size is not None:
        overrides.append(f"stages.0.data.max_train_samples={size}")
    if split == "validation":  # 10% of the labeled training data, held out before the first N are taken
        overrides += ["stages.0.data.eval=[]", "stages.0.data.eval_fraction=0.1"]
    if args.max_eval:
        overrides.append(f"stages.0.data.max_eval_samples={args.max_eval}")
    return overrides


def run_point(start: str, size: int | None, seed: int, args: argparse.Namespace, total: int, lr: float) -> None:
    """One fine-tuning, unless its summary is cached."""
    out = point_dir(args.cache, args.split, lr, start, size, seed)
    summary = out / summary_path(args.curve)
    if not summary.is_file():
        overrides = [f"output_dir={out}", f"seed={seed}", f"stages.0.optim.lr={lr}",
                     *recipe_overrides(start, size, args.split, args, total)]  # fmt: skip
        launcher("run", str(args.curve.job), "--local", *overrides)
        for name in ("checkpoints", "model"):  # the curve needs the score, not the weights
            shutil.rmtree(summary.parent / name, ignore_errors=True)


def choose_rate(start: str, args: argparse.Namespace, total: int) -> float:
    """`--choose-lr`: `launcher sweep` of the fine-tuning's learning rate (x the seeds) at --choose-at labels on the
    validation split (Ray Tune, trials side by side); the rate with the best mean validation accuracy over seeds.
    The sweep's table is kept (cached: the same choice is not run again), the trials' weights are not."""
    size, candidates, seeds = args.choose_at, args.choose_lr, args.seeds
    key = "lr" + "-".join(f"{rate:g}" for rate in candidates) + "_seeds" + "-".join(map(str, seeds))
    out = args.cache / "lr-choice" / start / f"n{size or 'all'}" / key
    stage = out / summary_path(args.curve).parent
    if not (stage / "sweep.json").is_file():
        grid = (
            f"{{params: {{optim.lr: {{grid: {list(candidates)}}}, seed: {{grid: {list(seeds)}}}}}, metric: accuracy}}"
        )
        print(f"choosing {start}'s learning rate among {', '.join(f'{r:g}' for r in candidates)} ...", flush=True)
        launcher("sweep", str(args.curve.job), "--stage", "finetune", "--local", f"output_dir={out}",
                 f"stages.0.sweep={grid}", *recipe_overrides(start, size, "validation", args, total))  # fmt: skip
        for path in [
            stage / "model",
            *stage.glob("trials/*/finetune/model"),
            *stage.glob("trials/*/finetune/checkpoints"),
        ]:
            shutil.rmtree(path, ignore_errors=True)
    trials = json.loads((stage / "sweep.json").read_text())["trials"]
    means = {}
    for rate in candidates:
        scores = [t["score"] for t in trials if t["optim.lr"] == rate and t["score"] is not None]
        means[rate] = statistics.mean(scores) if scores else float("nan")
    chosen = max((r for r in candidates if not math.isnan(means[r])), key=lambda r: means[r])
    shown = " | ".join(f"{rate:g} {means[rate]:.4f}" for rate in candidates)
    print(f"{start}: validation accuracy at {size or total} labels, mean of seeds {seeds}: {shown} -> lr {chosen:g}",
          flush=True)  # fmt: skip
    return chosen


def cached_rows(cache: Path, split: str, rates: Rates, total: int, order: list[str],
                stage_summary: Path) -> list[dict]:  # fmt: skip
    """Every point of the split in the cache (this invocation's and earlier ones') at its start's learning rate,
    `order`'s starts first."""
    rows = []
    for path in sorted((cache / "points" / split).glob(f"lr*/*/n*/seed*/{stage_summary}")):
        seed_dir = path.parents[len(stage_summary.parts) - 1]
        size, start = seed_dir.parent.name[1:], seed_dir.parent.parent.name
        lr = rates.of(start)
        if seed_dir.parents[2] != points_root(cache, split, lr):
            continue  # another rate's point
        summary = json.loads(path.read_text())
        rows.append({
            "start": start, "labels": total if size == "all" else int(size), "seed": int(seed_dir.name[4:]),
            "accuracy": summary["eval"]["accuracy"], "majority": summary["reference"]["majority_accuracy"],
            "steps": summary["steps"], "wall_s": summary["wall_s"], "lr": lr,
        })  # fmt: skip
    rank = {start: i for i, start in enumerate(order)}
    return sorted(rows, key=lambda r: (rank.get(r["start"], len(rank)), r["start"], r["labels"], r["seed"]))


def plot(rows: list[dict], path: Path, split: str, default_lr: float, unit: str) -> None:
    """Accuracy against labeled examples (log scale): mean over seeds, min-max band, majority class dashed."""
    sys.path.insert(0, str(plot_deps()))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for start in dict.fromkeys(r["start"] for r in rows):
        sizes = sorted({r["labels"] for r in rows if r["start"] == start})
        scores = [[r["accuracy"] for r in rows if r["start"] == start and r["labels"] == n] for n in sizes]
        lr = next(r["lr"] for r in rows if r["start"] == start)
        label = start if lr == default_lr else f"{start} (lr {lr:g})"
        axes.plot(sizes, [statistics.mean(s) for s in scores], marker="o", label=label)
        axes.fill_between(sizes, [min(s) for s in scores], [max(s) for s in scores], alpha=0.2)
    axes.axhline(max(r["majority"] for r in rows), linestyle="--", color="grey", label="majority class")
    axes.set_xscale("log")
    axes.set_xlabel(f"labeled training {unit}")
    axes.set_ylabel(f"{split} accuracy")
    title = f"Accuracy by start (fine-tuning lr {default_lr:g} unless noted; mean of seeds, min-max)"
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_deps() -> Path:
    """matplotlib and what the project lacks of its dependencies, in the benchmarks' own folder."""
    if not (DEPS / "matplotlib").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--target", str(DEPS), *PLOT_PACKAGES], check=True)  # fmt: skip
    return DEPS


def table(rows: list[dict]) -> str:
    starts = list(dict.fromkeys(r["start"] for r in rows))
    sizes = sorted({r["labels"] for r in rows})
    lines = ["| start | " + " | ".join(f"{n:,}" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for start in starts:
        cells = []
        for n in sizes:
            scores = [r["accuracy"] for r in rows if r["start"] == start and r["labels"] == n]
            cells.append(f"{statistics.mean(scores):.3f} ({min(scores):.3f}-{max(scores):.3f})" if scores else "")
        lines.append(f"| {start} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("--images", action="store_true")
    curve = IMAGES if images.parse_known_args()[0].images else TEXT  # the flags' types and defaults depend on it
    defaults = curve.defaults
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", action="store_true", help="the image curve (Fashion-MNIST) instead of text's")
    parser.add_argument("--sizes", type=label_counts, default=defaults["sizes"])
    parser.add_argument("--seeds", type=whole_numbers, default="0,1,2")
    parser.add_argument("--starts", type=partial(start_names, curve), default=defaults["starts"])
    parser.add_argument("--cache", type=Path, default=ROOT / defaults["cache"])
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--lr", type=partial(learning_rates, curve), default=defaults["lr"],
                        help="RATE[,START=RATE...]: the fine-tuning rate, per start")  # fmt: skip
    parser.add_argument("--choose-lr", type=rate_list, metavar="RATE,RATE,...",
                        help="choose each start's rate among these by a `launcher sweep` on the validation "
                        "split (mean over --seeds at --choose-at labels); it replaces --lr for the curve's points",
                        )  # fmt: skip
    parser.add_argument("--choose-at", type=label_counts, default="2000", help="labels at which --choose-lr chooses")
    parser.add_argument("--min-steps", type=int, default=curve.min_steps, help="fewest optimizer steps at any size")
    parser.add_argument("--plot-only", action="store_true", help="tabulate and plot the cache; run nothing")
    parser.add_argument("--pretrain-steps", type=int, help="(tests) pre-training steps of every made start")
    parser.add_argument("--max-steps", type=int, help="(tests) fine-tuning steps of every point")
    parser.add_argument("--max-eval", type=int, help="(tests) score on the first this many eval examples")
    args = parser.parse_args()
    args.curve = curve
    if not curve.train.is_file():
        parser.error(f"{curve.train} is missing: run `{curve.missing}` first")
    total = curve.labeled()
    sizes, seeds, starts, rates = args.sizes, args.seeds, args.starts, args.lr
    args.cache.mkdir(parents=True, exist_ok=True)
    args.choose_at = args.choose_at[0]
    if args.choose_lr and not args.plot_only:
        rates = Rates(rates.default, {**rates.own, **{start: choose_rate(start, args, total) for start in starts}})
    for start in [] if args.plot_only else starts:
        lr = rates.of(start)
        for size in sizes:
            for seed in seeds:
                run_point(start, size, seed, args, total, lr)
                point = point_dir(args.cache, args.split, lr, start, size, seed)
                summary = json.loads((point / summary_path(curve)).read_text())
                what = f"{start:<12} {size or total:>6} labels seed {seed}"
                done = f"{summary['eval']['accuracy']:.4f} ({summary['steps']} steps, {summary['wall_s']:.0f} s)"
                print(f"{what}: {args.split} accuracy {done}", flush=True)
    rows = cached_rows(args.cache, args.split, rates, total, starts, summary_path(curve))
    if not rows:
        where = args.cache / "points" / args.split
        parser.error(
            f"no {args.split} points of {', '.join(starts)} at their --lr under {where}: run without --plot-only"
        )
    csv_path = args.cache / f"curve-{args.split}.csv"
    with csv_path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = csv_path.with_suffix(".png")
    plot(rows, png, args.split, rates.default, curve.unit)
    print(table(rows))
    print(f"wrote {csv_path} and {png}")


if __name__ == "__main__":
    main()
