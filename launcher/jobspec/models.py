"""The job spec: typed, documented, strict (unknown keys are errors).

Each section is its own model, and each builder later receives only its own section. Values that
derive from others (global batch, total steps, accumulation) are computed in `launcher.jobspec.plan`,
never stored twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from launcher.jobspec.presets import preset_fields, preset_vocab_size

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Section(BaseModel):
    """Base for every spec section: unknown keys are rejected, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClusterSpec(Section):
    """Where the job runs. `--local` ignores this section and runs one process."""

    num_workers: int = Field(
        default=0,
        ge=0,
        description="Training workers (ranks). 0 means one in-process rank (debug mode, no Ray).",
    )
    use_gpu: bool = Field(default=False, description="Give each worker one GPU (nccl) instead of CPU (gloo).")
    gpu_memory_gb: float | None = Field(
        default=None,
        gt=0.0,
        description="Memory of each worker's GPU in GiB (e.g. 80 for an H100). When set, `validate` and `run` "
        "check every stage's per-worker memory plan (model states + activations) against 90% of it and refuse "
        "a stage that does not fit, naming the changes that would make it fit.",
    )
    cpus_per_worker: PositiveInt = Field(default=1, description="CPU cores reserved for each worker.")
    address: str | None = Field(
        default=None,
        description="Ray cluster address to join; RAY_ADDRESS wins; neither starts a private Ray for the command.",
    )
    max_failures: int = Field(default=1, ge=0, description="Worker failures a stage survives (Ray restarts it).")
    collective_timeout_s: PositiveInt = Field(
        default=300,
        description="Seconds a collective (all-reduce, barrier) waits for the other ranks before the stage fails "
        "(torch's default is 30 minutes); raise it if saving a checkpoint or the export takes longer.",
    )
    step_timeout_s: PositiveInt | None = Field(
        default=900,
        description="Seconds a rank may go without progress (a training step, an eval batch, a checkpoint) before "
        "it is ended with a message naming it and its last step; Ray then restarts the stage from its last "
        "committed checkpoint while max_failures allows. null: no watchdog.",
    )
    slurm: SlurmSpec = Field(default_factory=lambda: SlurmSpec(), description="Allocation for `launcher slurm`.")


class SlurmSpec(Section):
    """What `launcher slurm` asks SLURM for. The worker count is derived from the allocation."""

    nodes: PositiveInt = Field(default=1, description="Nodes to allocate (`--nodes`); Ray runs one node per host.")
    gpus_per_node: int = Field(default=0, ge=0, description="GPUs per node (`--gpus-per-node`); one worker each.")
    cpus_per_node: PositiveInt = Field(default=8, description="CPU cores per node (`--cpus-per-task`, one task).")
    time_limit: str = Field(
        default="24:00:00", pattern=r"^[0-9]+(-[0-9]+)?(:[0-9]+){0,2}$", description="Wall-clock limit (`--time`)."
    )
    partition: str | None = Field(default=None, description="Partition (`--partition`); the cluster default if unset.")
    account: str | None = Field(default=None, description="Account to charge (`--account`).")
    job_name: str | None = Field(default=None, description="SLURM job name; the spec's `name` if unset.")
    preempt_grace_s: PositiveInt = Field(
        default=120, description="Seconds before the time limit or preemption at which SIGUSR1 asks for a checkpoint."
    )
    requeue_on_term: bool = Field(
        default=False,
        description="Also checkpoint and requeue on a SIGTERM to the batch script (`scancel --signal=TERM --batch`); "
        "a plain `scancel` TERMs every step and srun then kills its tasks at once.",
    )

    @field_validator("partition", "account", "job_name")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and (not value or not value.isprintable()):
            raise ValueError("must be non-empty printable text (no newlines or control characters)")
        return value


class MlflowSpec(Section):
    """MLflow as a second tracker beside TensorBoard: a run per stage, nested under a run for the job."""

    tracking_uri: str | None = Field(
        default=None,
        description="Where runs go: a tracking server (`http://host:5000`) or a database URI; default a SQLite "
        "store in the job's folder (`<output_dir>/<name>/mlflow.db`, artifacts in `mlartifacts/` beside it; view it "
        "with `mlflow ui --backend-store-uri sqlite:///<that file>`). Needs the `mlflow` extra "
        "(`pip install -e '.[mlflow]'`). An unreachable server is a warning: the job runs with TensorBoard alone.",
    )
    experiment: str | None = Field(default=None, description="MLflow experiment of the runs; default the job's name.")


class MetricsSpec(Section):
    """Trackers besides TensorBoard, metrics.jsonl and the console (always written)."""

    mlflow: MlflowSpec | None = Field(
        default=None,
        description="Also log to MLflow (`mlflow: {}` for the local store): each stage's resolved spec as params, "
        "its metrics at every logged step, its export and summary as artifacts.",
    )


