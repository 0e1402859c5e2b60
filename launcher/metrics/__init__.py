"""Monitoring: TensorBoard scalars, `metrics.jsonl`, a console progress line, throughput and MFU.

Only rank 0 builds a real `MetricsWriter`; other ranks get `NullWriter`, which does nothing, so the
loop never asks which rank it is.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from launcher import atomic

# Dense peak FLOP/s per GPU (bf16/fp16 tensor cores, fp32 without TF32) from vendor data sheets; None where
# the GPU has no such arithmetic (V100: no bf16). Matched against whole words of the device name.
GPU_PEAK_FLOPS: dict[str, dict[str, float | None]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "V100": {"bf16": None, "fp16": 125e12, "fp32": 15.7e12},
}


def gpu_peak_flops(name: str, precision: str) -> tuple[float, str]:
    """The table's peak for a CUDA device name (e.g. "NVIDIA L40S", "Tesla V100-SXM2-16GB"), or NaN and why."""
    words = set(re.findall(r"[A-Z0-9]+", name.upper()))
    for key, table in GPU_PEAK_FLOPS.items():
        if key in words:
            peak = table[precision]
            if peak is None:
                return float("nan"), f"{key} has no {precision} arithmetic"
            return peak, f"table ({key})"
    return float("nan"), f"unknown GPU {name!r}"


def measure_cpu_peak_flops(precision: str, shapes: list[tuple[int, int, int]] | None = None, repeats: int = 4) -> float:
    """FLOP/s of this CPU right now: the best of a few runs of a square 1024 matmul and of `shapes`
    ((m, k, n) products, e.g. the model's own layers at its batch), in the dtype named by `precision`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    best_rate = 0.0
    for m, k, n in [(1024, 1024, 1024), *(shapes or [])]:
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        best_rate = max(best_rate, 2 * m * k * n / max(best, 1e-9))
    return best_rate


def compute_precision(model: torch.nn.Module) -> str:
    """The precision `model` computes in, from its floating-point weights (what DeepSpeed cast it to)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def matmul_shapes(model: torch.nn.Module, tokens: int, limit: int = 3) -> list[tuple[int, int, int]]:
    """The largest (tokens x in) @ (in x out) products of `model`'s linear layers, at `tokens` rows."""
    shapes = {(tokens, m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sorted(shapes, key=lambda shape: (shape[1] * shape[2], shape), reverse=True)[:limit]


def peak_flops(
    device: torch.device, precision: str, shapes: list[tuple[int, int, int]] | None = None
) -> tuple[float, str]:
    """Per-device peak FLOP/s of `precision` and where the number comes from (a CPU's is measured with `shapes`)."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    return measure_cpu_peak_flops(precision, shapes), f"measured {precision} matmul"


def flops_per_token(model: torch.nn.Module, seq_len: int, head_fraction: float = 1.0) -> float:
    """Training FLOPs per token: 6·(N + f·V·h) + 12·L·H·Q·T (PaLM's appendix B count, embeddings apart).

    N: parameters of the model's matmuls, i.e. every parameter but the embedding tables looked up (token,
    position, token type) and the output projection V·h; that projection is counted on its own, at the
    fraction `f` of tokens it runs on (1 for causal LM; the masking rate for the sparse MLM head, which
    projects masked positions only), tied to the input embedding or not. 12·L·H·Q·T: attention scores
    and weighted values over a T-token sequence (L layers, H·Q = hidden size), forward and backward.
    """
    config = model.config
    lookups = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = sum(p.numel() for p in model.parameters())  # a tied weight once
    head = 0
    if output is not None and getattr(output, "weight", None) is not None:
        head = output.weight.numel()
        if id(output.weight) not in lookups:  # untied: counted in total as a parameter
            total -= head
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return 6 * (total - sum(lookups.values()) + head_fraction * head) + 12 * layers * hidden * seq_len


def _records(path: Path) -> list[str]:
    """The lines of a metrics.jsonl that parse; a line torn by a crash mid-write is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    good = []
    for line in lines:
        try:
            if isinstance(json.loads(line).get("step"), int):
                good.append(line)
        except (ValueError, AttributeError):
            pass
    if len(good) < len(lines):
        print(f"warning: {path}: {len(lines) - len(good)} unreadable line(s) dropped", file=sys.stderr, flush=True)
    return good


class NullWriter:
    """What ranks other than 0 get."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def text(self, tag: str, value: str) -> None:
        pass

    def progress(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsWriter(NullWriter):
    """TensorBoard + jsonl + console for rank 0. On resume, records after `start_step` are dropped."""

    def __init__(
        self, stage_dir: Path, stage_name: str, start_step: int, total_steps: int, sinks: Sequence[Any] = ()
    ) -> None:
        """`sinks`: more trackers, each with `log(step, scalars)` and `close()` (MLflow's, with `metrics.mlflow`)."""
        from torch.utils.tensorboard import SummaryWriter

        self.sinks = list(sinks)

        self.jsonl_path = stage_dir / "metrics.jsonl"
        kept = [line for line in _records(self.jsonl_path) if json.loads(line)["step"] <= start_step]
        atomic.write_text(self.jsonl_path, "".join(line + "\n" for line in kept))
        self.jsonl = self.jsonl_path.open("a")
        self.tb = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.stage_name = stage_name
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage_name, unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **scalars}) + "\n")
        self.jsonl.flush()
        self.tb.flush()
        for sink in self.sinks:
            sink.log(step, scalars)

    def text(self, tag: str, value: str) -> None:
        self.tb.add_text(tag, value)

    def progress(self, step: int, scalars: dict[str, float]) -> None:
        """A log step carries train scalars, an eval step eval scalars, some steps both."""
        train = ""
        if "train/loss" in scalars:
            train = f" loss {scalars['train/loss']:.4f} tok/s {scalars['train/tokens_per_sec']:,.0f}"
        evals = "".join(  # per-type figures (`eval/f1/person`) are for TensorBoard, not this line
            f" {key} {value:.4f}" for key, value in scalars.items() if key.startswith("eval/") and key.count("/") == 1
        )
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str((train + evals).strip(), refresh=True)
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        print(f"[{self.stage_name}] step {step}/{self.total_steps}{train}{evals} eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        self.tb.close()
        for sink in self.sinks:
            sink.close()


def json_safe(value: Any) -> Any:
    """Floats that JSON can hold (NaN/inf become None)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value
