#!/usr/bin/env bash
# Every check of the fast training path that needs a CUDA GPU, in one script that ends within 8 minutes on one
# large GPU (H100/H200 class). Results go to bench/results/ (and to $OUT when that is set, as on the device
# machine); each step's output also goes to bench/results/gpu_check.log.
#
#   1. loss equality on CUDA: liger-kernel's fused loss vs domaintune's chunked loss vs the model's own
#      (bench/loss_equality.py --device cuda)
#   2. training throughput, the seed-style recipe and domaintune side by side, for the three GPU shapes
#      (bench/train_throughput.py --device cuda --shape bloom-560m | qwen2.5-0.5b | bloom-3b)
#   3. a short QLoRA (4-bit) run of `domaintune train` on a tiny model, then `domaintune predict` with it
#      (bench/qlora_check.py), and the same with lora.init loftq (--init loftq)
#   4. the prediction benchmark: greedy and beam-4 batched vs beam-4 one prompt at a time
#      (bench/generation_batching.py --device cuda)
#   5. the distributed engines at world size 1: FSDP (LoRA, QLoRA) and DeepSpeed ZeRO-2/3 (ZeRO-2/3 with CPU
#      offload) runs that must save ordinary adapter run directories predict reads (bench/distributed_check.py);
#      it runs right after step 1, as it has never been measured on a GPU
#   6. serving: the default engine's batched streams and vLLM (`--engine vllm`) on a 0.5B shape with a LoRA adapter
#      (bench/vllm_check.py; without vLLM, the default engine only); it runs third, after step 5
#
# Set-up on a machine without internet (run here, where pip works, then carry both folders):
#   bash bench/gpu_wheels.sh                      # the training stack's wheels -> .whl/
#   mkdir -p .bench-data && cp ../shared/data/family_edu_zh.train.jsonl .bench-data/
#   (both folders are git-ignored; the script installs .whl/*.whl into /tmp/site when .whl exists)
#
#   bash bench/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh       # on a CPU: the same steps, tiny sizes, nothing saved
#
# A step that fails or runs out of time is reported and the script goes on; it exits 1 if any step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
BUDGET=${GPU_CHECK_BUDGET:-450}  # seconds for all steps; each step gets at most what is left
DRY=${GPU_CHECK_DRY:-}
RESULTS=bench/results
LOG=$RESULTS/gpu_check.log
[ -n "$DRY" ] && LOG=$(mktemp /tmp/gpu_check-dry-XXXX.log)  # a dry run saves nothing under bench/
mkdir -p "$RESULTS"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" >/dev/null && [ -z "$DRY" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "installing .whl/*.whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
DT=("$PY" -m domaintune)
say "provenance: $("$PY" bench/provenance.py 2>&1)"  # code revision, machine, versions, load: with every log

DATA=${DOMAINTUNE_REFERENCE:-}
for cand in ../shared/data/family_edu_zh.train.jsonl .bench-data/family_edu_zh.train.jsonl; do
  [ -z "$DATA" ] && [ -f "$cand" ] && DATA=$cand
done
[ -n "$DATA" ] || { say "no reference data: copy family_edu_zh.train.jsonl into .bench-data/ (see the header)"; exit 1; }

if [ -n "$DRY" ]; then
  DEV=cpu; SAVE=(--no-save)
else
  DEV=cuda; SAVE=()
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { say "no CUDA device is visible: run on a GPU machine, or GPU_CHECK_DRY=1 to try the steps on a CPU"; exit 1; }
fi

{
  echo "== gpu_check $(date -u +%FT%TZ) on $(hostname), device $DEV"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" - <<'EOF'
import importlib.metadata as md
for n in ("torch", "transformers", "peft", "accelerate", "liger-kernel", "bitsandbytes", "triton", "pydantic"):
    try:
        print(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"{n} (not installed)")
EOF
} 2>&1 | tee -a "$LOG"

FAILED=()
step() {  # step NAME SECONDS COMMAND...: run with the smaller of SECONDS and what is left of the budget
  local name=$1 want=$2; shift 2
  local left=$((BUDGET - SECONDS))
  local limit=$((want < left ? want : left))
  if [ "$limit" -lt 20 ]; then
    say "== $name: skipped, the time budget (${BUDGET} s) is spent"; FAILED+=("$name (no time)"); return
  fi
  say "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

# 1. Loss equality (fp32, TF32 off): fast, and it tells whether the throughput numbers train the same thing.
step loss-equality 90 "$PY" bench/loss_equality.py --device "$DEV" "${SAVE[@]}"

# 5 (run second: never measured on a GPU yet). FSDP (LoRA, QLoRA) and ZeRO-2/3 at world size 1; results are written
# after each engine (a dry run: FSDP on the CPU).
step distributed 150 "$PY" bench/distributed_check.py --device "$DEV" "${SAVE[@]}"

# 6 (runs third: never measured on a GPU yet). Serving: the default engine's continuous batching and vLLM
#    (`--engine vllm`) on a 0.5B shape with a LoRA adapter: throughput, greedy agreement, loss through prompt
#    logprobs, abort of a stream whose client left (bench/vllm_check.py). Without vLLM (not in the device image;
#    its wheel is too large to carry) the default engine is measured and the vLLM half is recorded as skipped.
if [ -n "$DRY" ]; then
  step serving 120 "$PY" bench/vllm_check.py --dry
else
  "$PY" -c "import vllm" >/dev/null 2>&1 || say "== serving: vllm is not installed: the vLLM half is skipped"
  step serving 150 "$PY" bench/vllm_check.py --data "$DATA"
fi

# 2. Training throughput, both arms per shape (each arm in its own process: clean peak memory).
if [ -n "$DRY" ]; then
  step throughput-cpu 400 "$PY" bench/train_throughput.py --device cpu --rows 8 --data "$DATA" "${SAVE[@]}"
else
  step throughput-bloom-560m 110 "$PY" bench/train_throughput.py --device cuda --shape bloom-560m --rows 400 \
    --data "$DATA"
  step throughput-qwen2.5-0.5b 110 "$PY" bench/train_throughput.py --device cuda --shape qwen2.5-0.5b --rows 400 \
    --data "$DATA"
  step throughput-bloom-3b 150 "$PY" bench/train_throughput.py --device cuda --shape bloom-3b --rows 160 \
    --data "$DATA"
fi

# 3. QLoRA: 4-bit base + LoRA, two epochs of the sample data, then predictions with the adapter on the 4-bit base.
if [ -z "$DRY" ] && ! "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
  say "== qlora: skipped, bitsandbytes is not installed (bash bench/gpu_wheels.sh, then carry .whl)"
  FAILED+=("qlora (no bitsandbytes)")
else
  step qlora 120 "$PY" bench/qlora_check.py --device "$DEV" "${SAVE[@]}"
  # LoftQ (lora.init loftq) initialises the adapter against the 4-bit base: CUDA and bitsandbytes only, never run on
  # a CPU (there it is refused, and that refusal is what the CPU tests check).
  [ -z "$DRY" ] && step qlora-loftq 90 "$PY" bench/qlora_check.py --device cuda --init loftq
fi

# 4. Prediction: greedy and beam-4 batched against beam-4 one prompt at a time, identical outputs.
if [ -n "$DRY" ]; then
  step generation 200 "$PY" bench/generation_batching.py --device cpu --n 8 --batch-size 4 --max-new-tokens 8 \
    --data "$DATA" --no-save
else
  step generation 90 "$PY" bench/generation_batching.py --device cuda --n 128 --batch-size 32 \
    --max-new-tokens 64 --data "$DATA"
fi

if [ -n "${OUT:-}" ] && [ -z "$DRY" ]; then  # the device machine sends back what is under $OUT
  # one archive: the device tool sends back at most 8 files
  tar -czf "$OUT/gpu_results.tgz" --ignore-failed-read "$RESULTS"/train_throughput-cuda-*.json \
    "$RESULTS"/loss_equality-cuda.json "$RESULTS"/qlora-cuda.json "$RESULTS"/generation_batching.md \
    "$RESULTS"/distributed-cuda.json "$RESULTS"/vllm_check-cuda.json "$RESULTS"/vllm_check.md "$LOG" 2>/dev/null
fi
say "== gpu_check done in $SECONDS s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