class DeepSpeedSpec(Section):
    """The DeepSpeed engine every rank builds; the JSON config is generated from this section."""

    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="ZeRO stage: 0 (DDP), 1, 2 or 3.")
    offload_optimizer: bool = Field(default=False, description="Keep optimizer state in CPU memory (ZeRO >= 1).")
    offload_param: bool = Field(default=False, description="Keep parameters in CPU memory (ZeRO 3 only).")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSpec:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage >= 1")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param: needs zero_stage 3")
        return self


class ModelSpec(Section):
    """The network: a `transformers` family built from a preset or these sizes, or a local HF-format directory."""

    preset: str | None = Field(
        default=None,
        description="A published architecture whose sizes fill this section (fields set here win): "
        "bert-base, bert-large, gpt2, gpt2-medium, smollm2-135m, smollm2-360m, tinyllama-1.1b (text; they also set "
        "tokenizer.vocab_size unless the stage does), vit-base-patch16, resnet-18, resnet-50 (images). Listed "
        "with their sources in launcher/jobspec/presets.py.",
    )
    family: Literal["bert", "gpt2", "llama", "vit", "resnet"] = Field(
        default="bert",
        description="Architecture family: bert, gpt2, llama (text); vit, resnet (images: tasks image_classification "
        "and mae, which needs vit).",
    )
    path: str | None = Field(
        default=None,
        description="Local HF-format model directory to load instead of building from sizes.",
    )
    hidden_size: PositiveInt = Field(default=128, description="Width of the residual stream.")
    num_layers: PositiveInt = Field(default=2, description="Transformer blocks.")
    num_heads: PositiveInt = Field(default=2, description="Attention heads per block.")
    num_kv_heads: PositiveInt | None = Field(
        default=None, description="llama: key/value heads (grouped-query attention); default num_heads."
    )
    intermediate_size: PositiveInt | None = Field(default=None, description="MLP width; default 4 x hidden_size.")
    max_position_embeddings: PositiveInt = Field(default=512, description="Longest sequence the model accepts.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout on hidden states and attention.")
    tie_embeddings: bool | None = Field(
        default=None,
        description="Share the token embeddings with the output layer; default the family's (bert and gpt2 tie, "
        "llama does not).",
    )
    rope_theta: float | None = Field(default=None, gt=0.0, description="llama: RoPE base; default transformers'.")
    norm_eps: float | None = Field(
        default=None, gt=0.0, description="Epsilon of the norm layers; default the family's."
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each transformer block's activations in the backward pass instead of keeping them "
        "(non-reentrant torch checkpointing): activation memory drops to about one block's, for one more forward "
        "pass per step. Same losses.",
    )
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="Attention kernel: sdpa (torch's scaled_dot_product_attention), eager (plain matmuls), or "
        "flash_attention_2 (needs the flash-attn package and a CUDA GPU).",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the model before training (needs a C compiler on CPU; the first steps "
        "compile, later ones run the compiled code).",
    )
    patch_size: PositiveInt = Field(
        default=16, description="vit: side of the square patches an image is cut into (one token each)."
    )
    depths: list[PositiveInt] | None = Field(
        default=None,
        description="resnet: residual blocks per stage, one entry per stage (the first stage's output hidden_size "
        "wide, each later one twice the one before; the stem a quarter of hidden_size with bottleneck blocks, all "
        "of it with basic ones); default [2] x num_layers.",
    )
    block: Literal["basic", "bottleneck"] = Field(
        default="basic",
        description="resnet: the residual block, basic (two 3x3 convolutions, ResNet-18/34) or bottleneck (1x1, "
        "3x3, 1x1 at a quarter of the width, ResNet-50 and deeper).",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        try:
            fields = preset_fields(str(data["preset"]))
        except ValueError as exc:
            raise ValueError(f"preset: {exc}") from None
        return {**fields, **data}

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.num_kv_heads is not None:
            if self.family != "llama":
                raise ValueError("num_kv_heads: only the llama family has grouped-query attention")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if self.rope_theta is not None and self.family != "llama":
            raise ValueError("rope_theta: only the llama family uses rotary position embeddings")
        for name in ("depths", "block"):
            if name in self.model_fields_set and self.family != "resnet":
                raise ValueError(f"{name}: a setting of the resnet family")
        if "patch_size" in self.model_fields_set and self.family != "vit":
            raise ValueError("patch_size: a setting of the vit family")
        return self


class TokenizerSpec(Section):
    """Where the vocabulary comes from.

    Without `source`, a stage with `init_from` reuses that model's tokenizer, and any other stage
    trains one on its own training corpus (WordPiece for bert, byte-level BPE for gpt2 and llama).
    """

    source: str | None = Field(
        default=None,
        description="An earlier stage's name (reuse its tokenizer) or a local tokenizer directory.",
    )
    vocab_size: PositiveInt = Field(default=8000, description="Vocabulary size when training a tokenizer.")
    lowercase: bool = Field(default=True, description="Lowercase text before WordPiece (bert family only).")
    max_train_docs: PositiveInt | None = Field(
        default=None, description="Train the vocabulary on at most this many documents (all when unset)."
    )
    max_train_bytes: PositiveInt = Field(
        default=200_000_000,
        description="Train the vocabulary on the first documents up to this many characters (streamed; "
        "a vocabulary gains little from more, and the trainer's word counts grow with it).",
    )


class SourceSpec(Section):
    """One corpus of a pre-training mixture and its share of the training samples."""

    path: list[str] = Field(description="Files or globs of this source (a single string is accepted).")
    weight: float = Field(gt=0.0, description="Relative share of training samples drawn from this source.")

    @field_validator("path", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one file or glob")
        return value


class DataSpec(Section):
    """Corpus files, streamed: txt (one document per line), jsonl/json (one object per line), csv, parquet;
    each may be compressed (.gz, .bz2, .xz, .zst)."""

    train: list[str] = Field(
        default_factory=list, description="Training files or globs (a single string is accepted); or `sources`."
    )
    sources: list[SourceSpec] = Field(
        default_factory=list,
        description="Pre-training mixture instead of `train`: sources drawn in proportion to their weights "
        "(each epoch holds as many samples as all sources together; a source with a larger share than its "
        "size repeats, in a fresh order on each pass; one with a smaller share moves on through its samples).",
    )
    eval: list[str] = Field(default_factory=list, description="Evaluation files or globs; empty: split eval_fraction.")
    eval_fraction: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="Share of train held out for eval when `eval` is empty: each document is held out when a "
        "seeded hash of its text falls below it (streamed, order-free; equal texts share a split).",
    )
    validation_fraction: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="classification, token_classification: hold out this share of the training documents (after "
        "max_train_samples) as the validation set that evaluation during training, best_metric and early stopping "
        "read, drawn by the job's seed and, for classification, in each label's proportion (scikit-learn's "
        "stratified train_test_split). The eval set (`eval` files or the eval_fraction hold-out) is then the test "
        "set: scored once, on the exported model, into the summary's `test`. Default: none (evaluation reads the "
        "eval set).",
    )
    text_field: str = Field(default="text", description="Column holding the text (jsonl/csv/parquet).")
    label_field: str = Field(default="label", description="Column holding the label (classification).")
    labels: list[str] = Field(
        default_factory=list,
        description="The label set, in class-id order (classification); the tag set (token_classification, e.g. "
        "O, B-PER, I-PER: IOB2 is checked when every tag is O, B-X or I-X).",
    )
    tokens_field: str = Field(
        default="tokens",
        description="token_classification, jsonl: the field holding a sentence's words (a list); default `tokens`.",
    )
    tags_field: str = Field(
        default="tags",
        description="token_classification, jsonl: the field holding one tag per word (a list of tag names); "
        "default `tags`. CoNLL column files (.conll: a word per line, its tag in the last column, blank lines "
        "between sentences, -DOCSTART- lines skipped) need no field names.",
    )
    label_all_subtokens: bool = Field(
        default=False,
        description="token_classification: label every sub-token of a word (B-X continued as I-X) instead of its "
        "first only (the rest ignored by the loss and the metrics, as HF's run_ner.py does); default false.",
    )
    seq_len: PositiveInt = Field(default=128, description="Tokens per packed block (pre-training) or max length.")
    max_train_samples: PositiveInt | None = Field(
        default=None, description="Use at most this many train documents (the first; per source of a mixture)."
    )
    max_eval_samples: PositiveInt | None = Field(default=None, description="Use at most this many eval documents.")
    document_mask: bool = Field(
        default=False,
        description="clm: attention stays within each document packed into a block (block-diagonal causal "
        "mask, positions restarting per document; the first token of a later document is not a target). Costs "
        "a batch x seq_len^2 mask per step and the model's masked (not fused causal) attention path.",
    )
    group_by_length: bool = Field(
        default=False,
        description="classification: batch documents of similar length together (HF's group_by_length): runs "
        "of 50 global batches of the shuffled order are sorted by length, cut into batches again and visited in a "
        "shuffled order, so little of each batch is padding. Off by default, as in HF. Packed mlm/clm blocks all "
        "have seq_len tokens: not for them.",
    )
    max_document_bytes: PositiveInt = Field(
        default=16 << 20,
        description="Longest document (line) read, in bytes; a longer one is refused with its file and offset "
        "(memory per preparation task stays bounded).",
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _train_or_sources(self) -> DataSpec:
        if bool(self.train) == bool(self.sources):
            raise ValueError("train: give training files in `train` or a mixture in `sources` (one of them)")
        return self

    def train_sources(self) -> list[SourceSpec]:
        """The training corpus as a mixture: `train` is one source of weight 1."""
        return self.sources or [SourceSpec(path=self.train, weight=1.0)]

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("labels must be unique")
        return value


class BatchSpec(Section):
    """Batch sizes. The global batch is derived: micro_batch_size x grad_accum_steps x workers."""

    micro_batch_size: PositiveInt = Field(default=8, description="Sequences per rank per forward pass.")
    grad_accum_steps: PositiveInt | None = Field(
        default=None, description="Micro-batches per optimizer step; derived from global_batch_size when unset."
    )
    global_batch_size: PositiveInt | None = Field(
        default=None, description="Optional check/target: must equal micro x accumulation x workers."
    )
    eval_batch_size: PositiveInt | None = Field(default=None, description="Sequences per rank per eval batch.")


class OptimSpec(Section):
    """AdamW, as in the HF Trainer recipe (no decay on biases and norms)."""

    lr: float = Field(default=5e-4, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.01, ge=0.0, description="Decoupled weight decay.")
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="Adam beta1.")
    beta2: float = Field(default=0.999, ge=0.0, lt=1.0, description="Adam beta2.")
    eps: float = Field(default=1e-8, gt=0.0, description="Adam epsilon.")
    grad_clip: float = Field(default=1.0, ge=0.0, description="Clip the global gradient norm (0 disables).")
    embedding_lr_scale: float = Field(
        default=1.0,
        gt=0.0,
        description="Multiplier of `lr` for the token-embedding matrix (and an output layer tied to it); the "
        "schedule applies alike. Below 1 it keeps embeddings that start from something (`embedding_init: "
        "cooccurrence`, an `init_from` model) from being overwritten while the rest of the network learns.",
    )
    skip_nonfinite: bool = Field(
        default=False,
        description="Skip a step whose loss is NaN or infinite (weights and optimizer state untouched, a warning) "
        "instead of stopping the stage; more than 10 in a row still stop it. Needs deepspeed.zero_stage >= 1, "
        "whose optimizer skips such an update.",
    )


