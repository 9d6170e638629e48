"""Recipe search: the same budget for every normalization, chosen on held-out training images.

    python benchmarks/search.py --resume                 # every cell of GRID at the rules' full length
    python benchmarks/search.py --confirm 3 --resume     # then the best 3 of each norm at 2 more seeds
    python benchmarks/search.py --epochs 4 --confirm 2   # a quick screen, the best 2 at full length

Every registered norm gets the same cells: each optimizer of `GRID` at each of its peak learning rates and
weight decays, with the rest of the norm's recipe. A cell trains on the training images but `HOLDOUT` of them
and is scored on those (`Recipe.holdout`): the test set plays no part in any choice. The screen runs every
cell for --epochs (the rules' full length unless told); --confirm k runs the k best screen cells of each norm
at full length for the screen's seed and --seeds more, and a norm's choice is the confirmed cell of the best
mean. A norm's cells of one optimizer train as one fused network where that was measured faster on this kind
of machine (--fuse; normnets_fused.FUSED_FASTER). Cells go to
<out>/search/<norm>-<opt>-lr<lr>-wd<wd>-e<epochs>/ (-s<seed> for a seed other than 0); the table to
<out>/search.csv and the figure to <out>/search.png, both written from every finished cell, also after a
Ctrl-C. The cells are ordered so that every norm has finished
the same cells whenever the search stops.
"""
from dataclasses import replace
from pathlib import Path

import matplotlib
import pandas as pd
from fastcore.script import call_parse, CliError

from normnets import MAX_EPOCHS
from normnets_data import find_data, load_cifar
from normnets_device import keep_freed_memory
from normnets_recipes import HOLDOUT, recipe
from normnets_files import check_out, locked
from normnets_cli import StudyError, cli_errors, parse_fuse, parse_norms, path_option
from normnets_study import (COMMITTED, check_committed, how_to_train, join_cluster, plan_frame,
                            quick_options, run_plan)
import normnets_plots as plots

# Per optimizer: peak learning rates, a log grid of factor-2 steps around the usual values for it, and weight
# decays. The 4-epoch search chose rates at its grid's edges (batch norm's largest for both optimizers), so
# this grid reaches a step past them on both sides, and past the weight decays chosen at the edges. Adam's
# weight decay is decoupled (fastai's default); SGD's is L2, added to the gradient, as PyTorch's SGD does.
GRID = {'adam': dict(lr=(1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2), wd=(0.1, 0.05, 0.01, 0.002)),
        'sgd': dict(lr=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8), wd=(5e-4, 1e-4, 2e-5))}


def cell_dir(out: Path, r) -> Path:
    "A cell's folder: seed 0's unsuffixed, every other seed's named by it (whatever --seed began with)."
    seed = f'-s{r.seed}' if r.seed else ''
    return out / 'search' / f'{r.norm}-{r.opt}-lr{r.lr:g}-wd{r.wd:g}-e{r.epochs}{seed}'


def screen_plan(norms, epochs, out, **overrides) -> list:
    """Every cell of GRID for every norm, in an order that keeps a stopped search balanced: the norms take
    turns, then the optimizers, then the learning rates, with each optimizer's first weight decay first."""
    cells = [(opt, lr, wd) for opt, g in GRID.items() for lr in g['lr'] for wd in g['wd']]
    place = lambda c: (GRID[c[0]]['wd'].index(c[2]), GRID[c[0]]['lr'].index(c[1]), list(GRID).index(c[0]))
    cells.sort(key=place)
    return [(f"{n} norm, {opt}, peak lr {lr:g}, weight decay {wd:g}", r, cell_dir(out, r))
            for opt, lr, wd in cells for n in norms
            for r in [recipe(n, opt=opt, lr=lr, wd=wd, epochs=epochs, holdout=HOLDOUT, **overrides)]]


def confirm_plan(screen, k: int, seeds: int, out) -> list:
    """The `k` best finished screen cells of each norm by held-out accuracy, at the rules' full length, for
    the screen's seed and `seeds` more (a screen of full length holds the first of them already)."""
    df = plan_frame(screen, out)
    if not len(df): return []
    best = df.sort_values('test_acc', ascending=False).groupby('norm', sort=False).head(k)
    by_run = {d.relative_to(out).as_posix(): r for _, r, d in screen}
    return [(f"{r.norm} norm, {r.opt}, peak lr {r.lr:g}, weight decay {r.wd:g}, seed {r.seed} (confirm)", r,
             cell_dir(out, r))
            for run in best.run for first in [by_run[run]]
            for seed in range(first.seed, first.seed + 1 + seeds)
            for r in [replace(first, epochs=MAX_EPOCHS, seed=seed)]]


