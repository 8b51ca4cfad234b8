#!/usr/bin/env bash
# Issue 10's GPU figures in one command, sized for one call on a lent device machine (10-minute limit; about 4 minutes
# on an H200): the GPU tests, the speed benchmark on Llama-3.1-8B's architecture with random weights (bf16, the
# memory-bound floor of the detected GPU beside every row), the scoring cost of every press on that model and on
# the packaged SmolLM2's shapes (random weights: the packaged weights do not travel to a device machine), and the
# throughput of batch_size=8 against 1 (benchmarks/batch_throughput.py) on SmolLM2's shapes with its tokenizer.
#
# Usage, from the repo root:  bash benchmarks/gpu_carry.sh   (here, once: wheels, tokenizer, novels into .gpu-carry)
#                             bash benchmarks/gpu_session.sh [OUT_DIR]   (there; OUT_DIR defaults to $OUT)
# The grid can be shrunk for a dry run on a CPU: DEVICE=cpu MODEL=random:<config.json> CONTEXTS=96 SMALL_MODEL=...
# BATCH_MODEL=... BATCH_CONTEXT=128 BATCH_WINDOWS=4 BATCH_SIZES="1 2". Every step runs under its own time limit and
# the session goes on past a failed step; the exit code says whether any failed. Without .gpu-carry's tokenizer and
# novels the batch steps are skipped and the log says so. Outputs (at most 8 files, two folders deep, as a device
# call brings back): session.log (the batch tables included), speed/speed.csv, speed/decode_ms_per_token.png,
# speed/cache_bytes.png, press_overhead_<model>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/gpu_session}}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-random:llama-3.1-8b}
SMALL_MODEL=${SMALL_MODEL:-random:smollm2-135m}
CONTEXTS=${CONTEXTS:-2048,4096,8192,16384}
OVERHEAD_CONTEXT=${OVERHEAD_CONTEXT:-4096}
DECODE=${DECODE:-32}
REPEATS=${REPEATS:-2}
STEP_SECONDS=${STEP_SECONDS:-300}
CARRY=${CARRY:-.gpu-carry}
BATCH_MODEL=${BATCH_MODEL:-$SMALL_MODEL}
BATCH_CONTEXT=${BATCH_CONTEXT:-2048}
BATCH_WINDOWS=${BATCH_WINDOWS:-32}
BATCH_SIZES=${BATCH_SIZES:-1 8}
mkdir -p "$out"
log="$out/session.log"
: >"$log"

if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvbench-site "$CARRY"/wheels/*.whl \
        >>"$log" 2>&1 && export PYTHONPATH=/tmp/kvbench-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

failed=()
step() {  # step NAME COMMAND...: logged with its wall time; a failure is recorded, not fatal
    local name=$1 start=$SECONDS
    shift
    echo "=== $name: $*" | tee -a "$log"
    timeout "$STEP_SECONDS" "$@" >>"$log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    [ "$rc" = 0 ] || failed+=("$name")
}

step environment "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
    'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
command -v nvidia-smi >/dev/null && step nvidia-smi nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv

# Memory bandwidth of the detected GPU for the floor column (datasheet figures; none for an unknown device)
name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
case "$name" in
    *H200*) bandwidth=(--bandwidth-gbps 4800) ;;
    *H100*PCIe*) bandwidth=(--bandwidth-gbps 2000) ;;
    *H100*) bandwidth=(--bandwidth-gbps 3350) ;;
    *A100*) bandwidth=(--bandwidth-gbps 2039) ;;
    *) bandwidth=() ;;
esac

[ "$DEVICE" = cpu ] || step gpu-tests "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_device.py
step speed "$PY" -m kvbench.benchmark --model "$MODEL" --device "$DEVICE" --dtype auto --attn sdpa \
    --context-lengths "$CONTEXTS" --presses no_press,snapkv,adakv_snapkv,expected_attention --ratios 0,0.5,0.75 \
    --decode-tokens "$DECODE" --repeats "$REPEATS" "${bandwidth[@]}" --out "$out/speed"
for model in "$MODEL" "$SMALL_MODEL"; do
    label=$(basename "${model#random:}" .json)
    step "press-overhead-$label" bash -c '"$0" benchmarks/press_overhead.py --model "$1" --device "$2" --context "$3" \
        --repeats 3 >"$4" 2>>"$5"' "$PY" "$model" "$DEVICE" "$OVERHEAD_CONTEXT" "$out/press_overhead_$label.txt" "$log"
done

# Batched evaluation: a random-weight model folder around the carried tokenizer, the carried novels as the Austen
# cache of a scratch KVBENCH_CACHE; PG-19 perplexity (teacher forcing) and the needle (greedy decoding), each in
# float32 (the batch must answer as batch size 1 does) and in the device's default dtype (the throughput that counts)
if [ -f "$CARRY/tokenizer/tokenizer.json" ] && compgen -G "$CARRY/austen/*.txt" >/dev/null; then
    scratch=$(mktemp -d /tmp/kvbench-batch-XXXXXX)
    mkdir -p "$scratch/cache/data" && cp -r "$CARRY/austen" "$scratch/cache/data/austen"
    export KVBENCH_CACHE="$scratch/cache"
    step batch-model "$PY" benchmarks/random_model_dir.py --config "$BATCH_MODEL" --tokenizer "$CARRY/tokenizer" \
        --out "$scratch/model"
    base=(model.name_or_path="$scratch/model" model.name=random-batch-model device="$DEVICE")
    for dtype in float32 auto; do
        step "batch-pg19-$dtype" "$PY" benchmarks/batch_throughput.py \
            --batch-sizes $BATCH_SIZES "${base[@]}" model.dtype=$dtype dataset=pg19 dataset.num_books=1 \
            dataset.context_length="$BATCH_CONTEXT" dataset.max_windows_per_book="$BATCH_WINDOWS"
        step "batch-needle-$dtype" "$PY" benchmarks/batch_throughput.py \
            --batch-sizes $BATCH_SIZES "${base[@]}" model.dtype=$dtype dataset=needle dataset.haystack=austen \
            "dataset.context_lengths=[$BATCH_CONTEXT]"
    done
    rm -rf "$scratch"
else
    echo "=== batch steps skipped: no $CARRY/tokenizer or $CARRY/austen (run benchmarks/gpu_carry.sh first)" | tee -a "$log"
fi

if [ ${#failed[@]} = 0 ]; then echo "all steps passed" | tee -a "$log"; else echo "failed: ${failed[*]}" | tee -a "$log"; exit 1; fi