class ScheduleSpec(Section):
    """Learning-rate schedule over the stage's total steps."""

    kind: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Decay after warmup.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup from 0 to the peak lr.")


class EmbeddingInitSpec(Section):
    """How a fresh pre-training stage (mlm, clm, rtd; no init_from or model.path) starts its token embeddings."""

    method: Literal["random", "cooccurrence"] = Field(
        default="random",
        description="`random` (the model's own init) or `cooccurrence`: before step 1, each token's vector is its "
        "row of the truncated SVD of the positive PMI of token co-occurrences (within 5 positions of one training "
        "document; the first 100 M training tokens), scaled to `std`; seconds on a CPU. Similar words then start "
        "with similar vectors, which masked LM alone learns slowly. Resuming keeps the checkpoint's embeddings.",
    )
    std: float = Field(
        default=0.3,
        gt=0.0,
        description="Standard deviation the co-occurrence vectors are scaled to; against the position embeddings' "
        "0.02 it sets how much they weigh after the embedding LayerNorm.",
    )


class MaskedLMSpec(Section):
    """Task mlm: BERT's masking (of the chosen tokens 80% become [MASK], 10% a random token, 10% stay)."""

    mask_probability: float = Field(default=0.15, gt=0.0, lt=1.0, description="Share of real tokens predicted.")


