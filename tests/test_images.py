"""Images: preparation from IDX files and image folders (Fashion-MNIST, installed by `make data`), the cache,
bad input, augmentation, and tiny mae -> image_classification runs of jobs/vision-mae.yaml."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.data.image_prepare import PROCESSOR_FILE, prepare_images, processor_config
from launcher.data.images import ImageStore
from launcher.errors import UserError
from launcher.jobspec.load import load_spec
from tests.conftest import ROOT, assert_ok, read_jsonl, run_cli

JOB = ROOT / "jobs" / "vision-mae.yaml"
FASHION = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["tshirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def fashion(split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images (count x 28 x 28) and labels of Fashion-MNIST's train or t10k files (`make data`
    installs Debian's dataset-fashion-mnist)."""
    with gzip.open(FASHION / f"{split}-images-idx3-ubyte.gz") as stream:
        stream.read(16)
        images = np.frombuffer(stream.read(count * 784), dtype=np.uint8).reshape(count, 28, 28)
    with gzip.open(FASHION / f"{split}-labels-idx1-ubyte.gz") as stream:
        stream.read(8)
        labels = np.frombuffer(stream.read(count), dtype=np.uint8)
    return images, labels


def write_idx(folder: Path, name: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """An IDX pair (`<name>-images-idx3-ubyte.gz`, `<name>-labels-idx1-ubyte.gz`), as MNIST ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    with gzip.open(folder / f"{name}-images-idx3-ubyte.gz", "wb") as stream:
        stream.write(bytes([0, 0, 8, 3]) + b"".join(x.to_bytes(4, "big") for x in (n, rows, cols)) + images.tobytes())
    with gzip.open(folder / f"{name}-labels-idx1-ubyte.gz", "wb") as stream:
        stream.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.astype(np.uint8).tobytes())
    return folder / f"{name}-images-idx3-ubyte.gz"


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    """`root/<class>/<i>.png` for every image (the image-folder layout); the paths in order of writing."""
    from PIL import Image

    paths = []
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        path = root / LABELS[int(label)] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def spec_for(out: Path, stage: int, train: Path, evaluation: Path, *extra: str):
    return load_spec(
        JOB, [f"output_dir={out}", f"stages.{stage}.data.train={train}", f"stages.{stage}.data.eval={evaluation}",
              f"stages.{stage}.data.max_train_samples=null", *extra],
    )  # fmt: skip


def data_dir(out: Path, stage: str = "vit-scratch") -> Path:
    return out / "vision-mae" / stage / "data"


def split_pixels(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    store = ImageStore.read(directory, split)
    pixels = np.stack([store.pixels(i) for i in range(len(store))])
    return pixels, store.labels


@pytest.fixture(scope="module")
def small_fashion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """300 training and 100 test images of Fashion-MNIST, as IDX files and as an image folder."""
    root = tmp_path_factory.mktemp("fashion")
    train, test = fashion("train", 300), fashion("t10k", 100)
    return {
        "train": train, "test": test,
        "train_idx": write_idx(root / "idx", "train", *train), "test_idx": write_idx(root / "idx", "t10k", *test),
        "train_folder": root / "train", "test_folder": root / "test",
        "train_paths": write_folder(root / "train", *train), "test_paths": write_folder(root / "test", *test),
    }  # fmt: skip


# --- preparation round trip ---------------------------------------------------------------------------------------


def test_idx_files_round_trip_pixel_for_pixel(small_fashion: dict, tmp_path: Path) -> None:
    spec = spec_for(tmp_path, 2, small_fashion["train_idx"], small_fashion["test_idx"])
    prepared = prepare_images(spec, 2)
    assert (prepared.num_train_samples, prepared.num_eval_samples) == (300, 100)
    for split, (images, labels) in (("train", small_fashion["train"]), ("eval", small_fashion["test"])):
        pixels, stored = split_pixels(data_dir(tmp_path), split)
        assert pixels.dtype == np.uint8 and pixels.shape == (len(images), 28, 28, 1)
        assert np.array_equal(pixels[..., 0], images), split
        assert np.array_equal(stored, labels), split
    processor = json.loads((data_dir(tmp_path) / "tokenizer" / PROCESSOR_FILE).read_text())
    expected = small_fashion["train"][0].astype(np.float64) / 255
    assert processor["image_mean"] == pytest.approx([expected.mean()] * 3, abs=1e-5)
    assert processor["image_std"] == pytest.approx([expected.std()] * 3, abs=1e-5)


def test_image_folder_round_trips_with_class_ids_from_the_folder_names(small_fashion: dict, tmp_path: Path) -> None:
    spec = spec_for(tmp_path, 2, small_fashion["train_folder"], small_fashion["test_folder"])
    prepare_images(spec, 2)
    pixels, labels = split_pixels(data_dir(tmp_path), "train")
    # the folder is read class by class (sorted names), files in name order: the same images, regrouped
    images, ids = small_fashion["train"]
    order = sorted(range(len(ids)), key=lambda i: (LABELS[ids[i]], i))
    assert np.array_equal(pixels[..., 0], images[order])
    assert np.array_equal(labels, ids[order])


def test_rgb_storage_repeats_grey_and_a_mixed_folder_is_converted_said_once(
    small_fashion: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from PIL import Image

    root = tmp_path / "mixed"
    shutil.copytree(small_fashion["test_folder"], root)
    for path in sorted(root.rglob("*.png"))[:3]:
        Image.open(path).convert("RGB").save(path)
    spec = spec_for(tmp_path, 2, root, small_fashion["test_folder"], "stages.2.image.channels=1")
    prepare_images(spec, 2)
    lines = [line for line in capsys.readouterr().out.splitlines() if "converted" in line]
    assert lines == ["stages.2.data: converted 3 RGB image(s) to L (image.channels 1)"]
    rgb = spec_for(
        tmp_path / "rgb", 2, small_fashion["train_idx"], small_fashion["test_idx"], "stages.2.image.channels=3"
    )
    prepare_images(rgb, 2)
    pixels, _ = split_pixels(data_dir(tmp_path / "rgb"), "eval")
    assert pixels.shape[-1] == 3 and np.array_equal(pixels[..., 2], small_fashion["test"][0])


def test_an_eval_split_drawn_from_train_is_a_function_of_the_pixels(small_fashion: dict, tmp_path: Path) -> None:
    args = [f"output_dir={tmp_path}", f"stages.0.data.train={small_fashion['train_idx']}", "stages.0.data.eval=[]",
            "stages.0.data.eval_fraction=0.2"]  # fmt: skip
    prepare_images(load_spec(JOB, args), 0)
    train, labels = split_pixels(data_dir(tmp_path, "pretrain"), "train")
    held, _ = split_pixels(data_dir(tmp_path, "pretrain"), "eval")
    assert labels is None, "mae stores no labels"
    assert len(train) + len(held) == 300 and 30 <= len(held) <= 90
    seen = {image.tobytes() for image in small_fashion["train"][0]}
    assert {image[..., 0].tobytes() for image in held} <= seen


def test_max_train_samples_keeps_the_first_images(small_fashion: dict, tmp_path: Path) -> None:
    spec = spec_for(
        tmp_path, 2, small_fashion["train_idx"], small_fashion["test_idx"], "stages.2.data.max_train_samples=40"
    )
    assert prepare_images(spec, 2).num_train_samples == 40
    pixels, _ = split_pixels(data_dir(tmp_path), "train")
    assert np.array_equal(pixels[..., 0], small_fashion["train"][0][:40])


# --- the cache --------------------------------------------------------------------------------------------------


def test_prepared_images_are_reused_until_an_input_or_a_setting_changes(small_fashion: dict, tmp_path: Path) -> None:
    root = tmp_path / "train"
    shutil.copytree(small_fashion["train_folder"], root)
    args = (tmp_path / "runs", 2, root, small_fashion["test_folder"])
    prepare_images(spec_for(*args), 2)
    meta = data_dir(tmp_path / "runs") / "meta.json"
    first = json.loads(meta.read_text())["fingerprint"]
    written = meta.stat().st_mtime_ns
    prepare_images(spec_for(*args), 2)
    assert meta.stat().st_mtime_ns == written, "unchanged inputs: reused, nothing written"

    time.sleep(0.01)
    victim = sorted(root.rglob("*.png"))[0]
    victim.write_bytes(small_fashion["test_paths"][0].read_bytes())  # another image under the same name
    prepare_images(spec_for(*args), 2)
    second = json.loads(meta.read_text())["fingerprint"]
    assert second != first
    pixels, _ = split_pixels(data_dir(tmp_path / "runs"), "train")
    assert np.array_equal(pixels[0, ..., 0], small_fashion["test"][0][0]), "the new pixels are in"

    prepare_images(spec_for(*args, "stages.2.image.channels=3"), 2)
    assert json.loads(meta.read_text())["fingerprint"] not in (first, second)
    assert not list(meta.parent.parent.glob(".data-*")), "no temporary folder left"


# --- bad input: one line naming the file, nothing half-written ----------------------------------------------------


def bad_folder(small_fashion: dict, tmp_path: Path, damage: str) -> tuple[Path, str]:
    """A copy of the test folder with one kind of damage; the path the message must name."""
    root = tmp_path / "bad"
    shutil.copytree(small_fashion["test_folder"], root)
    victim = sorted(root.rglob("*.png"))[5]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
        return root, str(victim)
    if damage == "unreadable":
        victim.write_text("not an image\n")
        return root, str(victim)
    if damage == "small":
        from PIL import Image

        Image.new("L", (20, 28)).save(victim)
        return root, str(victim)
    if damage == "one class":
        for folder in root.iterdir():
            if folder.name != "bag":
                shutil.rmtree(folder)
        return root, str(root)
    assert damage == "unknown class"
    (root / "bag").rename(root / "handbag")
    return root, str(root / "handbag")


BAD = {
    "truncated": "unreadable image",
    "unreadable": "unreadable image",
    "small": "20x28 pixels is smaller than image.size 28",
    "one class": "holds one class folder ('bag')",
    "unknown class": "class folder 'handbag' is not in data.labels",
}


@pytest.mark.parametrize("damage", sorted(BAD))
def test_bad_images_are_named_and_nothing_is_written(damage: str, small_fashion: dict, tmp_path: Path) -> None:
    root, named = bad_folder(small_fashion, tmp_path, damage)
    spec = spec_for(tmp_path / "runs", 2, root, small_fashion["test_idx"])
    with pytest.raises(UserError) as caught:
        prepare_images(spec, 2)
    message = str(caught.value)
    assert message.startswith(named) and BAD[damage] in message and "\n" not in message, message
    stage_dir = data_dir(tmp_path / "runs").parent
    assert not (stage_dir / "data").exists() and not list(stage_dir.glob(".data-*")), "nothing half-written"


def test_a_truncated_idx_file_and_images_smaller_than_the_crop_are_refused(small_fashion: dict, tmp_path: Path) -> None:
    whole = gzip.decompress(small_fashion["train_idx"].read_bytes())
    cut = tmp_path / "cut" / "train-images-idx3-ubyte.gz"
    cut.parent.mkdir()
    cut.write_bytes(gzip.compress(whole[: 16 + 784 * 250 + 100]))
    shutil.copy(small_fashion["train_idx"].with_name("train-labels-idx1-ubyte.gz"), cut.parent)
    with pytest.raises(UserError, match=r"cut/train-images-idx3-ubyte.gz: truncated: .* announces 300 records"):
        prepare_images(spec_for(tmp_path / "a", 2, cut, small_fashion["test_idx"]), 2)
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz: its 28x28-pixel images are smaller than image"):
        size = ["stages.2.image.size=32", "stages.2.model.patch_size=4"]
        spec = spec_for(tmp_path / "b", 2, small_fashion["train_idx"], small_fashion["test_idx"], *size)
        prepare_images(spec, 2)
    for out in ("a", "b"):
        assert not list((tmp_path / out).rglob("*.bin")), "nothing half-written"


@pytest.mark.slow
def test_bad_image_exits_2_with_one_line(small_fashion: dict, tmp_path: Path) -> None:
    root, named = bad_folder(small_fashion, tmp_path, "truncated")
    args = [f"output_dir={tmp_path / 'runs'}", f"stages.0.data.train={root}", f"stages.0.data.eval={root}"]
    result = run_cli("prepare", str(JOB), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}: unreadable image"), lines


def test_the_processor_config_is_what_transformers_saves(tmp_path: Path) -> None:
    """The hand-written preprocessor_config.json equals CLIPImageProcessor's own (and loads back)."""
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPImageProcessor

    mean, std = [0.28, 0.28, 0.28], [0.35, 0.35, 0.35]
    CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, resample=Image.Resampling.BILINEAR,
        image_mean=mean, image_std=std,
    ).save_pretrained(str(tmp_path))  # fmt: skip
    saved = json.loads((tmp_path / PROCESSOR_FILE).read_text())
    assert processor_config(28, mean, std) == saved
    (tmp_path / PROCESSOR_FILE).write_text(json.dumps(processor_config(28, mean, std)))
    loaded = AutoImageProcessor.from_pretrained(str(tmp_path))
    grey = Image.fromarray(fashion("t10k", 1)[0][0])
    values = loaded(grey, return_tensors="pt")["pixel_values"]
    expected = (torch.from_numpy(np.array(grey)).float() / 255 - 0.28) / 0.35
    assert values.shape == (1, 3, 28, 28) and torch.allclose(values[0], expected.expand(3, -1, -1), atol=1e-5)


