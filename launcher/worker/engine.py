"""The DeepSpeed engine of one rank: optimizer groups, schedule and ZeRO config from the spec."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from launcher.hooks import verbose
from launcher.jobspec.models import OptimSpec, StageSpec
from launcher.worker import deepspeed_internals

_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """What the block prints goes to the stage's log file (`launcher.worker.entry.stage_log`) unless `--verbose`.

    Both `sys.stdout` and `print` itself are swapped for the block: in a Ray Train worker `print` is
    re-routed past `sys.stdout`, so redirecting the stream alone misses it there.
    """
    if verbose():
        yield
        return
    captured = io.StringIO()
    original = builtins.print

    def to_log(*values: object, sep: str | None = " ", end: str | None = "\n", **_: object) -> None:
        captured.write((sep or " ").join(str(v) for v in values) + (end if end is not None else "\n"))

    builtins.print = to_log
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        builtins.print = original
        if captured.getvalue().strip():
            logging.getLogger("launcher").info(captured.getvalue().strip())


def select_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator once, at first use; say which (and where its ops build) before importing it.

    DeepSpeed builds ops it needs at first use (on CPU its shared-memory collective, ~30 s of two
    cores) with torch's extension builder, whose cache folder is named by Python and CUDA versions
    only. The build files in it name this installation's paths, so two installations on one machine
    (a second virtual environment, a fresh clone) rebuild each other's ops every time they alternate.
    Unless TORCH_EXTENSIONS_DIR says otherwise, each installation gets a folder of its own there.
    The builder runs the first `ninja` on PATH, and two ninja releases (the `ninja` wheel DeepSpeed
    requires, a system one) read each other's build log as stale: a worker whose PATH leads to the other
    one rebuilds the op. This installation's ninja goes first on PATH, so every process uses the same.
    Then DeepSpeed is imported (`deepspeed_internals.import_deepspeed`: without its autotuner's MLflow import).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    ninja_dir = ninja_bin_dir()
    if ninja_dir is not None:
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[0] != ninja_dir:
            os.environ["PATH"] = os.pathsep.join([ninja_dir, *(p for p in path.split(os.pathsep) if p != ninja_dir)])
    deepspeed_internals.import_deepspeed()


def ninja_bin_dir() -> str | None:
    """The folder of the `ninja` wheel's binary (DeepSpeed's dependency), if it is installed."""
    try:
        import ninja
    except ImportError:
        return None
    folder = getattr(ninja, "BIN_DIR", None)
    return folder if folder and (Path(folder) / "ninja").is_file() else None


def extensions_dir() -> str:
    """This installation's folder in torch's extension cache (a digest of `sys.prefix`)."""
    from torch.utils.cpp_extension import get_default_build_root

    digest = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return str(Path(get_default_build_root()) / f"launcher-{digest}")


def param_groups(model: torch.nn.Module, optim: OptimSpec) -> list[dict[str, Any]]:
    """Decay matrices only; biases and norm weights (1-D) are not decayed (HF Trainer's rule).

    With `optim.embedding_lr_scale` other than 1 the token-embedding matrix (and an output layer tied
    to it) gets a group of its own whose peak learning rate is scaled; the schedule scales every
    group's rate alike.
    """
    embedding = model.get_input_embeddings().weight if optim.embedding_lr_scale != 1.0 else None
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad and param is not embedding:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if embedding is not None and embedding.requires_grad:
        groups.append(
            {"params": [embedding], "weight_decay": optim.weight_decay, "lr": optim.lr * optim.embedding_lr_scale}
        )
    return groups


def build_engine(  # noqa: ANN201
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    stage: StageSpec,
    total_steps: int,
    device: torch.device,
    collective_timeout_s: float,
):
    """Initialise distributed (gloo on CPU, nccl on GPU) and wrap the model in a DeepSpeed engine.

    Under Ray Train the process group exists already (`TorchConfig(timeout_s=...)` set its timeout).
    """
    select_accelerator(device)
    import deepspeed
    from deepspeed.utils import logger as ds_logger
    from transformers import get_scheduler

    if not verbose():  # DeepSpeed's info lines: in the stage's log file if there is one, not on the console
        for handler in ds_logger.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
        if not any(isinstance(handler, logging.FileHandler) for handler in ds_logger.handlers):
            ds_logger.setLevel(logging.WARNING)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with quiet_stdout():  # DeepSpeed prints its op builds ("... built successfully") on every rank
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=collective_timeout_s)
        )

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return get_scheduler(
            _SCHEDULES[stage.schedule.kind],
            optimizer,
            num_warmup_steps=stage.schedule.warmup_steps,
            num_training_steps=total_steps,
        )

    with quiet_stdout():  # it builds DeepSpeed's communication op again where Ray made the process group
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, stage.optim),
            config=ds_config,
            lr_scheduler=schedule,
        )
    if engine.zero_optimization_stage() == 0 and torch.distributed.get_world_size() == 1:
        skip_single_rank_allreduce(engine)
        clip_single_rank_gradients(engine)
    return engine


def skip_single_rank_allreduce(engine: Any) -> None:
    """A world of one rank has nothing to average: skip ZeRO-0's gradient all-reduce after backward.

    DeepSpeed still flattens every gradient into a bucket, all-reduces it with itself and copies it
    back (13% of a MiniLM fine-tuning step on 2 CPU cores). `enable_backward_allreduce` is the
    engine's own switch (DeepSpeed clears it when there is no process group); it is not a
    documented option, so `tests/test_engine.py` fails loudly if DeepSpeed renames it.
    """
    assert hasattr(engine, "enable_backward_allreduce"), (
        "deepspeed renamed DeepSpeedEngine.enable_backward_allreduce (checked with the pinned 0.19.8)"
    )
    engine.enable_backward_allreduce = False


def clip_single_rank_gradients(engine: Any) -> None:
    """ZeRO-0 in fp32 on one rank: clip with one fused norm over all gradients, and record that norm.

    DeepSpeed's `clip_fp32_gradients` takes the norm parameter by parameter (~300 small ops a step for
    MiniLM), all-reduces it with itself and keeps no copy, so the loop took the norm a second time on
    logged steps. This is DeepSpeed's arithmetic on `torch._foreach_norm` (the same per-parameter
    norms, summed the same way, hence the same clipped gradients to the bit; `tests/test_engine.py`
    compares), without multiplying by a factor of 1 on the CPU, and it leaves the norm where
    `engine.get_global_grad_norm()` reads it.
    """

    def clip() -> torch.Tensor | None:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        total_norm = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2.0).sum().float().pow(0.5)
        device = total_norm.device
        clip_coef = torch.tensor([float(engine.gradient_clipping())], device=device) / (total_norm + 1e-6)
        clip_coef = torch.min(torch.tensor([1.0], device=device), clip_coef).reshape(())
        # A factor of 1 leaves every gradient as it is: on the CPU (where reading it costs no device sync)
        # skip that pass over all gradients (~10-25 ms a MiniLM step on 2 cores).
        if device.type != "cpu" or float(clip_coef) < 1.0:
            torch._foreach_mul_(grads, clip_coef)
        return total_norm

    deepspeed_internals.replace_fp32_clipping(engine, clip)