class ReplacedTokenSpec(Section):
    """Task rtd (ELECTRA): a small generator fills masked positions, the discriminator spots the replacements."""

    mask_probability: float = Field(default=0.15, gt=0.0, lt=1.0, description="Share of real tokens masked.")
    generator_size: float = Field(
        default=0.25,
        gt=0.0,
        le=1.0,
        description="Generator width as a share of the discriminator's: hidden size, heads and MLP width are "
        "scaled by it, depth and embeddings are shared (ELECTRA: 1/4 to 1/2).",
    )
    discriminator_weight: float = Field(
        default=50.0,
        gt=0.0,
        description="Weight of the discriminator's replaced-token loss against the generator's masked-LM loss "
        "(ELECTRA: 50).",
    )


class SweepParam(Section):
    """The values one field takes across a sweep's trials: exactly one of a grid or a distribution."""

    grid: list[Any] | None = Field(
        default=None, description="Every value, each tried with every value of the other grid fields."
    )
    choice: list[Any] | None = Field(default=None, description="Each trial draws one of these values.")
    uniform: tuple[float, float] | None = Field(default=None, description="Each trial draws from [low, high).")
    loguniform: tuple[float, float] | None = Field(
        default=None, description="Each trial draws from [low, high) on a log scale (e.g. learning rates)."
    )
    randint: tuple[int, int] | None = Field(default=None, description="Each trial draws a whole number in [low, high).")

    @model_validator(mode="after")
    def _one_kind(self) -> SweepParam:
        given = [
            name for name in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of grid, choice, uniform, loguniform, randint (got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind}: needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind}: low {value[0]} is not below high {value[1]}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: low {value[0]} must be positive")
        return self

    def kind(self) -> str:
        return next(
            name for name in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, name) is not None
        )