# --- augmentation -----------------------------------------------------------------------------------------------


def image_task(*extra: str):
    from types import SimpleNamespace

    from launcher.tasks import build_task

    spec = load_spec(JOB, list(extra))
    processor = SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.25] * 3)
    return build_task(spec.stages[2], processor)


def test_augmentation_is_seeded_by_the_loops_generator_and_off_for_eval() -> None:
    images = fashion("t10k", 8)[0]
    samples = [{"pixels": image[..., None], "augment": True, "label": 0} for image in images]
    task = image_task()
    first = task.collate(samples, torch.Generator().manual_seed(7))["pixel_values"]
    again = task.collate(samples, torch.Generator().manual_seed(7))["pixel_values"]
    other = task.collate(samples, torch.Generator().manual_seed(8))["pixel_values"]
    assert torch.equal(first, again) and not torch.equal(first, other)
    plain = (torch.from_numpy(images.copy()).float() / 255 - 0.5) / 0.25
    evaluation = task.collate([{**s, "augment": False} for s in samples], torch.Generator())["pixel_values"]
    assert torch.allclose(evaluation, plain[:, None].expand(-1, 3, -1, -1))
    off = image_task("stages.2.image.random_resized_crop=false", "stages.2.image.horizontal_flip=false")
    assert torch.allclose(off.collate(samples, torch.Generator())["pixel_values"], evaluation, atol=1e-5)
    flip = image_task("stages.2.image.random_resized_crop=false")
    flipped = flip.collate(samples, torch.Generator().manual_seed(0))["pixel_values"]
    for got, want in zip(flipped, evaluation, strict=True):
        assert torch.allclose(got, want, atol=1e-5) or torch.allclose(got, want.flip(-1), atol=1e-5)