@call_parse
def main(
    norms: str = None,     # norms to search, comma-separated (default: every registered norm)
    epochs: int = MAX_EPOCHS,   # epochs of a screen cell, the same for every cell
    confirm: int = 0,      # after the screen: the best k cells of each norm at full length, at more seeds
    seeds: int = 2,        # seeds a confirmed cell runs at besides the screen's
    seed: int = 0,         # seed of every cell
    data: str = None,      # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    out: str = None,       # results folder (default: results/)
    n_train: int = None,   # train on a random subset (quick checks only)
    n_test: int = None,    # score on a random subset of the held-out images (quick checks only)
    bs: int = None,        # batch size (default: each norm's recipe)
    precision: str = None,  # pin every cell's precision (fp32, bf16), so one search can span machines
    resume: bool = False,  # keep cells already finished with the same recipe
    jobs: int = None,  # cells at once, a process each (default: GPU 4, AMX CPU 2, at most 1 a core; else 1)
    fuse: str = 'auto',    # yes: a norm's cells of an optimizer as one network; no; auto: where it is faster
    replace_results: bool = False,   # let cells of other settings (--n-train, --bs...) replace results/
    cluster: str = None,   # train on a Ray cluster: auto (this machine's, or $RAY_ADDRESS) or host:port
    threads: int = 2,      # CPU threads of each run on a --cluster
):
    """Search each norm's optimizer, peak learning rate and weight decay with the same budget; write
    search.csv/png."""
    matplotlib.use('Agg')
    keep_freed_memory()
    with cli_errors():   # bad values, data or folders, before any work; Ctrl-C after the table is written
        names, fuse = parse_norms(norms), parse_fuse(fuse)
        if confirm < 0: raise StudyError(f"--confirm {confirm}: the best k cells of each norm, 0 or more")
        if seeds < 1: raise StudyError(f"--seeds {seeds}: a confirmed cell runs at 1 or more seeds more")
        given = dict(n_train=n_train, n_test=n_test, bs=bs, seed=seed, precision=precision)
        subset = {k: v for k, v in given.items() if v is not None}
        out = path_option('out', out, COMMITTED)
        screen = screen_plan(names, epochs, out, **subset)   # every recipe validated before any work
        jobs, fuse = how_to_train(screen[0][1], jobs, fuse)   # bad --jobs too
        check_committed(out, quick_options(names, dict(epochs=epochs, **subset)), replace_results)
        find_data(data)
        on = join_cluster(cluster, threads, screen[0][1])
        check_out(out)
        cifar = load_cifar(data)
        confirmed = []
        with locked(check_out(out / 'search')):
            try:
                run_plan(screen, cifar, resume, cell=True, jobs=jobs, fuse=fuse, chosen=set(subset),
                         cluster=on)
                confirmed = confirm_plan(screen, confirm, seeds, out) if confirm else []
                trained = {d for *_, d in screen}   # a full-length screen's cells are not trained twice
                run_plan([c for c in confirmed if c[2] not in trained], cifar, resume, cell=True, jobs=jobs,
                         fuse=fuse, chosen=set(subset), cluster=on)
            finally:   # the table of every finished cell, also after a Ctrl-C
                stages = {'screen': plan_frame(screen, out), 'confirm': plan_frame(confirmed, out)}
                finished = [d.assign(stage=stage) for stage, d in stages.items() if len(d)]
                df = pd.concat(finished) if finished else pd.DataFrame(columns=['test_acc'])
                df = df.rename(columns={'test_acc': 'holdout_acc'})
                if len(df):
                    df.to_csv(out / 'search.csv', index=False)
                    plots.search(df[df.stage == 'screen'], out / 'search.png')
                    best = df.sort_values('holdout_acc', ascending=False).groupby('norm').head(3)
                    shown = ['norm', 'stage', 'opt', 'lr', 'wd', 'epochs', 'seed', 'holdout_acc']
                    print(best[shown].to_string())
    missing = len(screen) + len(confirmed) - len(df)
    if missing: raise CliError(f"incomplete search: {missing} cells missing (run again with --resume)")