class AshaSpec(Section):
    """ASHA early termination (Ray Tune's ASHAScheduler): at each rung the best 1/reduction_factor go on."""

    grace_evals: PositiveInt = Field(default=1, description="Evaluations every trial runs before it may be stopped.")
    reduction_factor: float = Field(
        default=2.0, gt=1.0, description="1/reduction_factor of the trials go on at each rung."
    )


class SweepSpec(Section):
    """Trials of one stage on Ray Tune (`launcher sweep`); the best trial's export becomes the stage's `model/`."""

    params: dict[str, SweepParam] = Field(
        min_length=1,
        description="Field path -> its values. A path names a stage field (`optim.lr`, `data.seq_len`), or a job "
        "field where the stage has none of that name (`seed`, `deepspeed.zero_stage`).",
    )
    num_samples: PositiveInt = Field(
        default=1,
        description="Times the grid runs; each time every distribution draws again (seeded by the job's seed).",
    )
    metric: str | None = Field(
        default=None,
        description="The eval metric that chooses the best trial (`accuracy`, `macro_f1`; an `eval/` prefix is "
        "accepted), read at the evaluation each trial exported; default the stage's best_metric, else loss.",
    )
    mode: Literal["max", "min"] | None = Field(
        default=None,
        description="Whether a larger or a smaller metric is better; default the stage's best_mode when the metric "
        "is its best_metric, else min for loss and perplexity metrics, max for the rest.",
    )
    scheduler: Literal["fifo", "asha"] = Field(
        default="fifo",
        description="fifo: every trial runs to its end; asha: trials falling behind at an evaluation stop early "
        "(needs evaluations during training: eval_every or eval_every_epochs).",
    )
    asha: AshaSpec = Field(default_factory=lambda: AshaSpec(), description="Settings of scheduler asha.")
    max_concurrent_trials: PositiveInt | None = Field(
        default=None,
        description="Trials running at once; default as many as the cluster's CPUs (GPUs with cluster.use_gpu) "
        "hold, each trial taking what its stage's workers take.",
    )


class ImageSpec(Section):
    """Tasks image_classification and mae: how images are prepared, normalised and augmented."""

    size: PositiveInt = Field(
        default=224,
        description="Side in pixels of the square the model sees: at preparation each image's shorter side is "
        "resized to it (bilinear) and the centre cropped; an image smaller than it is refused.",
    )
    channels: Literal[1, 3] = Field(
        default=3,
        description="Channels stored: 1 (grey) or 3 (RGB); images of another mode are converted (said once). The "
        "model always sees 3 (grey repeated), as transformers' image pipelines give it.",
    )
    mean: list[float] | None = Field(
        default=None,
        description="Per-channel mean (of pixels in [0, 1]) subtracted before the model; default the start "
        "model's (its saved image processor), else measured on the training images at preparation.",
    )
    std: list[float] | None = Field(
        default=None, description="Per-channel standard deviation the pixels are divided by; default as `mean`."
    )
    random_resized_crop: bool = Field(
        default=True,
        description="Training augmentation: a random crop of crop_scale of the area and crop_ratio aspect, resized "
        "back to size (torchvision's RandomResizedCrop, as HF's run_image_classification.py trains).",
    )
    crop_scale: tuple[float, float] = Field(default=(0.08, 1.0), description="Share of the area a crop covers.")
    crop_ratio: tuple[float, float] = Field(default=(0.75, 4 / 3), description="Aspect ratios a crop may have.")
    horizontal_flip: bool = Field(default=True, description="Training augmentation: flip half the images.")

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and len(value) not in (1, 3):
            raise ValueError("one value (every channel) or three (R, G, B)")
        return value

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1]:
            raise ValueError(f"needs 0 < low <= high, got {list(value)}")
        return value


