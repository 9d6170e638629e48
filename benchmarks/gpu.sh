#!/usr/bin/env bash
# Everything normnets uses a GPU for, one stage a call of the device tool (each fits its 10 minutes), in the
# order it pays off:
#   study         tests/test_cuda.py (the captured step, runs in threads, fused runs), then scripts/run_all.py
#                 -> results/gpu/ (each run's steps one captured CUDA graph, JOBS_AT_ONCE processes at once)
#   speed         benchmarks/speed.py -> results/gpu/speed.json (the captured step against fastai's loop,
#                 several runs at once, optimizers), saved after each table
#   batch-sizes   scripts/batch_sizes.py -> results/batch_size.csv (every batch size at full length)
#   search        benchmarks/search.py -> results/search.csv (every cell at full length, the best at more seeds)
#
#   ../shared/gpu/prepare                           # here, once: .gpu/ gets the data archive and fastai's wheels
#   bash benchmarks/gpu.sh study speed              # there (the device tool, carrying .gpu), from the repo root
#
# Every stage resumes what an earlier call finished (commit what comes back before the next call; FRESH=1
# trains the study anew, for a new training step or GPU: its wall time is then the whole study's). A stage is
# stopped like a Ctrl-C, its finished runs and tables kept, when the call's BUDGET seconds (default 540) are
# spent: that is not a failure. With OUT set, each stage leaves $OUT/<stage>.tgz (what it wrote, in the
# results/ layout: `tar xzf <stage>.tgz` in a clone puts it in place) and $OUT/<stage>.log.
# Without a GPU it refuses, except in a trial on a CPU (every stage, about 15 minutes on 2 cores):
#   BUDGET=1800 ROOT=/tmp/trial NORMS=bn CONFIRM=0 TRIAL="--n-train 512 --n-test 256 --epochs 1" \
#       bash benchmarks/gpu.sh study speed batch-sizes search
set -uo pipefail
BUDGET=${BUDGET:-540}
ROOT=${ROOT:-results}      # the results folder the stages write to
CONFIRM=${CONFIRM:-3}      # the search's best cells of each norm run again at 2 more seeds
TRIAL=${TRIAL:-}           # options that shrink every training run (a trial on a CPU)
norms=${NORMS:+--norms $NORMS}   # the variants trained (default: every registered one)
end=$((SECONDS + BUDGET))
stages=("$@")
# what each stage writes under ROOT, and packs: a speed stage cut short brings back the tables it saved
declare -A WRITES=([study]="gpu" [speed]="gpu/speed.json gpu/speed.partial.json"
                   [batch-sizes]="batch_size batch_size.csv batch_size.png" [search]="search search.csv search.png")
for s in "${stages[@]}"; do
    [ -n "${WRITES[$s]:-}" ] || { echo "gpu.sh: unknown stage '$s': choose from study, speed, batch-sizes, search" >&2; exit 2; }
done
[ ${#stages[@]} -gt 0 ] || { echo "gpu.sh: name the stages to run: study, speed, batch-sizes, search" >&2; exit 2; }

if [ -d .gpu/wheels ]; then
    pip install -q --no-deps .gpu/wheels/*.whl || exit 1
    export NORMNETS_DATA=${NORMNETS_DATA:-$PWD/.gpu/cifar10-jpeg.tgz}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python - <<'PY' || exit 1
import importlib, importlib.util
needed = ['torch', 'normnets_data', 'fastai.vision.all', 'pandas', 'tabulate', 'matplotlib', 'pytest']
missing = [m for m in needed if importlib.util.find_spec(m.split('.')[0]) is None]
if not missing:
    for m in needed:
        try: importlib.import_module(m)
        except Exception as e: missing.append(f'{m} ({type(e).__name__}: {e})')
if missing: raise SystemExit(f"gpu.sh: missing: {', '.join(missing)}; see ../shared/gpu/prepare")
PY
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    [ -n "$TRIAL" ] || { echo "gpu.sh: no GPU here (torch.cuda.is_available() is False): nothing trained" >&2; exit 2; }
    echo "gpu.sh: a trial on the CPU ($TRIAL), into $ROOT"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

failed=0
step() {   # "$@" with what is left of the budget; one stopped by the budget keeps what it finished
    local left=$((end - SECONDS))
    if [ "$left" -lt 60 ]; then echo "=== skipped, the budget is spent: $*"; return 0; fi
    echo "=== $* (${left} s left)"
    timeout -s INT -k 30 "$left" "$@"
    local rc=$?
    echo "=== exit $rc at $((SECONDS - end + BUDGET)) s of the budget: $1 $2"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "=== stopped by the budget: $1 $2"; return 0; fi
    return $rc
}

run_stage() {
    case $1 in
    study)
        step python -m pytest -q -x tests/test_cuda.py -p no:cacheprovider || return 1
        step python scripts/run_all.py --out "$ROOT/gpu" $([ -n "${FRESH:-}" ] || echo --resume) $norms $TRIAL ;;
    speed)
        speed_steps=$([ -n "$TRIAL" ] && echo "--steps 3 --warmup 1 --rounds 1")
        step python benchmarks/speed.py --out "$ROOT/gpu/speed.json" --resume $speed_steps ;;
    batch-sizes) step python scripts/batch_sizes.py --out "$ROOT" --resume $norms $TRIAL ;;
    search) step python benchmarks/search.py --out "$ROOT" --resume --confirm "$CONFIRM" $norms $TRIAL ;;
    esac
}

for s in "${stages[@]}"; do
    log=${OUT:+$OUT/$s.log}
    [ -n "${OUT:-}" ] && mkdir -p "$OUT"
    run_stage "$s" 2>&1 | tee ${log:-/dev/null}
    rc=${PIPESTATUS[0]}
    [ $rc -eq 0 ] || { echo "=== stage $s failed (exit $rc)"; failed=1; }
    if [ -n "${OUT:-}" ]; then   # what comes back from the GPU machine: one archive a stage
        present=$(cd "$ROOT" && for f in ${WRITES[$s]}; do [ -e "$f" ] && echo "$f"; done)
        [ -n "$present" ] && tar czf "$OUT/$s.tgz" -C "$ROOT" --transform 's,^,results/,' $present
    fi
done
exit $failed
