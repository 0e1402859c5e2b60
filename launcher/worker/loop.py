"""The training loop of one rank: accumulation, cadence (log, eval, checkpoint), stop requests.

Randomness is re-derived at every step, so a resumed step draws exactly the numbers the
uninterrupted run drew: masking, dropout and data order need no saved RNG stream. Training draws
are keyed by (seed, step, global micro-batch index), not by rank, so with the same global batch
the samples, masks and dropout of a step are the same on 1 worker with accumulation 2 as on 2
workers without: the run's trajectory does not depend on the worker count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.data.sampler import StepSampler
from launcher.errors import RunError
from launcher.hooks import StepCallback, StopPolicy
from launcher.jobspec.models import StageSpec, best_maximises
from launcher.jobspec.plan import StagePlan, steps_per_epoch
from launcher.metrics import NullWriter
from launcher.tasks import Task
from launcher.worker.context import RankContext
from launcher.worker.deepspeed_io import save_checkpoint
from launcher.worker.watchdog import StepWatchdog

Batch = dict[str, torch.Tensor]
MAX_SKIPPED_IN_A_ROW = 10  # optim.skip_nonfinite: more non-finite steps in a row than this stop the stage


@dataclass
class TrainState:
    """What a checkpoint carries beyond DeepSpeed's own state."""

    step: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    last_train_loss: float = float("nan")
    eval: dict[str, float] = field(default_factory=dict)
    best_value: float | None = None  # `best_metric` at its best evaluation so far, and that step
    best_step: int | None = None
    evals_since_best: int = 0
    early_stopped: bool = False  # ended by `early_stopping_patience` before its last step


def step_seed(seed: int, step: int, index: int, purpose: int) -> int:
    return int(np.random.SeedSequence([seed, step, index, purpose]).generate_state(1)[0])