def test_crop_boxes_stay_inside_the_image_within_the_scale() -> None:
    from launcher.tasks.vision import crop_boxes

    boxes = crop_boxes(500, 28, (0.35, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(0))
    left, top, width, height = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + width <= 28).all() and (top + height <= 28).all()
    share = width * height / 28**2
    assert share.min() >= 0.3 and share.max() <= 1.0 and share.std() > 0.1


def test_crop_boxes_are_torchvisions_draws_image_by_image() -> None:
    """The batched draw gives exactly the boxes of torchvision's loop (ten tries per image, then the whole image),
    from the same generator, so crops do not change with how they are computed."""
    from launcher.tasks.vision import crop_boxes

    def reference(count: int, size: int, scale: tuple[float, float], ratio: tuple[float, float], seed: int):
        generator, boxes = torch.Generator().manual_seed(seed), []
        for _ in range(count):
            box = [0.0, 0.0, float(size), float(size)]
            for share, aspect, x, y in torch.rand((10, 4), generator=generator, dtype=torch.float64).tolist():
                target = size * size * (scale[0] + share * (scale[1] - scale[0]))
                aspect = math.exp(math.log(ratio[0]) + aspect * (math.log(ratio[1]) - math.log(ratio[0])))
                width, height = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
                if 0 < width <= size and 0 < height <= size:
                    box = [int(x * (size - width + 1)), int(y * (size - height + 1)), width, height]
                    break
            boxes.append(box)
        return torch.tensor(boxes, dtype=torch.float32)

    fallbacks = 0
    for scale, ratio in (((0.35, 1.0), (0.75, 4 / 3)), ((0.9, 1.0), (0.1, 10.0))):  # the second falls back often
        for seed in range(3):
            got = crop_boxes(200, 28, scale, ratio, torch.Generator().manual_seed(seed))
            assert torch.equal(got, reference(200, 28, scale, ratio, seed))
            fallbacks += int((got == torch.tensor([0.0, 0.0, 28.0, 28.0])).all(1).sum())
    assert fallbacks > 0


