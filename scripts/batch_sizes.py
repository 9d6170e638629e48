"""Batch size: the exercise's norms trained at several batch sizes, to show where each normalization breaks.

    python scripts/batch_sizes.py --data ../shared/data/cifar10-jpeg.tgz --resume   # the committed grid
    python scripts/batch_sizes.py --sizes 4 --norms batch,ws-group --resume --out /tmp/grid   # other cells

Batch norm normalizes over the batch, group and layer norm over each image alone: small batches make batch
norm's statistics noisy, and should leave the others alone. Each cell is a run of the norm's recipe at that
batch size, for the recipe's epochs (the rules' full length), with the peak learning rate scaled by the square
root of the batch size over the recipe's (`normnets_recipes.at_batch_size`, one rule for every norm), in
float32 unless --precision says otherwise, so that any kind of machine can continue a grid. The recipe's own
batch size is the study's cell: its runs in <out> (every seed) are taken as they are, not trained again. Batch
norm is scored twice: with its running averages, as usual, and with the statistics of each test batch of the
training batch size (the study's runs are scored so from their model.pkl). Where the command leaves it to
normnets, each batch size's cells train as measured fastest on this kind of machine: several at once, a
process each (normnets_study.JOBS_AT_ONCE_SMALL_BATCHES), or a cell's seeds as one fused network
(normnets_fused.FUSED_FASTER). Cells go to <out>/batch_size/<norm>-bs<k>-seed<s>/ (history and metrics); the
table to <out>/batch_size.csv and the figure to <out>/batch_size.png, both written from every finished cell,
also after a Ctrl-C. Small batches take many more steps an epoch (see each cell's seconds).
"""

import matplotlib
import pandas as pd
from fastcore.script import call_parse, CliError

from normnets_data import find_data, load_cifar
from normnets_files import check_out, locked
from normnets import NORMS
from normnets_device import keep_freed_memory
from normnets_recipes import BATCH_SIZE_GRID, STUDY_SEEDS, at_batch_size, recipe
from normnets_cli import StudyError, cli_errors, parse_fuse, parse_norms, path_option
from normnets_study import (COMMITTED, check_committed, how_to_train, join_cluster, plan_frame,
                            quick_options, run_dir, run_plan, study_batch_statistics)
import normnets_plots as plots

SIZES = ','.join(map(str, BATCH_SIZE_GRID))
EXERCISE = ','.join(n for n in NORMS if NORMS[n].exercise)   # batch, group and layer norm


def parse_sizes(text: str) -> list[int]:
    "The batch sizes of a comma-separated list, smallest first; refused unless whole numbers of 1 or more."
    try: sizes = sorted({int(b) for b in str(text).split(',') if b.strip()})
    except ValueError: sizes = []
    if not sizes or sizes[0] < 1:
        raise StudyError(f"--sizes {text!r}: expected batch sizes of 1 or more, comma-separated (16,64,256)")
    return sizes


@call_parse
def main(
    norms:str=EXERCISE,    # norms to train, comma-separated (all: every registered norm)
    sizes:str=SIZES,       # training batch sizes, comma-separated
    epochs:int=None,       # epochs per cell, the same for every cell (default: the recipe's)
    seed:int=0,            # first seed
    seeds:int=1,           # seeds per cell
    data:str=None,         # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    out:str=None,          # results folder (default: results/)
    n_train:int=None,      # train on a random subset (quick checks only)
    n_test:int=None,       # evaluate on a random subset (quick checks only)
    precision:str='fp32',  # every cell's (fp32, bf16, auto: the machine's): pinned, a grid spans machines
    resume:bool=False,     # keep cells already finished with the same recipe
    jobs:int=None,  # cells at once, a process each (default: GPU 4; 2 on AMX, bs<=32 on AVX512-BF16; else 1)
    fuse:str='auto',       # yes: a cell's seeds as one network; no; auto: where measured faster
    replace_results:bool=False,   # let cells of other settings (--epochs, --n-train...) replace results/
    cluster:str=None,      # train on a Ray cluster: auto (this machine's, or $RAY_ADDRESS) or host:port
    threads:int=2,         # CPU threads of each run on a --cluster
):
    "Train every norm at every batch size; write batch_size.csv and batch_size.png."
    matplotlib.use('Agg')
    keep_freed_memory()
    with cli_errors():   # bad values, data or folders, before any work; Ctrl-C after the table is written
        names, fuse = parse_norms(None if norms == 'all' else norms), parse_fuse(fuse)
        bss = parse_sizes(sizes)[::-1]   # the slow small batches last
        if seeds < 1: raise StudyError(f"--seeds {seeds}: need at least one")
        given = dict(epochs=epochs, n_train=n_train, n_test=n_test, precision=precision)
        given = {k: v for k, v in given.items() if v is not None}
        out = path_option('out', out, COMMITTED)
        plan = [(f"{n} norm, batch size {b}, seed {s}", r, out / 'batch_size' / f'{n}-bs{b}-seed{s}')
                for b in bss for n in names for s in range(seed, seed + seeds)
                for r in [at_batch_size(recipe(n, seed=s, **given), b)]]   # validated here
        # the recipe's own batch size: the study's runs of the same settings, as they are
        study = [(f"{n} norm, the study's seed {s}", r, run_dir(out, n, s)) for n in names
                 for s in range(STUDY_SEEDS) for r in [recipe(n, seed=s, **given)] if r.bs not in bss]
        how_to_train(plan[0][1], jobs, fuse)   # bad --jobs too
        check_committed(out, quick_options(names, given), replace_results)
        find_data(data)
        on = join_cluster(cluster, threads, plan[0][1])
        check_out(out)
        cifar = load_cifar(data)
        with locked(check_out(out / 'batch_size')):   # one writer of the cells; other results stay free
            try:
                for b in bss:   # how many at once by batch size, where the command leaves it to normnets
                    cells = [c for c in plan if c[1].bs == b]
                    b_jobs, b_fuse = how_to_train(cells[0][1], jobs, fuse)
                    run_plan(cells, cifar, resume, cell=True, jobs=b_jobs, fuse=b_fuse, chosen=set(given),
                             cluster=on)
            finally:   # the table of every finished cell, also after a Ctrl-C
                grid = plan_frame(plan, out, scores=('batch_stats_test_acc',))
                df = pd.concat([grid, study_batch_statistics(study, out, cifar)], ignore_index=True)
                if len(df):
                    df.to_csv(out / 'batch_size.csv', index=False)
                    plots.batch_size(df, out / 'batch_size.png')
                    print(df.pivot_table(index='bs', columns='norm', values='test_acc').to_string())
    missing = len(plan) - len(grid)   # the study's cells are not the grid's to train
    if missing:
        raise CliError(f"incomplete grid: {missing} of {len(plan)} cells missing (run again with --resume)")
