#!/usr/bin/env bash
# Run as: bash benchmarks/gpu_check.sh [--dry-run]
#
# On one NVIDIA GPU, in under 8 minutes:
#   1. the launcher's CUDA paths: its rank code under torchrun on the nccl backend
#      (benchmarks/launcher_torchrun.py, as the Ray workers run it; Ray itself is too large to carry),
#      `launcher run --local` in bf16 with ZeRO-2 and in fp16 with ZeRO-3, each export loaded back by
#      transformers, and `launcher predict`'s classifier on the GPU;
#   2. `clm` pre-training of the llama presets smollm2-135m, smollm2-360m (activation checkpointing off and
#      on) and tinyllama-1.1b (on) (bf16, sdpa, ZeRO-2, `--local`) for a fixed number of steps, printed as
#      one table: tokens/s, MFU (against the GPU table's bf16 peak) and peak GPU memory; an MFU outside
#      (0, 100%] fails the check. Target on an H200: MFU >= 40% at 360M.
# `--dry-run` runs every command on this CPU instead, with tiny models, a few steps, gloo and fp32 in place
# of fp16 (DeepSpeed has no CPU fp16): it checks the script, the wheels and the table, not the GPU.
#
# The GPU machine (the `device` tool: Python 3.12 with its own torch, transformers, tokenizers, tensorboard
# and pytest; no network) lacks DeepSpeed, hjson, pydantic and zstandard. Build their wheels here first:
#   make gpu-wheels      # -> benchmarks/gpu-wheels/ (git-ignored, a few MB)
# then run this script there with `data/demo` (from `make data`) and the wheels carried:
#   run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/gpu-wheels", "data/demo"], timeout_s=540)
# The wheels are installed with --no-deps into a temporary folder put first on PYTHONPATH, over the
# machine's own torch; the launcher runs from this working tree.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
WHEELS=benchmarks/gpu-wheels
NEEDED=(deepspeed hjson pydantic pydantic_core annotated_types typing_inspection zstandard)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ $DRY_RUN == 1 && -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi

for name in "${NEEDED[@]}"; do
    if ! compgen -G "$WHEELS/${name}-*.whl" >/dev/null; then
        if [[ $DRY_RUN == 1 ]]; then
            echo "note: no $name wheel in $WHEELS (make gpu-wheels); the dry run uses $PY's packages"
        else
            echo "error: no $name wheel in $WHEELS: run \`make gpu-wheels\` where PyPI is reachable" >&2
            exit 2
        fi
    fi