# --- tiny runs of the shipped job ---------------------------------------------------------------------------------


def tiny_overrides(out: Path, train: Path, test: Path) -> list[str]:
    """jobs/vision-mae.yaml shrunk: 300 / 100 images, a few steps per stage, one global batch of 32."""
    args = [f"output_dir={out}"]
    for stage in range(4):
        args += [
            f"stages.{stage}.data.train={train}", f"stages.{stage}.data.eval={test}",
            f"stages.{stage}.batch.micro_batch_size=16", f"stages.{stage}.batch.global_batch_size=32",
            f"stages.{stage}.max_steps=3", f"stages.{stage}.checkpoint_every=0", f"stages.{stage}.eval_every=0",
            f"stages.{stage}.schedule.warmup_steps=0", f"stages.{stage}.log_every=1",
        ]  # fmt: skip
    return [*args, "stages.1.data.max_train_samples=100"]


@pytest.fixture(scope="module")
def tiny_vision(small_fashion: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    result = run_cli(
        "run", str(JOB), "--local", *tiny_overrides(out, small_fashion["train_idx"], small_fashion["test_idx"])
    )
    assert_ok(result)
    assert "stage finetune: " in result.stdout and "has no weights for classifier (2 tensors)" in result.stdout
    yield out / "vision-mae"
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_tiny_vision_job_trains_every_stage(tiny_vision: Path) -> None:
    for stage in ("pretrain", "finetune", "vit-scratch", "resnet-scratch"):
        summary = json.loads((tiny_vision / stage / "summary.json").read_text())
        assert summary["steps"] == 3 and np.isfinite(summary["train_loss"]), stage
        if stage != "pretrain":
            assert {"loss", "accuracy", "macro_f1", "accuracy/bag", "recall/bag"} <= set(summary["eval"])
            assert summary["eval"]["accuracy/bag"] == summary["eval"]["recall/bag"]
    assert json.loads((tiny_vision / "finetune" / "model" / "config.json").read_text())["model_type"] == "vit"


@pytest.mark.slow
def test_tiny_vision_exports_load_in_the_pipeline_with_the_label_names(tiny_vision: Path) -> None:
    from PIL import Image
    from transformers import pipeline

    images = [Image.fromarray(pixels) for pixels in fashion("t10k", 4)[0]]
    for stage in ("finetune", "resnet-scratch"):
        classify = pipeline("image-classification", model=str(tiny_vision / stage / "model"))
        answers = classify(images, top_k=3)
        assert len(answers) == 4 and all({a["label"] for a in answer} <= set(LABELS) for answer in answers)


@pytest.mark.slow
@pytest.mark.ray
def test_two_ray_workers_take_the_local_runs_mae_and_finetune_steps(
    small_fashion: dict, tiny_vision: Path, tmp_path: Path, ray_cluster
) -> None:
    """The same global batch: --local (the tiny job's run) accumulates 2 micro-batches where 2 Ray workers take one
    each; crops, flips and masks are drawn per micro-batch from the same seeds, so the losses agree."""
    import yaml

    from tests.conftest import on_ray

    job = yaml.safe_load(JOB.read_text())
    job["stages"] = job["stages"][:2]  # mae, then image_classification from its export
    path = tmp_path / "vision-mae.yaml"
    path.write_text(yaml.safe_dump(job))
    args = [a for a in tiny_overrides(tmp_path, small_fashion["train_idx"], small_fashion["test_idx"])
            if not a.startswith(("stages.2", "stages.3"))]  # fmt: skip
    ray = tmp_path / "ray"
    assert_ok(run_cli("run", str(path), *args, "cluster.num_workers=2", f"output_dir={ray}", env=on_ray(ray_cluster)))
    for stage in ("pretrain", "finetune"):
        expected = read_jsonl(tiny_vision / stage / "metrics.jsonl")
        got = read_jsonl(ray / "vision-mae" / stage / "metrics.jsonl")
        assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3], stage
        for want, have in zip(expected, got, strict=True):
            for key in ("train/loss", "eval/loss", "eval/accuracy"):
                if key in want:
                    assert have[key] == pytest.approx(want[key], abs=1e-4), (stage, want["step"], key)


