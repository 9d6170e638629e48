"""Recipe search: the same budget for every normalization, chosen on held-out training images.

    python benchmarks/search.py --epochs 4 --resume            # screen: every cell of GRID, short runs
    python benchmarks/search.py --confirm 3 --resume           # then the best 3 of each norm at full length
    python benchmarks/search.py --confirm 2 --jobs 8           # both on a GPU, 8 cells at once
    python benchmarks/search.py --fuse yes                     # a norm's cells of an optimizer as one network

Every registered norm gets the same cells: each optimizer of `GRID` at each of its peak learning rates and
weight decays, with the rest of the norm's recipe. A cell trains on the training images but `HOLDOUT` of them
and is scored on those (`Recipe.holdout`): the test set plays no part in any choice. The screen runs every
cell for --epochs; --confirm k reruns the k best screen cells of each norm for the rules' full length. Cells
go to <out>/search/<norm>-<opt>-lr<lr>-wd<wd>-e<epochs>/; the table to <out>/search.csv and the figure to
<out>/search.png, both written from every finished cell, also after a Ctrl-C. The cells are ordered so that
every norm has finished the same cells whenever the search stops.
"""
import json
from dataclasses import replace
from pathlib import Path

import matplotlib
import pandas as pd
from fastcore.script import call_parse, CliError

from normnets import MAX_EPOCHS
from normnets_data import HOLDOUT, REPO_DIR, load_cifar
from normnets_learner import keep_freed_memory, recipe
from normnets_files import check_out, locked
from normnets_fused import fusion_measured_faster
from normnets_study import check_jobs, cli_errors, parse_fuse, parse_norms, plan_frame, run_plan
import normnets_plots as plots

# Per optimizer: peak learning rates (a log grid around the usual values for it) and weight decays. Adam's
# weight decay is decoupled (fastai's default); SGD's is L2, added to the gradient, as PyTorch's SGD does.
GRID = {'adam': dict(lr=(2.5e-3, 5e-3, 1e-2, 2e-2), wd=(0.05, 0.01)),
        'sgd': dict(lr=(0.05, 0.1, 0.2, 0.4), wd=(5e-4, 1e-4))}
FIELDS = ['norm', 'opt', 'lr', 'wd', 'epochs', 'seed', 'net']


def cell_dir(out: Path, r) -> Path:
    return out / 'search' / f'{r.norm}-{r.opt}-lr{r.lr:g}-wd{r.wd:g}-e{r.epochs}'


def screen_plan(norms, epochs, out, **overrides) -> list:
    """Every cell of GRID for every norm, in an order that keeps a stopped search balanced: the norms take
    turns, then the optimizers, then the learning rates, with each optimizer's first weight decay first."""
    cells = [(opt, lr, wd) for opt, g in GRID.items() for lr in g['lr'] for wd in g['wd']]
    place = lambda c: (GRID[c[0]]['wd'].index(c[2]), GRID[c[0]]['lr'].index(c[1]), list(GRID).index(c[0]))
    cells.sort(key=place)
    return [(f"{n} norm, {opt}, peak lr {lr:g}, weight decay {wd:g}", r, cell_dir(out, r))
            for opt, lr, wd in cells for n in norms
            for r in [recipe(n, opt=opt, lr=lr, wd=wd, epochs=epochs, holdout=HOLDOUT, **overrides)]]


def confirm_plan(screen, k: int, epochs: int, out) -> list:
    "The `k` best finished screen cells of each norm by held-out accuracy, at `epochs` epochs."
    df = plan_frame(screen, FIELDS)
    if not len(df): return []
    best = df.sort_values('test_acc', ascending=False).groupby('norm', sort=False).head(k)
    by_run = {f'{d.parent.name}/{d.name}': r for _, r, d in screen}
    return [
        (f"{r.norm} norm, {r.opt}, peak lr {r.lr:g}, weight decay {r.wd:g} (confirm)", r, cell_dir(out, r))
        for run in best.run
        for r in [replace(by_run[run], epochs=epochs)]
    ]


@call_parse
def main(
    norms: str = None,     # norms to search, comma-separated (default: every registered norm)
    epochs: int = 4,       # epochs of a screen cell, the same for every cell
    confirm: int = 0,      # after the screen: rerun the best k cells of each norm for the rules' full length
    seed: int = 0,         # seed of every cell
    data: str = None,      # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    out: str = None,       # results folder (default: results/)
    n_train: int = None,   # train on a random subset (quick checks only)
    n_test: int = None,    # score on a random subset of the held-out images (quick checks only)
    bs: int = None,        # batch size (default: each norm's recipe)
    precision: str = None,  # pin every cell's precision (fp32, bf16), so one search can span machines
    resume: bool = False,  # keep cells already finished with the same recipe
    jobs: int = 1,         # cells trained at once, each in a process of its own (a GPU: several; a CPU: 1)
    fuse: str = 'auto',    # yes: a norm's cells of an optimizer as one network; no; auto: as speed.py found
):
    """Search each norm's optimizer, peak learning rate and weight decay with the same budget; write
    search.csv/png."""
    matplotlib.use('Agg')
    keep_freed_memory()
    with cli_errors():   # bad values, data or folders, before any work; Ctrl-C after the table is written
        names, fuse = parse_norms(norms), parse_fuse(fuse)
        check_jobs(jobs)
        given = dict(n_train=n_train, n_test=n_test, bs=bs, seed=seed, precision=precision)
        subset = {k: v for k, v in given.items() if v is not None}
        out = Path(out) if out else REPO_DIR / 'results'
        screen = screen_plan(names, epochs, out, **subset)   # every recipe validated before any work
        check_out(out)
        row = len(GRID[screen[0][1].opt]['lr']) * len(GRID[screen[0][1].opt]['wd'])   # the cells fused as one
        if fuse is None: fuse = jobs == 1 and fusion_measured_faster(screen[0][1].device, row)
        cifar = load_cifar(data)
        confirmed = []
        with locked(check_out(out / 'search')):
            try:
                run_plan(screen, cifar, resume, cell=True, jobs=jobs, fuse=fuse)
                confirmed = confirm_plan(screen, confirm, MAX_EPOCHS, out) if confirm else []
                run_plan(confirmed, cifar, resume, cell=True, jobs=jobs, fuse=fuse)
            finally:   # the table of every finished cell, also after a Ctrl-C
                df = pd.concat([plan_frame(screen, FIELDS).assign(stage='screen'),
                                plan_frame(confirmed, FIELDS).assign(stage='confirm')])
                df = df.rename(columns={'test_acc': 'holdout_acc'})
                if len(df):
                    df['net'] = df.net.map(json.dumps)   # the network options, one readable cell
                    df.to_csv(out / 'search.csv', index=False)
                    plots.search(df[df.stage == 'screen'], out / 'search.png')
                    print(df.sort_values('holdout_acc', ascending=False).groupby('norm').head(3).to_string())
    missing = len(screen) + len(confirmed) - len(df)
    if missing: raise CliError(f"incomplete search: {missing} cells missing (run again with --resume)")
