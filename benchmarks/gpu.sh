#!/usr/bin/env bash
# Everything normnets uses a GPU for, in one command on the GPU machine, in the order it pays off:
#   0. tests/test_cuda.py         the CUDA path's tests (the captured step, runs in threads, fused runs)
#   1. scripts/run_all.py         -> results/gpu/ (the study as a plain `run_all.py` trains it on a GPU: each
#                                    run's steps one captured CUDA graph, JOBS_AT_ONCE processes at once)
#   2. benchmarks/speed.py        -> results/gpu/speed.json (the captured step against fastai's loop, several
#                                    runs at once as processes, threads on streams and fused, optimizers)
#   3. benchmarks/search.py       -> results/search.csv (every cell at full length, the best 3 at 2 more seeds)
#   4. scripts/batch_sizes.py     -> results/batch_size.csv (every batch size at full length)
#
#   ../shared/gpu/prepare                  # here, once: .gpu/ gets the data archive and fastai's wheels,
#   pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d .gpu/wheels tabulate pytest \
#       pluggy iniconfig packaging pygments # pandas' markdown tables and pytest (the GPU image lacks them)
#   FRESH=1 bash benchmarks/gpu.sh         # there (the device tool, carrying .gpu), from the repo root
#
# FRESH=1 trains the study anew, replacing the runs results/gpu holds (a new training step, a new GPU): its
# wall time is then the whole study's. Otherwise every step resumes the runs an earlier call finished (commit
# what comes back before the next call). A step is stopped like a Ctrl-C, its finished runs and tables kept,
# when the call's BUDGET seconds (default 540) are spent. What the steps wrote is copied to $OUT (when set),
# the results/ layout kept.
# A trial on a CPU (every step, about 15 minutes on 2 cores):
#   BUDGET=1800 ROOT=/tmp/trial NORMS=bn CONFIRM=0 TRIAL="--n-train 512 --n-test 256 --epochs 1" \
#       bash benchmarks/gpu.sh
set -uo pipefail
BUDGET=${BUDGET:-540}
ROOT=${ROOT:-results}      # the results folder the steps write to
CONFIRM=${CONFIRM:-3}      # the search's best cells of each norm run again at 2 more seeds
TRIAL=${TRIAL:-}           # options that shrink every training step (a trial on a CPU)
norms=${NORMS:+--norms $NORMS}   # the variants trained (default: every registered one)
study_resume=$([ -n "${FRESH:-}" ] || echo --resume)
end=$((SECONDS + BUDGET))

if [ -d .gpu/wheels ]; then
    pip install -q --no-deps .gpu/wheels/*.whl
    export NORMNETS_DATA=${NORMNETS_DATA:-$PWD/.gpu/cifar10-jpeg.tgz}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import fastai, tabulate" || { echo "fastai or tabulate missing: see the preparation above"; exit 1; }

step() {   # run "$@" with what is left of the budget; a step cut short keeps what it finished
    local left=$((end - SECONDS))
    if [ "$left" -lt 60 ]; then echo "=== skipped, the budget is spent: $*"; return; fi
    echo "=== $* (${left} s left)"
    timeout -s INT -k 30 "$left" "$@"
    echo "=== exit $? at $((SECONDS - end + BUDGET)) s of the budget: $1 $2"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
speed_steps=$([ -n "$TRIAL" ] && echo "--steps 3 --warmup 1 --rounds 1")
python -c "import pytest" 2>/dev/null && step python -m pytest -q -x tests/test_cuda.py
step python scripts/run_all.py --out "$ROOT/gpu" $study_resume $norms $TRIAL
step python benchmarks/speed.py --out "$ROOT/gpu/speed.json" $speed_steps
step python benchmarks/search.py --out "$ROOT" --resume --confirm "$CONFIRM" $norms $TRIAL
step python scripts/batch_sizes.py --out "$ROOT" --resume $norms $TRIAL

if [ -n "${OUT:-}" ]; then   # what comes back from the GPU machine
    mkdir -p "$OUT"
    for f in gpu search search.csv search.png batch_size batch_size.csv batch_size.png; do
        [ -e "$ROOT/$f" ] && cp -r "$ROOT/$f" "$OUT/"
    done
    du -sh "$OUT"
fi
