#!/usr/bin/env bash
# The standard kvbench sweep as Hydra multiruns (the passes below), then the leaderboard (docs/sweeps.md explains the
# launchers and how results from many workers merge).
#
#   1. baseline     no_press                                         (hydra/sweeper=baseline)
#   2. presses      every registry press but no_press x 0.25,0.5,0.75,0.875   (hydra/sweeper=presses)
#   3. query_aware  snapkv, adakv_snapkv with query_aware=true x the same ratios (hydra/sweeper=query_aware);
#                   skipped for perplexity datasets (PG-19), which have no question
#   4. eager        no_press, then the presses that need attention weights (observed_attention) x the same
#                   ratios, with model.attn_implementation=eager (hydra/sweeper=baseline, hydra/sweeper=eager)
#   5. python -m kvbench.leaderboard <output_dir>
#
# The passes run one after the other because perplexity runs compare themselves with the finished baseline.
# Finished configurations are skipped by kvbench itself, so rerunning this script resumes a broken sweep.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: leaderboard.sh [options] [-- hydra overrides...]

Run the standard kvbench sweep (no_press; every press at compression ratios 0.25, 0.5, 0.75, 0.875;
snapkv and adakv_snapkv query-aware at the same ratios, except on perplexity datasets; the presses that
need attention weights with eager attention, next to an eager no_press) as Hydra multiruns, then build
the leaderboard in <output_dir>/leaderboard/.

Options (environment variable in brackets; an option wins over its variable):
  --model NAME        model preset of conf/model/ [MODEL] (default: smollm2-135m)
  --dataset NAME      dataset preset of conf/dataset/ [DATASET] (default: ruler; pg19 with --quick)
  --launcher NAME     Hydra launcher of a pass [LAUNCHER] (default: shared_prefill: the jobs of a pass
                      that differ only in press and ratio share one prefill per sample, one group after
                      the other in one process; results are those of job-by-job runs)
                      joblib_gpus: the same sharing spread over one worker per local GPU (runs as
                      shared_prefill_gpus); basic: Hydra's launcher, job by job in one process;
                      slurm, slurm_local, joblib: each job in its own process, so no shared prefill
  --output-dir DIR    where result directories and the leaderboard go [OUTPUT_DIR] (default: results)
  --ratios LIST       comma-separated compression ratios instead of 0.25,0.5,0.75,0.875 [RATIOS]
  --quick             tiny data for a smoke test that finishes in minutes on a laptop CPU: still every
                      press and every ratio; the data settings become part of the run names, so quick
                      runs never stand in for full ones [QUICK=1]
                      Without --quick the data are leaderboard-grade: RULER at 4096 tokens with 100
                      samples per task (dataset.context_length=4096 dataset.num_samples=100, unless given
                      after --); PG-19 and needle at their preset defaults (16,896 scored tokens per run;
                      a 5 x 11 length x depth grid). The leaderboard marks runs with fewer than 50
                      samples per task as smoke runs.
  --dry-run           print the commands instead of running them [DRY_RUN=1]
  -h, --help          show this help

Everything after `--` is passed to every kvbench pass as Hydra overrides, e.g.
  leaderboard.sh --model llama-3.1-8b-instruct --launcher joblib_gpus -- max_context_length=16384
  leaderboard.sh --launcher slurm -- hydra.launcher.partition=gpu hydra.launcher.timeout_min=240
Python: $PYTHON if set, else .venv/bin/python next to this script if present, else `python`.
EOF
}

die() {
    echo "leaderboard.sh: $*" >&2
    echo "Try 'leaderboard.sh --help'." >&2
    exit 2
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-smollm2-135m}"
DATASET="${DATASET:-}"
LAUNCHER="${LAUNCHER:-}"
OUTPUT_DIR="${OUTPUT_DIR:-results}"
RATIOS="${RATIOS:-}"
QUICK="${QUICK:-0}"
DRY_RUN="${DRY_RUN:-0}"
EXTRA=()