def _files(directory: Path) -> dict[str, bytes]:
    """Every file below `directory` by its relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.ray
def test_prepare_on_a_cluster_runs_ray_data_tasks_that_match_the_local_result(
    small_fashion: dict, tmp_path: Path, ray_cluster
) -> None:
    """`launcher prepare` joined to a cluster: one Ray Data task per chunk of images (IDX files, image folders), each
    writing its own shards; the prepared data is the single-machine result, file for file."""
    import re

    import yaml

    from tests.conftest import on_ray

    job = yaml.safe_load(JOB.read_text())
    job["stages"] = job["stages"][:2]  # mae on IDX files, then image_classification on image folders
    path = tmp_path / "vision-mae.yaml"
    path.write_text(yaml.safe_dump(job))
    train = write_idx(tmp_path / "idx", "t10k", *fashion("t10k", 1000))  # 2 chunks (of 512) on any number of cores
    args = ["prepare", str(path), f"stages.0.data.train={train}",
            f"stages.0.data.eval={small_fashion['test_idx']}", f"stages.1.data.train={small_fashion['train_folder']}",
            f"stages.1.data.eval={small_fashion['test_folder']}", "stages.1.data.max_train_samples=null"]  # fmt: skip
    ray = run_cli(*args, f"output_dir={tmp_path / 'ray'}", env=on_ray(ray_cluster))
    assert_ok(ray)
    # 1000 + 100 images: 2 + 1 tasks; 300 + 100 files: 1 + 1 (Ray Data decides how many processes run them)
    assert "preparation: 3 Ray Data task(s) on the cluster" in ray.stdout, ray.stdout
    assert "preparation: 2 Ray Data task(s) on the cluster" in ray.stdout, ray.stdout
    assert re.search(r"stages.0.data: 3 task\(s\) in [123] process\(es\), 1100 images", ray.stdout), ray.stdout
    local = run_cli(*args, f"output_dir={tmp_path / 'local'}", "--local")
    assert_ok(local)
    assert "Ray Data" not in local.stdout and "stages.0.data: 3 task(s) in 1 process(es)" in local.stdout, local.stdout
    for stage, shards in (("pretrain", 3), ("finetune", 2)):
        got, want = (_files(data_dir(tmp_path / where, stage)) for where in ("ray", "local"))
        assert sorted(got) == sorted(want), stage
        assert len([name for name in got if name.endswith(".images.bin")]) == shards, sorted(got)
        assert got == want, stage
