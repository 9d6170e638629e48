"""Batch size: every variant of the study trained at several batch sizes, to show where each normalization
breaks.

    python scripts/batch_sizes.py --data ../shared/data/cifar10-jpeg.tgz --resume
    python scripts/batch_sizes.py --sizes 64,128,256 --norms batch --resume   # a part of the grid

Batch norm normalizes over the batch, group and layer norm over each image alone: small batches make batch
norm's statistics noisy, and should leave the others alone. Each cell is a run of the norm's recipe at that
batch size, for the recipe's epochs (the rules' full length), with the peak learning rate scaled by the square
root of the batch size over the recipe's (`normnets_recipes.at_batch_size`, one rule for every norm). Batch
norm is scored twice: with its running averages, as usual, and with the statistics of each test batch of the
training batch size. A cell's seeds train as one fused network where that was measured faster on this kind of
machine (--fuse; normnets_fused.FUSED_FASTER). Cells go to <out>/batch_size/<norm>-bs<k>-seed<s>/ (history
and metrics); the table to <out>/batch_size.csv and the figure to <out>/batch_size.png, both written from
every finished cell, also after a Ctrl-C. Small batches take many more steps an epoch (see each cell's
seconds).
"""

import matplotlib
from fastcore.script import call_parse, CliError

from normnets_data import find_data, load_cifar
from normnets_files import check_out, locked
from normnets import NORMS
from normnets_device import keep_freed_memory
from normnets_recipes import at_batch_size, recipe
from normnets_cli import StudyError, cli_errors, parse_fuse, parse_norms, path_option
from normnets_study import (COMMITTED, check_committed, how_to_train, plan_frame, quick_options,
                            run_plan)
import normnets_plots as plots

SIZES = '8,16,32,64,128,256'
# Seeds a cell: the seeds' spread is part of the exercise norms' result; one is enough for the other variants.
SEEDS = {True: 2, False: 1}   # by whether the norm is one of the exercise's


def parse_sizes(text: str) -> list[int]:
    "The batch sizes of a comma-separated list, smallest first; refused unless whole numbers of 1 or more."
    try: sizes = sorted({int(b) for b in str(text).split(',') if b.strip()})
    except ValueError: sizes = []
    if not sizes or sizes[0] < 1:
        raise StudyError(f"--sizes {text!r}: expected batch sizes of 1 or more, comma-separated (16,64,256)")
    return sizes


@call_parse
def main(
    norms:str=None,        # norms to train, comma-separated (default: every registered norm)
    sizes:str=SIZES,       # training batch sizes, comma-separated
    epochs:int=None,       # epochs per cell, the same for every cell (default: the recipe's)
    seed:int=0,            # first seed
    seeds:int=None,        # seeds per cell (default: 2 for the exercise norms, 1 for the others)
    data:str=None,         # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    out:str=None,          # results folder (default: results/)
    n_train:int=None,      # train on a random subset (quick checks only)
    n_test:int=None,       # evaluate on a random subset (quick checks only)
    precision:str=None,    # pin every cell's precision (fp32, bf16), so one grid can span machines
    resume:bool=False,     # keep cells already finished with the same recipe
    jobs:int=None,  # cells at once, a process each (default: GPU 4, AMX CPU 2, at most 1 a core; else 1)
    fuse:str='auto',       # yes: a cell's seeds as one network; no; auto: where measured faster
    replace_results:bool=False,   # let cells of other settings (--epochs, --n-train...) replace results/
):
    "Train every norm at every batch size; write batch_size.csv and batch_size.png."
    matplotlib.use('Agg')
    keep_freed_memory()
    with cli_errors():   # bad values, data or folders, before any work; Ctrl-C after the table is written
        names, fuse = parse_norms(norms), parse_fuse(fuse)
        bss = parse_sizes(sizes)[::-1]   # the slow small batches last
        if seeds is not None and seeds < 1: raise StudyError(f"--seeds {seeds}: need at least one")
        n_seeds = {n: seeds or SEEDS[NORMS[n].exercise] for n in names}
        given = dict(epochs=epochs, n_train=n_train, n_test=n_test, precision=precision)
        given = {k: v for k, v in given.items() if v is not None}
        out = path_option('out', out, COMMITTED)
        plan = [(f"{n} norm, batch size {b}, seed {s}", r, out / 'batch_size' / f'{n}-bs{b}-seed{s}')
                for b in bss for n in names for s in range(seed, seed + n_seeds[n])
                for r in [at_batch_size(recipe(n, seed=s, **given), b)]]   # validated here
        jobs, fuse = how_to_train(plan[0][1], jobs, fuse)   # bad --jobs too
        check_committed(out, quick_options(names, given), replace_results)
        find_data(data)
        check_out(out)
        cifar = load_cifar(data)
        with locked(check_out(out / 'batch_size')):   # one writer of the cells; other results stay free
            try: run_plan(plan, cifar, resume, cell=True, jobs=jobs, fuse=fuse, chosen=set(given))
            finally:   # the table of every finished cell, also after a Ctrl-C
                df = plan_frame(plan, scores=('batch_stats_test_acc',))
                if len(df):
                    df.to_csv(out / 'batch_size.csv', index=False)
                    plots.batch_size(df, out / 'batch_size.png')
                    print(df.pivot_table(index='bs', columns='norm', values='test_acc').to_string())
    missing = len(plan) - len(df)
    if missing:
        raise CliError(f"incomplete grid: {missing} of {len(plan)} cells missing (run again with --resume)")
