"""Every private DeepSpeed name the launcher touches, in one place.

The public engine API (`initialize`, `backward`, `step`, `save_checkpoint`, `load_checkpoint`,
`zero.GatheredParameters`) covers training; four things need DeepSpeed's internals: a fused gradient
clip on one rank (the engine's clipping method and the norm it records), the memory report (the
ZeRO optimizers' fp32 partitions and ZeRO-3's per-parameter partition), the universal-checkpoint
converter (a module run as a script) and two repairs of its stage-3 load. Each is reached here and
nowhere else (torch and DeepSpeed are imported only when used: the driver reads `UNIVERSAL_CONVERTER`);
`CHECKED_WITH` is the DeepSpeed these names were read in, and `tests/test_internals.py`
fails loudly, naming what moved, on any other release.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CHECKED_WITH = "0.19.8"

# The converter `launcher.checkpoint_manifest.convert_to_universal` runs (`python -m`, in a subprocess).
UNIVERSAL_CONVERTER = "deepspeed.checkpoint.ds_to_universal"

# The fp32 partitions of ZeRO-1/2, ZeRO-3 and the bf16 optimizer, as each names its attribute.
_FP32_PARTITIONS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")

# (module, class or function, a name its source must hold): attributes set in `__init__` are found in the source.
_NAMES = (
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "def clip_fp32_gradients"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "self._global_grad_norm"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "self.single_partition_of_fp32_groups"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "self.fp32_partitioned_groups_flat"),
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "self.fp32_groups_flat_partition"),
    ("deepspeed.runtime.zero.partition_parameters", "Init", "ds_tensor"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "load_hp_checkpoint_state_from_checkpoint_dir"),
    (UNIVERSAL_CONVERTER, "main", "args.input_folder"),
    (UNIVERSAL_CONVERTER, "_extract_zero_shard_files_stage3", "extract_zero_shards_stage3"),
)


def import_deepspeed() -> Any:
    """`import deepspeed`, without the MLflow import DeepSpeed's autotuner makes when MLflow is installed.

    `deepspeed/__init__` imports `deepspeed.autotuning.autotuner`, which tries `import mlflow` for its own
    logging; with MLflow installed (the launcher's optional tracker) that adds ~1.4 s of imports (pandas,
    pyarrow) to every process that imports DeepSpeed, used or not. The launcher never runs the autotuner,
    so MLflow is hidden while DeepSpeed imports (the autotuner records it as absent) and is importable
    again right after; a process that imported MLflow already keeps it as it is.
    """
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def missing() -> list[str]:
    """The private names above that the installed DeepSpeed does not have (empty with the checked release)."""
    absent = []
    for module_name, owner, needle in _NAMES:
        try:
            target = getattr(importlib.import_module(module_name), owner)
            source = inspect.getsource(target)
        except (ImportError, AttributeError, OSError, TypeError):
            absent.append(f"{module_name}.{owner}")
            continue
        if needle not in source:
            absent.append(f"{module_name}.{owner}: {needle}")
    return absent


def replace_fp32_clipping(engine: Any, clip: Callable[[], torch.Tensor | None]) -> None:
    """Run `clip` where the engine clips fp32 gradients; the norm it returns is what
    `engine.get_global_grad_norm()` reads afterwards."""

    def clip_and_record() -> None:
        norm = clip()
        if norm is not None:
            engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_and_record


def torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside the engine's ZeRO / bf16 wrapper (the engine's own without one)."""
    wrapper = engine.optimizer
    return getattr(wrapper, "optimizer", wrapper)


def fp32_master_tensors(engine: Any) -> list[torch.Tensor]:
    """This rank's fp32 master partitions (ZeRO-1/2/3, bf16); empty where the optimizer keeps none."""
    wrapper = engine.optimizer
    keeps_master = engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()
    assert not keeps_master or any(hasattr(wrapper, name) for name in _FP32_PARTITIONS), (
        f"{type(wrapper).__name__} has none of {_FP32_PARTITIONS}: DeepSpeed renamed its fp32 partitions"
    )
    return [t for name in _FP32_PARTITIONS for t in (getattr(wrapper, name, None) or [])]


def local_weights(parameters: Iterable[torch.nn.Parameter]) -> Iterable[torch.Tensor]:
    """The part of each parameter this rank holds: ZeRO-3's partition (`ds_tensor`), else all of it."""
    return (getattr(p, "ds_tensor", p) for p in parameters)


def repair_stage3_universal_load(engine: Any, own_groups: list[dict[str, Any]]) -> None:
    """Two slips of DeepSpeed 0.19.8's stage-3 universal load (stage3.py
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`), each seen to bend the trajectory from the
    second step on: it copies the saved group 0's hyperparameters into every group (the no-decay group
    would decay), so `own_groups` (the same run's, taken before the load) go back; and it gives every
    group one shared `step` tensor, which Adam increments in place once per group and step."""
    import torch

    for group, own in zip(engine.optimizer.param_groups, own_groups, strict=True):
        group.update(own)
    for state in torch_optimizer(engine).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
