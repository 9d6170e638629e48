"""Batch size: every variant of the study trained at several batch sizes, to show where each normalization
breaks.

    python scripts/batch_sizes.py --data ../shared/data/cifar10-jpeg.tgz --epochs 3 --resume

Batch norm normalizes over the batch, group and layer norm over each image alone: small batches make batch
norm's statistics noisy, and should leave the others alone. Each cell is a run of the norm's recipe at that
batch size, with the peak learning rate scaled by the square root of the batch size over the recipe's (one
rule for every norm). Cells go to <out>/batch_size/<norm>-bs<k>-seed<s>/ (history and metrics); the table to
<out>/batch_size.csv and the figure to <out>/batch_size.png, both written from every finished cell, also after
a Ctrl-C. Small batches take many more steps an epoch (see each cell's seconds): choose --epochs by what the
machine allows, the same for every cell.
"""
import math
from dataclasses import replace
from pathlib import Path

import matplotlib
from fastcore.script import call_parse, CliError

from normnets_data import REPO_DIR, load_cifar
from normnets_files import check_out, locked
from normnets_learner import keep_freed_memory, recipe
from normnets_study import StudyError, cli_errors, parse_norms, plan_frame, run_plan
import normnets_plots as plots

SIZES = '4,16,64,256'


def parse_sizes(text: str) -> list[int]:
    "The batch sizes of a comma-separated list, smallest first; refused unless whole numbers of 1 or more."
    try: sizes = sorted({int(b) for b in str(text).split(',') if b.strip()})
    except ValueError: sizes = []
    if not sizes or sizes[0] < 1:
        raise StudyError(f"--sizes {text!r}: expected batch sizes of 1 or more, comma-separated (16,64,256)")
    return sizes


def cell_recipe(norm: str, bs: int, epochs: int, seed: int, **overrides):
    "The norm's recipe at batch size `bs`: peak learning rate x sqrt(bs / the recipe's batch size)."
    r = recipe(norm, epochs=epochs, seed=seed, **overrides)
    return replace(r, bs=bs, lr=r.lr * math.sqrt(bs / r.bs))


@call_parse
def main(
    norms:str=None,        # norms to train, comma-separated (default: every registered norm)
    sizes:str=SIZES,       # training batch sizes, comma-separated
    epochs:int=None,       # epochs per cell, the same for every cell (default: the recipe's)
    seed:int=0,            # first seed
    seeds:int=1,           # seeds per cell
    data:str=None,         # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    out:str=None,          # results folder (default: results/)
    n_train:int=None,      # train on a random subset (quick checks only)
    n_test:int=None,       # evaluate on a random subset (quick checks only)
    resume:bool=False,     # keep cells already finished with the same recipe
):
    "Train every norm at every batch size; write batch_size.csv and batch_size.png."
    matplotlib.use('Agg')
    keep_freed_memory()
    with cli_errors():   # bad values, data or folders, before any work; Ctrl-C after the table is written
        names, bss = parse_norms(norms), parse_sizes(sizes)[::-1]   # the slow small batches last
        subset = dict(n_train=n_train, n_test=n_test)
        base = {n: recipe(n, **subset) for n in names}
        out = Path(out) if out else REPO_DIR / 'results'
        plan = [(f"{n} norm, batch size {b}, seed {s}", r, out / 'batch_size' / f'{n}-bs{b}-seed{s}')
                for b in bss for s in range(seed, seed + seeds) for n in names
                for r in [cell_recipe(n, b, epochs or base[n].epochs, s, **subset)]]   # validated here
        check_out(out)
        cifar = load_cifar(data)
        with locked(check_out(out / 'batch_size')):   # one writer of the cells; other results stay free
            try: run_plan(plan, cifar, resume, cell=True)
            finally:   # the table of every finished cell, also after a Ctrl-C
                df = plan_frame(plan, ['norm', 'bs', 'lr', 'epochs', 'seed'])
                if len(df):
                    df.to_csv(out / 'batch_size.csv', index=False)
                    plots.batch_size(df, out / 'batch_size.png')
                    print(df.pivot_table(index='bs', columns='norm', values='test_acc').to_string())
    missing = len(plan) - len(df)
    if missing:
        raise CliError(f"incomplete grid: {missing} of {len(plan)} cells missing (run again with --resume)")