class MaeSpec(Section):
    """Task mae (He et al. 2021, transformers' ViTMAEForPreTraining): mask most patches, reconstruct their pixels."""

    mask_ratio: float = Field(default=0.75, gt=0.0, lt=1.0, description="Share of patches hidden from the encoder.")
    norm_pix_loss: bool = Field(
        default=False, description="Reconstruct each patch's pixels normalised by its own mean and variance."
    )
    decoder_hidden_size: PositiveInt = Field(default=512, description="Width of the decoder (dropped at fine-tuning).")
    decoder_num_layers: PositiveInt = Field(default=8, description="Decoder blocks.")
    decoder_num_heads: PositiveInt = Field(default=16, description="Decoder attention heads.")
    decoder_intermediate_size: PositiveInt | None = Field(
        default=None, description="Decoder MLP width; default 4 x decoder_hidden_size."
    )


IMAGE_TASKS = ("image_classification", "mae")


def best_maximises(metric: str, mode: str | None) -> bool:
    """`best_mode`, or by the metric's name: losses and perplexities are minimised, the rest maximised."""
    if mode is not None:
        return mode == "max"
    return not metric.removeprefix("eval/").split("/")[-1].endswith(("loss", "perplexity"))


def task_metrics(task: str, labels: list[str]) -> list[str]:
    """The eval metrics a task reports (what `best_metric` may name)."""
    per_label = [f"{kind}/{label}" for label in labels for kind in ("precision", "recall", "f1")]
    return {
        "mlm": ["loss", "perplexity"],
        "clm": ["loss", "perplexity"],
        "rtd": ["loss", "accuracy", "generator_loss", "generator_perplexity"],
        "classification": ["loss", "accuracy", "macro_f1", *per_label],
        "token_classification": ["loss", "accuracy", "precision", "recall", "f1"],
        "image_classification": ["loss", "accuracy", "macro_f1", *per_label, *(f"accuracy/{x}" for x in labels)],
        "mae": ["loss"],
    }[task]


# Stage fields that moved into a section, and where they went.
MOVED_FIELDS = {
    "mlm_probability": "mlm.mask_probability (rtd.mask_probability for task rtd)",
    "rtd_generator_size": "rtd.generator_size",
    "rtd_weight": "rtd.discriminator_weight",
    "embedding_init_std": "embedding_init.std",
}