class BatchAhead:
    """Builds the next training micro-batch in a background thread while the current one trains.

    The host-side work of a batch (reading samples, masking, image augmentation, the copy to the
    device) otherwise waits for the step before it: on a GPU the loop syncs once a step (the loss's
    all-reduce), so the device idles while the host builds. On a CPU the step already has every core,
    so the loop builds in line there (`Loop.build_ahead`). `make(step, micro)` runs on the loop's
    thread (indices, the micro-batch's generator) and returns the build; only the build runs ahead.
    The collates draw only from that generator, so the batches are exactly those built in line.
    """

    def __init__(
        self, make: Callable[[int, int], Callable[[], tuple[Batch, int]]], steps: int, accum: int, ahead: bool = True
    ) -> None:
        self._make, self._accum = make, accum
        self._steps_ahead = steps if ahead else 0  # off: every batch built in line, on this thread
        # One intra-op thread there (OpenMP's count is per calling thread): a second full team of threads
        # beside the step's own oversubscribes the cores (benchmarks/README, "Images against HF Trainer").
        self._pool = ThreadPoolExecutor(1, "batch-ahead", initializer=torch.set_num_threads, initargs=(1,))
        self._pending: tuple[tuple[int, int], Future[tuple[Batch, int]]] | None = None

    def take(self, step: int, micro: int) -> tuple[Batch, int]:
        """Micro-batch `micro` of `step` (built ahead when it was the one expected), and the next one started."""
        pending, self._pending = self._pending, None
        assert pending is None or pending[0] == (step, micro), f"took {(step, micro)}, built {pending[0]}"
        batch = self._make(step, micro)() if pending is None else pending[1].result()
        following = (step, micro + 1) if micro + 1 < self._accum else (step + 1, 0)
        if following[0] < self._steps_ahead:
            self._pending = (following, self._pool.submit(self._make(*following)))
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Loop:
    engine: Any
    task: Task
    stage: StageSpec
    plan: StagePlan
    ctx: RankContext
    writer: NullWriter
    checkpoints: Path
    seed: int
    train_set: Any
    eval_set: Any
    flops_per_token: float
    peak_flops: float
    checkpoint_meta: dict[str, Any]
    stop: StopPolicy = field(default_factory=StopPolicy)  # asked on rank 0 after every step
    callbacks: Sequence[StepCallback] = ()  # called before every step (sample trace, test hooks)
    watchdog: StepWatchdog | None = None  # told of every step, eval batch and checkpoint
    measure_peak: Callable[[], float] | None = None  # measures the device's peak again (CPUs: a noisy figure)
    build_ahead: bool | None = None  # build the next micro-batch during the step (BatchAhead); None: on a GPU
    _mfu_warned: bool = False
    checkpoint_s: float = 0.0  # time spent saving checkpoints in this session

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation. Above 1 the peak was measured low (a busy CPU): measured again, the larger
        kept; still above 1, it is not a figure to log (NaN, one warning)."""
        mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.ctx.world_size)
        if mfu > 1.0 and self.measure_peak is not None:
            self.peak_flops = max(self.peak_flops, self.measure_peak())
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.ctx.world_size)
        if mfu > 1.0:
            if not self._mfu_warned and self.ctx.is_main:
                print(
                    f"warning: stage {self.stage.name}: MFU {mfu:.0%} is above 100%: the device's peak "
                    f"({self.peak_flops:.3g} FLOP/s) is below what ran; train/mfu is logged as NaN",
                    flush=True,
                )
            self._mfu_warned = True
            return math.nan
        return mfu

    def _batch(self, dataset: Any, indices: list[int], generator: torch.Generator) -> tuple[Batch, int]:
        """The collated micro-batch on the device, and its real tokens (counted on the host: no device sync)."""
        batch = self.task.collate([dataset[i] for i in indices], generator)
        tokens = self.task.num_tokens(batch)
        device = self.ctx.device
        if device.type == "cuda":  # pinned pages copy asynchronously, overlapping the queued kernels
            return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}, tokens
        return {key: value.to(device) for key, value in batch.items()}, tokens

    def _all_reduce(self, values: list[float | torch.Tensor]) -> list[float]:
        """Sum over ranks; device tensors (e.g. a summed loss) join without being read first: one sync in all.

        One rank has nothing to sum with: no collective (on the CPU a round trip through gloo's loopback
        socket, ~0.3 ms a step)."""
        device = self.ctx.device
        tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def _stop_requested(self, step: int) -> bool:
        """Rank 0's view of the stop policy; the caller shares it with every rank."""
        return self.ctx.is_main and self.stop.requested(step)

    def _skipped_nonfinite(self, step: int, train_loss: float, skipped_before: int) -> bool:
        """Whether step `step` was a non-finite one that DeepSpeed skipped (`optim.skip_nonfinite`).

        Every rank sees the same all-reduced loss, so all decide alike. A non-finite loss otherwise
        stops the stage here, before anything is saved. ZeRO-1/2/3 and the fp16/bf16 optimizers skip
        an update whose gradient norm is not finite (`engine.skipped_steps` counts them); ZeRO-0 in
        fp32 applies it, hence the spec refuses `skip_nonfinite` there and this checks it happened.
        """
        skipped = self.engine.skipped_steps > skipped_before
        if math.isfinite(train_loss):
            if skipped and self.ctx.is_main:
                print(f"warning: step {step}: DeepSpeed skipped the update (gradient norm not finite)", flush=True)
            return False
        if not (self.stage.optim.skip_nonfinite and skipped):
            raise RunError(
                f"stage {self.stage.name}: the training loss is {train_loss} at step {step}; stopped without "
                "saving (the last committed checkpoint is kept). Lower optim.lr or raise the warmup."
            )
        if self.ctx.is_main:
            print(f"warning: step {step}: loss {train_loss}, update skipped (optim.skip_nonfinite)", flush=True)
        return True

    def _beat(self, step: int | None = None) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(self.watchdog.step if step is None else step)

    def _grad_norm(self) -> float | None:
        """Pre-clipping global norm where the engine records none (ZeRO-0 in fp32, unless its clipping records it).

        An engine that recorded a norm at the last step records this one too (`clip_single_rank_gradients`).
        """
        engine = self.engine
        if (
            engine.zero_optimization_stage() == 0
            and not engine.bfloat16_enabled()
            and engine.get_global_grad_norm() is None
        ):
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            return float(torch.nn.utils.get_total_norm(grads)) if grads else None
        return None

    def _eval_interval(self) -> int:
        """Steps between evaluations (0: only at the end): `eval_every`, or `eval_every_epochs` in steps."""
        stage, plan = self.stage, self.plan
        intervals = [stage.eval_every] if stage.eval_every else []
        if stage.eval_every_epochs is not None:
            per_epoch = steps_per_epoch(len(self.train_set), plan.global_batch_size)
            intervals.append(max(1, round(stage.eval_every_epochs * per_epoch)))
        return min(intervals, default=0)

    def _track_best(self, state: TrainState) -> None:
        """After an evaluation: is `best_metric` better than the best so far? (The same on every rank: the
        eval sums are all-reduced.)"""
        name = self.stage.best_metric
        if name is None:
            return
        value = state.eval.get(name.removeprefix("eval/"), math.nan)
        maximise = best_maximises(name, self.stage.best_mode)
        better = state.best_value is None or (value > state.best_value if maximise else value < state.best_value)
        if better and math.isfinite(value):
            state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
        else:
            state.evals_since_best += 1

    def evaluate(self) -> dict[str, float]:
        """Every rank evaluates its strided share; all ranks run the same number of batches (ZeRO-3)."""
        size = self.plan.eval_batch_size
        mine = list(range(self.ctx.rank, len(self.eval_set), self.ctx.world_size))
        num_batches = math.ceil(math.ceil(len(self.eval_set) / self.ctx.world_size) / size)
        if self.stage.eval_max_batches is not None:
            num_batches = min(num_batches, self.stage.eval_max_batches)
        sums = self.task.empty_sums()
        self.engine.eval()
        with torch.inference_mode():  # no autograd bookkeeping (version counters, views) at all
            for b in range(num_batches):
                indices = mine[b * size : (b + 1) * size]
                generator = torch.Generator().manual_seed(step_seed(self.seed, b, self.ctx.rank, purpose=2))
                batch, _ = self._batch(self.eval_set, indices or [0], generator)
                outputs = self.engine(**batch)
                self._beat()
                if indices:
                    sums = sums + self.task.eval_sums(outputs, batch)
        self.engine.train()
        return self.task.eval_metrics(sums.with_values(self._all_reduce(sums.values())))

    def run(self, state: TrainState) -> tuple[TrainState, bool]:
        """Train until `plan.steps`; returns (state, stopped early on request)."""
        assert self.plan.steps is not None
        sampler = StepSampler(
            len(self.train_set), self.plan.micro_batch_size, self.plan.grad_accum_steps,
            self.ctx.world_size, self.ctx.rank, self.seed, self.task.sample_lengths(self.train_set),
        )  # fmt: skip
        self.engine.train()
        on_gpu = self.ctx.device.type == "cuda"
        ahead = BatchAhead(
            partial(self._train_batch, sampler), self.plan.steps, self.plan.grad_accum_steps,
            on_gpu if self.build_ahead is None else self.build_ahead,
        )  # fmt: skip
        try:
            return self._run(state, sampler, ahead)
        finally:
            ahead.close()
            for callback in self.callbacks:
                callback.close()

    def _micro_index(self, micro: int) -> int:
        """The micro-batch's place among all ranks' micro-batches of a step: it keys the step's random draws."""
        return self.ctx.rank * self.plan.grad_accum_steps + micro

    def _train_batch(self, sampler: StepSampler, step: int, micro: int) -> Callable[[], tuple[Batch, int]]:
        """The build of training micro-batch `micro` of `step`: its samples and masking generator drawn here."""
        indices = sampler.micro_batches(step)[micro]
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, self._micro_index(micro), purpose=1))
        return partial(self._batch, self.train_set.for_epoch(sampler.epoch_of(step)), indices, generator)

    def _run(self, state: TrainState, sampler: StepSampler, ahead: BatchAhead) -> tuple[TrainState, bool]:
        stage = self.stage
        assert self.plan.steps is not None
        eval_interval = self._eval_interval()
        window_losses: list[float] = []
        window_tokens, window_start = 0, time.perf_counter()
        session_start, wall_before = time.perf_counter(), state.wall_s
        skipped_in_a_row = 0
        self._beat(state.step)
        while state.step < self.plan.steps:
            step = state.step
            micro_batches = sampler.micro_batches(step)
            for callback in self.callbacks:
                callback.before_step(step, micro_batches)
            done = step + 1 == self.plan.steps
            logged = (step + 1) % stage.log_every == 0 or done or step == 0  # step 1: a sign of life
            loss_sum: torch.Tensor | float = 0.0  # stays on the device: no host sync per micro-batch
            skipped_before = self.engine.skipped_steps
            tokens, grad_norm = 0, None
            for micro in range(len(micro_batches)):
                torch.manual_seed(step_seed(self.seed, step, self._micro_index(micro), purpose=0))  # dropout
                batch, batch_tokens = ahead.take(step, micro)
                loss = self.engine(**batch).loss
                self.engine.backward(loss)
                if logged and micro == self.plan.grad_accum_steps - 1:
                    grad_norm = self._grad_norm()
                self.engine.step()
                loss_sum = loss_sum + loss.detach()
                tokens += batch_tokens
            loss_sum, tokens, stop = self._all_reduce([loss_sum, float(tokens), float(self._stop_requested(step + 1))])
            state.step = step + 1
            self._beat(state.step)
            state.tokens += int(tokens)
            train_loss = loss_sum / (self.plan.grad_accum_steps * self.ctx.world_size)
            if self._skipped_nonfinite(state.step, train_loss, skipped_before):
                skipped_in_a_row += 1
            else:
                skipped_in_a_row = 0
                window_losses.append(train_loss)
            if skipped_in_a_row > MAX_SKIPPED_IN_A_ROW:
                raise RunError(
                    f"stage {stage.name}: {skipped_in_a_row} steps in a row up to step {state.step} had a loss "
                    "that is not finite; stopped (the last committed checkpoint is kept). Lower optim.lr."
                )
            window_tokens += int(tokens)
            state.wall_s = wall_before + time.perf_counter() - session_start
            scalars: dict[str, float] = {}
            if logged:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                rate = window_tokens / elapsed
                if grad_norm is None:
                    grad_norm = self.engine.get_global_grad_norm()
                state.last_train_loss = sum(window_losses) / len(window_losses) if window_losses else math.nan
                scalars = {
                    "train/loss": state.last_train_loss,
                    "train/lr": float(self.engine.get_lr()[0]),
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "train/tokens_per_sec": rate,
                    "train/mfu": self._mfu(rate),
                    "train/epoch": sampler.epoch_of(step),
                    "train/tokens": float(state.tokens),
                }
                window_losses, window_tokens, window_start = [], 0, time.perf_counter()
            paused = time.perf_counter()  # eval and checkpoint time do not count towards tokens/s
            evaluated = bool(eval_interval and state.step % eval_interval == 0) or done
            if evaluated:
                state.eval = self.evaluate()
                scalars.update({f"eval/{key}": value for key, value in state.eval.items()})
                self._track_best(state)
            patience = stage.early_stopping_patience
            early = bool(patience and evaluated and not done and state.evals_since_best >= patience)
            if scalars:
                self.writer.log(state.step, scalars)
                self.writer.progress(state.step, scalars)
            checkpoint_due = (stage.checkpoint_every and state.step % stage.checkpoint_every == 0) or done
            checkpoint_due = checkpoint_due or early or (evaluated and stage.best_metric is not None)
            if early:
                state.early_stopped = True
                if self.ctx.is_main:
                    print(f"stage {stage.name}: early stop at step {state.step}: {stage.best_metric} has not improved "
                          f"for {patience} evaluations (best {state.best_value:.4f} at step {state.best_step})",
                          flush=True)  # fmt: skip
            if checkpoint_due or stop:
                saving = time.perf_counter()
                save_checkpoint(
                    self.engine, self.ctx, self.checkpoints, state.step, {"train_state": asdict(state)},
                    self.checkpoint_meta, stage.keep_checkpoints, {"step": state.step, "train_loss": train_loss},
                    protect=state.best_step,
                )  # fmt: skip
                self.checkpoint_s += time.perf_counter() - saving
            if early:
                return state, False
            self._beat()
            window_start += time.perf_counter() - paused
            if stop and not done:
                if self.ctx.is_main:
                    self.stop.honoured()  # the re-run must not stop
                return state, True
        return state, False