done
if [[ $DRY_RUN == 0 ]]; then
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --target "$WORK/deps" \
        "$WHEELS"/*.whl
    export PYTHONPATH="$WORK/deps:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    DEVICE=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    DEVICE=cpu
fi
export HF_HUB_OFFLINE=1 RAY_ADDRESS="" TOKENIZERS_PARALLELISM=false
[[ -f data/demo/unlabeled.jsonl ]] || { echo "error: data/demo is missing: run \`make data\` and carry it" >&2; exit 2; }
"$PY" -c "import torch, transformers, deepspeed, pydantic; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"

launcher() { "$PY" -m launcher "$@"; }
logged() {  # LOG COMMAND...: run it with its output in LOG; on failure show the end of LOG and stop
    local log=$1
    shift
    "$@" >"$log" 2>&1 || { tail -40 "$log"; echo "gpu check: failed: $*" >&2; exit 1; }
}
gpu=(cluster.use_gpu=true)
[[ $DRY_RUN == 1 ]] && gpu=()

echo "== 1a. rank code under torchrun, $([[ $DRY_RUN == 1 ]] && echo gloo || echo nccl)"
bench=benchmarks/pretrain-bench.yaml
launcher prepare "$bench" "output_dir=$WORK/torchrun" cluster.num_workers=1 >/dev/null
port=$("$PY" -c "from launcher.worker.context import free_port; print(free_port())")
logged "$WORK/torchrun.log" "$PY" -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 \
    --master_port "$port" benchmarks/launcher_torchrun.py "$bench" "$WORK/torchrun" 20 10 "$DEVICE"
"$PY" -c "import json, sys; s = json.load(open(sys.argv[1])); print('torchrun:', s['steps'], 'steps on',
s['world_size'], 'rank(s),', round(s['tokens'] / s['wall_s']), 'tokens/s')" "$WORK/torchrun/bench/pretrain/summary.json"

check_export() {  # JOB_DIR: the fine-tuned classifier loads back with transformers
    "$PY" -c "import sys; from transformers import AutoModelForSequenceClassification as A
m = A.from_pretrained(sys.argv[1], local_files_only=True); print('export loads:', type(m).__name__,
sum(p.numel() for p in m.parameters()), 'parameters')" "$1/tiny/finetune/model"
}
echo "== 1b. --local, bf16, ZeRO-2 (tiny pre-train -> fine-tune, export)"
logged "$WORK/bf16.log" launcher run jobs/debug/tiny.yaml --local "output_dir=$WORK/bf16" "${gpu[@]}" \
    deepspeed.zero_stage=2 stages.0.precision=bf16 stages.1.precision=bf16
grep -E "^  (pretrain|finetune) " "$WORK/bf16.log"
check_export "$WORK/bf16"
half=fp16
[[ $DRY_RUN == 1 ]] && half=fp32
echo "== 1c. --local, $half, ZeRO-3 (export gathered from partitions)"
logged "$WORK/half.log" launcher run jobs/debug/tiny.yaml --local "output_dir=$WORK/half" "${gpu[@]}" \
    deepspeed.zero_stage=3 "stages.0.precision=$half" "stages.1.precision=$half"
grep -E "^  (pretrain|finetune) " "$WORK/half.log"
check_export "$WORK/half"

echo "== 1d. launcher predict's classifier on the bf16 export, on the $DEVICE"
"$PY" - "$WORK/bf16/tiny/finetune/model" "$DEVICE" <<'EOF'
import csv, sys, time
from launcher.inference.predictor import TextClassifier

classifier = TextClassifier(sys.argv[1], "text", batch_size=64)
assert classifier.device.type == sys.argv[2], f"the predictor runs on {classifier.device}, not {sys.argv[2]}"
with open("data/demo/test.csv", newline="") as stream:
    texts = [row["text"] for _, row in zip(range(512), csv.DictReader(stream))]
start = time.perf_counter()
scores = classifier.predict(texts)
assert scores.shape == (len(texts), len(classifier.labels)) and abs(scores.sum(1) - 1).max() < 1e-3
print(f"predict: {len(texts)} rows on {classifier.device} at {len(texts) / (time.perf_counter() - start):,.0f} rows/s")
EOF

echo "== 2. clm pre-training of the presets, bf16, sdpa, ZeRO-2, --local, activation checkpointing off / on"
tiny="family: llama, hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128"
if [[ $DRY_RUN == 1 ]]; then  # name|model section|seq_len|micro_batch|steps
    sizes=("tiny|{$tiny}|64|4|3" "tiny+ckpt|{$tiny, activation_checkpointing: true}|64|4|3")
else
    sizes=("smollm2-135m|{preset: smollm2-135m}|1024|16|30"
           "smollm2-360m|{preset: smollm2-360m}|1024|8|30"
           "smollm2-360m+ckpt|{preset: smollm2-360m, activation_checkpointing: true}|1024|8|30"
           "tinyllama-1.1b+ckpt|{preset: tinyllama-1.1b, activation_checkpointing: true}|1024|8|20")
fi
rows=()
for entry in "${sizes[@]}"; do
    IFS='|' read -r name model seq micro steps <<<"$entry"
    out="$WORK/clm-$name"
    logged "$out.log" launcher run jobs/pretrain-gpt-clm.yaml --local "output_dir=$out" "${gpu[@]}" deepspeed.zero_stage=2 \
        stages.0.precision=bf16 "stages.0.model=$model" "stages.0.data.seq_len=$seq" stages.0.tokenizer.vocab_size=32000 \
        "stages.0.batch.micro_batch_size=$micro" stages.0.batch.grad_accum_steps=1 "stages.0.max_steps=$steps" \
        stages.0.log_every=10 stages.0.eval_every=0 stages.0.eval_max_batches=2 stages.0.checkpoint_every=0
    rows+=("$name $out/pretrain-gpt-clm/pretrain")
done
"$PY" - "${rows[@]}" <<'EOF'
import json, math, sys
from pathlib import Path

print(f"{'model':<20} {'parameters':>11} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'peak FLOP/s source':>24}")
bad = []
for name, stage in (arg.split(" ", 1) for arg in sys.argv[1:]):
    summary = json.loads((Path(stage) / "summary.json").read_text())
    rows = [json.loads(line) for line in (Path(stage) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/mfu" in r][-1]  # the last window of log_every steps: steady state
    peak = summary.get("peak_memory_bytes") or 0
    mfu = last["train/mfu"]
    print(f"{name:<20} {summary['num_params'] / 1e6:10.1f}M {last['train/tokens_per_sec']:10,.0f} "
          f"{mfu:7.1%} {peak / 2**30:9.2f} {summary['peak_flops_source']:>24}")
    if not math.isfinite(mfu) or not 0 < mfu <= 1:
        bad.append(f"{name}: MFU {mfu} is not in (0, 100%]: the peak is not the peak of what ran")
if bad:
    sys.exit("gpu check: " + "; ".join(bad))
EOF
echo "gpu check: done$([[ $DRY_RUN == 1 ]] && echo ' (dry run on CPU)')"