class StageSpec(Section):
    """One step of the pipeline: a task on a model, trained for `max_steps` or `epochs`."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(description="Stage name; its output folder.")
    task: Literal["mlm", "clm", "rtd", "classification", "token_classification", "image_classification", "mae"] = Field(
        description="Objective of this stage: masked LM (BERT), causal LM (GPT), replaced-token detection "
        "(ELECTRA: a small generator and a discriminator trained jointly; the discriminator is exported), "
        "classification (a label per document), token_classification (a tag per word: NER, part of speech, "
        "chunking), image_classification (a label per image) or mae (masked-autoencoder pre-training on "
        "unlabelled images)."
    )
    init_from: str | None = Field(
        default=None, description="An earlier stage's name (its exported model) or a local HF model directory."
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="Network to train.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Vocabulary.")
    data: DataSpec = Field(description="Corpus.")
    batch: BatchSpec = Field(default_factory=BatchSpec, description="Batch sizes.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="Training precision.")
    max_steps: PositiveInt | None = Field(default=None, description="Optimizer steps; wins over epochs.")
    epochs: float | None = Field(default=None, gt=0.0, description="Passes over the training set (when no max_steps).")
    embedding_init: EmbeddingInitSpec = Field(
        default_factory=lambda: EmbeddingInitSpec(), description="Token-embedding init of a fresh pre-training stage."
    )
    mlm: MaskedLMSpec = Field(default_factory=lambda: MaskedLMSpec(), description="Settings of task mlm.")
    rtd: ReplacedTokenSpec = Field(default_factory=lambda: ReplacedTokenSpec(), description="Settings of task rtd.")
    image: ImageSpec = Field(
        default_factory=lambda: ImageSpec(), description="Images of tasks image_classification and mae."
    )
    mae: MaeSpec = Field(default_factory=lambda: MaeSpec(), description="Settings of task mae.")
    log_every: PositiveInt = Field(default=10, description="Log train metrics every N steps (and after step 1).")
    eval_every: int = Field(default=0, ge=0, description="Evaluate every N steps (0: only at the end).")
    eval_every_epochs: float | None = Field(
        default=None,
        gt=0.0,
        description="Evaluate every this many passes over the training set (rounded to whole steps; e.g. 1 for "
        "once per epoch); with eval_every too, whichever is shorter.",
    )
    eval_max_batches: PositiveInt | None = Field(default=None, description="Cap on eval batches per evaluation.")
    best_metric: str | None = Field(
        default=None,
        description="The eval metric that chooses the exported model (HF's metric_for_best_model), e.g. "
        "`accuracy`, `macro_f1`, `f1`, `loss` (an `eval/` prefix is accepted). Every evaluation is then "
        "checkpointed, the best checkpoint is never pruned, and the stage exports it instead of its last step.",
    )
    best_mode: Literal["max", "min"] | None = Field(
        default=None,
        description="Whether a larger or a smaller best_metric is better; default min for loss and "
        "perplexity metrics, max for the rest.",
    )
    early_stopping_patience: PositiveInt | None = Field(
        default=None,
        description="End the stage after this many evaluations in a row without improving best_metric (the "
        "summary says where and why it stopped).",
    )
    checkpoint_every: int = Field(default=0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: PositiveInt = Field(default=2, description="Checkpoints kept on disk (oldest removed).")
    sweep: SweepSpec | None = Field(
        default=None, description="Trials of this stage for `launcher sweep` (`launcher run` ignores it)."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: object) -> object:
        if isinstance(data, dict):
            for name, place in MOVED_FIELDS.items():
                if name in data:
                    raise ValueError(f"{name}: moved to {place}")
            if isinstance(data.get("embedding_init"), str):
                raise ValueError(f"embedding_init: now a section: embedding_init: {{method: {data['embedding_init']}}}")
        return data

    def _check_images(self) -> None:
        """Image tasks build vit or resnet (mae: vit) and read whole images; text tasks build no image family."""
        image_families = ("vit", "resnet")
        if self.task not in IMAGE_TASKS:
            if "image" in self.model_fields_set:
                raise ValueError(f"image: settings of the image tasks, and this stage's task is {self.task}")
            if self.model.family in image_families:
                raise ValueError(f"model.family: {self.model.family} is an image family; task {self.task} reads text")
            return
        if self.data.sources:
            raise ValueError(f"data.sources: mixtures are for text pre-training; task {self.task} reads data.train")
        fresh = self.init_from is None and self.model.path is None
        allowed = ("vit",) if self.task == "mae" else image_families
        if fresh and self.model.family not in allowed:
            raise ValueError(f"model.family: task {self.task} builds {' or '.join(allowed)}, not {self.model.family}")
        if self.model.family == "vit" and self.image.size % self.model.patch_size:
            raise ValueError(f"model.patch_size: {self.model.patch_size} does not divide image.size {self.image.size}")

    def mask_probability(self) -> float:
        """The masked share of tokens of this stage's task (0 for tasks that mask nothing)."""
        return {"mlm": self.mlm.mask_probability, "rtd": self.rtd.mask_probability}.get(self.task, 0.0)

    @model_validator(mode="before")
    @classmethod
    def _preset_vocabulary(cls, data: object) -> object:
        """A model preset brings its published vocabulary size unless the stage sets its own."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        vocab = preset_vocab_size(str(data["model"].get("preset")))
        tokenizer = data.get("tokenizer") or {}
        if vocab is None or not isinstance(tokenizer, dict) or "vocab_size" in tokenizer:
            return data
        return {**data, "tokenizer": {**tokenizer, "vocab_size": vocab}}

    @model_validator(mode="after")
    def _consistent(self) -> StageSpec:
        # Messages start with the field path relative to the stage; the loader prefixes `stages.<i>.`.
        if self.max_steps is None and self.epochs is None:
            raise ValueError("max_steps: set max_steps or epochs")
        if (
            self.task in ("classification", "token_classification", "image_classification")
            and len(self.data.labels) < 2
        ):
            raise ValueError(f"data.labels: {self.task} needs at least two labels")
        if self.task == "clm" and self.model.family == "bert":
            raise ValueError("model.family: task clm needs a decoder family (gpt2 or llama), not bert")
        if self.data.document_mask and self.task != "clm":
            raise ValueError("data.document_mask: only for task clm (packed causal LM blocks)")
        if self.data.group_by_length and self.task not in ("classification", "token_classification"):
            raise ValueError("data.group_by_length: only for classification (packed blocks all have seq_len tokens)")
        if self.data.validation_fraction is not None and self.task not in ("classification", "token_classification"):
            raise ValueError(
                "data.validation_fraction: for classification and token_classification (labeled documents)"
            )
        if self.task in ("classification", "token_classification") and self.data.sources:
            raise ValueError("data.sources: mixtures are for pre-training (mlm, clm, rtd); use data.train")
        if self.task in ("mlm", "clm", "rtd") and self.data.seq_len < 2:
            raise ValueError(f"data.seq_len: task {self.task} needs blocks of at least 2 tokens")
        if self.embedding_init.method != "random":
            if self.task not in ("mlm", "clm", "rtd"):
                raise ValueError("embedding_init.method: only for pre-training stages (mlm, clm, rtd)")
            if self.init_from is not None or self.model.path is not None:
                where = "init_from" if self.init_from is not None else "model.path"
                raise ValueError(f"embedding_init.method: {where} brings trained embeddings; use random")
        if self.best_metric is not None:
            known = task_metrics(self.task, self.data.labels)
            name = self.best_metric.removeprefix("eval/")
            if name not in known:
                raise ValueError(f"best_metric: task {self.task} reports no {name!r}; it reports {', '.join(known)}")
        if self.early_stopping_patience is not None:
            if self.best_metric is None:
                raise ValueError("early_stopping_patience: needs best_metric (what must improve)")
            if not self.eval_every and self.eval_every_epochs is None:
                raise ValueError("early_stopping_patience: needs evaluations during training (eval_every or "
                                 "eval_every_epochs)")  # fmt: skip
        if self.sweep is not None:
            from launcher.jobspec.sweep import check_paths, metric_and_mode

            try:
                check_paths(self.sweep)
                metric_and_mode(self.sweep, self)
            except ValueError as exc:
                raise ValueError(f"sweep.{exc}") from None
        for section in ("mlm", "rtd", "mae"):
            if section in self.model_fields_set and self.task != section:
                raise ValueError(f"{section}: settings of task {section}, and this stage's task is {self.task}")
        self._check_images()
        if self.task in ("mlm", "rtd") and self.model.family != "bert":
            raise ValueError(f"model.family: task {self.task} needs the bert family")
        if self.task == "rtd" and self.model.path is not None:
            raise ValueError(
                "model.path: task rtd builds its generator and discriminator from the sizes (init_from "
                "continues an rtd export)"
            )
        if self.data.seq_len > self.model.max_position_embeddings and self.model.path is None:
            raise ValueError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_position_embeddings "
                f"{self.model.max_position_embeddings}"
            )
        if self.model.path is not None and not Path(self.model.path).is_dir():
            raise ValueError(f"model.path: {self.model.path!r} is not a directory")
        return self


class JobSpec(Section):
    """A job: stages run in order, each writing under `<output_dir>/<name>/<stage>/`."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(description="Job name; its output folder.")
    output_dir: str = Field(default="runs", description="Root folder of all outputs.")
    seed: int = Field(default=0, ge=0, description="Seed for init, data order, masking and dropout.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Workers and Ray.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed engine.")
    metrics: MetricsSpec = Field(
        default_factory=lambda: MetricsSpec(), description="Trackers besides TensorBoard (MLflow)."
    )
    stages: list[StageSpec] = Field(min_length=1, description="Stages, run in order.")
    sweep: SweepSpec | None = Field(
        default=None,
        description="Trials for `launcher sweep --stage NAME` of a stage without a sweep section of its own.",
    )

    @model_validator(mode="after")
    def _stage_references(self) -> JobSpec:
        names = [stage.name for stage in self.stages]
        if self.sweep is not None:
            from launcher.jobspec.sweep import check_paths

            try:
                check_paths(self.sweep)
            except ValueError as exc:
                raise ValueError(f"sweep.{exc}") from None
        for index, stage in enumerate(self.stages):
            if names.index(stage.name) != index:
                raise ValueError(f"stages.{index}.name: duplicate stage name {stage.name!r}")
            if stage.optim.skip_nonfinite and self.deepspeed.zero_stage == 0:
                raise ValueError(
                    f"stages.{index}.optim.skip_nonfinite: needs deepspeed.zero_stage >= 1 (at ZeRO-0 the optimizer "
                    "applies a non-finite update, so the step cannot be skipped)"
                )
            for field, ref in (("init_from", stage.init_from), ("tokenizer.source", stage.tokenizer.source)):
                if ref is None or ref in names[:index]:
                    continue
                if ref in names:
                    raise ValueError(f"stages.{index}.{field}: stage {ref!r} does not run before {stage.name!r}")
                if not Path(ref).is_dir():
                    raise ValueError(
                        f"stages.{index}.{field}: {ref!r} is neither an earlier stage nor a model directory"
                    )
        return self

    def stage(self, name: str) -> StageSpec:
        return next(stage for stage in self.stages if stage.name == name)

    def referenced_stage(self, ref: str | None) -> StageSpec | None:
        """The stage a reference (`init_from`, `tokenizer.source`) names; None when it names a directory or nothing.

        The one answer to "an earlier stage or a directory?" (validation above guarantees a named stage
        runs earlier)."""
        return next((stage for stage in self.stages if stage.name == ref), None) if ref else None