# Accepts both `--opt value` and `--opt=value`.
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --quick) QUICK=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --model=* | --dataset=* | --launcher=* | --output-dir=* | --ratios=*)
            set -- "${1%%=*}" "${1#*=}" "${@:2}"
            continue
            ;;
        --model | --dataset | --launcher | --output-dir | --ratios)
            (($# >= 2)) || die "$1 needs a value"
            case "$1" in
                --model) MODEL="$2" ;;
                --dataset) DATASET="$2" ;;
                --launcher) LAUNCHER="$2" ;;
                --output-dir) OUTPUT_DIR="$2" ;;
                --ratios) RATIOS="$2" ;;
            esac
            shift
            ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option '$1' (Hydra overrides go after --)" ;;
    esac
    shift
done

[[ -n "$MODEL" ]] || die "--model must not be empty"
[[ -n "$OUTPUT_DIR" ]] || die "--output-dir must not be empty"
if [[ -z "$DATASET" ]]; then
    if [[ "$QUICK" == 1 ]]; then DATASET=pg19; else DATASET=ruler; fi
fi
# each a number in [0, 1): a 1.5 would fail every job of every pass, one by one
if [[ -n "$RATIOS" && ! "$RATIOS" =~ ^(0?\.[0-9]+|0)(,(0?\.[0-9]+|0))*$ ]]; then
    die "--ratios takes comma-separated numbers in [0, 1), e.g. 0.5,0.875 (got '$RATIOS')"
fi

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python; fi
fi

# Quick mode shrinks the data, never the set of presses or ratios. These are task overrides, so kvbench
# appends those that differ from the defaults to the run names (e.g. ...__snapkv__0.50__context_length=128__...);
# a suffix holding a list (brackets) or passing kvbench's 80 characters (the eager pass) ends in a digest instead.
QUICK_ARGS=()
if [[ "$QUICK" == 1 ]]; then
    case "$DATASET" in
        pg19) QUICK_ARGS=(dataset.context_length=128 dataset.max_windows_per_book=1 dataset.num_books=1) ;;
        ruler) QUICK_ARGS=(dataset.context_length=256 dataset.num_samples=1 "dataset.tasks=[niah_single_1,qa_1]") ;;
        needle) QUICK_ARGS=("dataset.context_lengths=[256]" "dataset.depths=[50]") ;;
        longbench_e) QUICK_ARGS=(dataset.num_samples=1 "dataset.tasks=[qasper,hotpotqa]" max_context_length=1024) ;;
        *) die "--quick has no tiny settings for dataset '$DATASET'; pass your own after -- and drop --quick" ;;
    esac
fi

# Leaderboard-grade data where a preset's defaults are a smoke run (RULER's default is `make run`'s: 1 sample
# per task, which moves a task score by 100 points). An override given after -- wins: its key is
# left out here, so the run name carries one value. PG-19 and needle presets are leaderboard-grade already.
FULL_ARGS=()
if [[ "$QUICK" != 1 ]]; then
    case "$DATASET" in
        ruler) WANTED=(dataset.context_length=4096 dataset.num_samples=100) ;;
        *) WANTED=() ;;
    esac
    for arg in ${WANTED[@]+"${WANTED[@]}"}; do
        given=0
        for extra in ${EXTRA[@]+"${EXTRA[@]}"}; do
            [[ "${extra#[+~]}" == "${arg%%=*}="* ]] && given=1
        done
        ((given)) || FULL_ARGS+=("$arg")
    done
fi

# Tiny inputs gain nothing from several torch threads, and on a shared or busy CPU OpenMP threads that
# outnumber free cores spin against each other (measured on 2 shared cores: 4 quick jobs 44 s -> 9 s).
if [[ "$QUICK" == 1 ]]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi

# One prefill per sample for all the (press, ratio) jobs of a pass unless another launcher is asked for; on GPUs
# the shared preset keeps joblib_gpus' one worker per GPU (docs/sweeps.md, "One prefill per sweep").
case "$LAUNCHER" in
    "") LAUNCHER=shared_prefill ;;
    joblib_gpus) LAUNCHER=shared_prefill_gpus ;;
esac
COMMON=("model=$MODEL" "dataset=$DATASET" "output_dir=$OUTPUT_DIR" "hydra/launcher=$LAUNCHER")
RATIO_ARGS=()
[[ -n "$RATIOS" ]] && RATIO_ARGS=("compression_ratio=$RATIOS")

show() {
    printf '%q' "$1"
    shift
    (($#)) && printf ' %q' "$@"
    printf '\n'
}

# run NAME CMD...: print the command; in a dry run that is all.
run() {
    local name="$1"
    shift
    if [[ "$DRY_RUN" == 1 ]]; then
        show "$@"
        return 0
    fi
    echo "==> $name: $(show "$@")"
    "$@"
}

KVBENCH=("$PYTHON" -m kvbench -m)
START=$SECONDS
FAILED=()

# Without a baseline nothing else can be compared (and the same mistake would fail every later job): stop.
run baseline "${KVBENCH[@]}" hydra/sweeper=baseline "${COMMON[@]}" ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} ${FULL_ARGS[@]+"${FULL_ARGS[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"} || die "the no_press baseline failed; not starting the press sweeps"
# A failed press pass must not cost the results of the other pass: go on, build the leaderboard from what
# finished, and report the failure in the exit status.
run presses "${KVBENCH[@]}" hydra/sweeper=presses "${COMMON[@]}" ${RATIO_ARGS[@]+"${RATIO_ARGS[@]}"} \
    ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} ${FULL_ARGS[@]+"${FULL_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} || FAILED+=(presses)
# A perplexity dataset has no question to prefill before compression: no query-aware pass (the dataset
# module declares its KIND; an unknown dataset falls through to the baseline's own error above).
KIND=$(PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    'import sys; from kvbench.datasets import dataset_kind; print(dataset_kind(sys.argv[1]))' "$DATASET" 2>/dev/null) || KIND=generate
if [[ "$KIND" == perplexity ]]; then
    echo "==> query_aware: skipped, $DATASET is a perplexity dataset (no question to be aware of)" >&2
else
    run query_aware "${KVBENCH[@]}" hydra/sweeper=query_aware "${COMMON[@]}" ${RATIO_ARGS[@]+"${RATIO_ARGS[@]}"} \
        ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} ${FULL_ARGS[@]+"${FULL_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} || FAILED+=(query_aware)
fi
# Presses that score the attention weights need eager attention: their own no_press baseline first (another
# attention implementation is another run identity), then the presses.
EAGER=(model.attn_implementation=eager)
if run eager_baseline "${KVBENCH[@]}" hydra/sweeper=baseline "${COMMON[@]}" "${EAGER[@]}" ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} \
    ${FULL_ARGS[@]+"${FULL_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}; then
    run eager "${KVBENCH[@]}" hydra/sweeper=eager "${COMMON[@]}" ${RATIO_ARGS[@]+"${RATIO_ARGS[@]}"} \
        ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} ${FULL_ARGS[@]+"${FULL_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} || FAILED+=(eager)
else
    FAILED+=(eager_baseline)
fi
run leaderboard "$PYTHON" -m kvbench.leaderboard "$OUTPUT_DIR"

if [[ "$DRY_RUN" != 1 ]]; then
    echo "==> standard sweep of $MODEL on $DATASET done in $((SECONDS - START)) s; leaderboard: $OUTPUT_DIR/leaderboard/index.html"
fi
if ((${#FAILED[@]})); then
    echo "leaderboard.sh: these passes had failed jobs (see the errors above): ${FAILED[*]}" >&2
    exit 1
fi
