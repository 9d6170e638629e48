"""Ablation: each change to the recipe or the network measured on its own against each norm's recipe.

    python benchmarks/ablation.py --epochs 4 --only 0,17,18 --resume       # every norm, 3 rows of CHANGES
    python benchmarks/ablation.py --norms gn --epochs 20 --only 0,21       # one norm, full length
    python benchmarks/ablation.py --epochs 4 --jobs 8 --resume             # on a GPU, 8 runs at once

Every row trains a variant with its recipe, the same seed and data for --epochs epochs (short runs rank
changes cheaply), changing one thing of the recipe (`dataclasses.replace`; `net` changes are merged into the
recipe's own). A change the recipe already has is skipped. Every norm gets the same rows, taking turns, so a
stopped ablation is balanced. Rows are scored on `HOLDOUT` training images set aside (`--holdout 0`: on the
test set, as the first rows were), so that no choice is made on the test set. Runs go to
<out>/ablation/<norm>-<row>-e<epochs>-s<seed>/ (`--resume` keeps finished ones, and takes a finished run of
the same recipe from another row's folder: a change a recipe has since adopted is its new 'current recipe');
each row goes to <out>/ablation.csv with the recipe it changed, beside the rows before it.
`scripts/report.py` turns the table into results/ablation.md.
"""
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
from fastcore.script import call_parse

from normnets import NORMS
from normnets_data import find_data, load_cifar
from normnets_device import keep_freed_memory
from normnets_recipes import HOLDOUT, OPTIMIZER_SETTINGS, RECIPES, Recipe, recipe, recipe_label
from normnets_files import check_out, check_run_dir, locked
from normnets_cli import StudyError, check_jobs, cli_errors, parse_fuse, parse_norms, path_option
from normnets_study import (COMMITTED, check_committed, how_to_train, join_cluster, kept_run, quick_options,
                            run_plan)


def base_changes(r: Recipe) -> dict:
    "What the recipe of the exercise norm that `r`'s norm builds on sets besides the optimizer settings."
    base = NORMS[r.norm].base
    return {k: v for k, v in RECIPES.get(base, {}).items() if k not in OPTIMIZER_SETTINGS} if base else {}


# (change, the recipe fields it changes, or a function of the recipe that gives them). The first row is the
# current recipe. Rows are only appended (a run's folder is named by its row). The labels say what each change
# was measured against: the recipe had batch size 512 when the first rows ran (256 since).
CHANGES = [
    ('current recipe', {}),
    ('peak lr 5e-3 (from 1e-2)', dict(lr=5e-3)),
    ('peak lr 2e-2 (from 1e-2)', dict(lr=2e-2)),
    ('no label smoothing (from 0.1)', dict(label_smoothing=0.0)),
    ('weight decay 0.01 (from 0.05)', dict(wd=0.01)),
    ('batch size 256 (from 512)', dict(bs=256)),
    ('wider 16x16 stage: c4=32, c7=26', dict(net=dict(c4=32, c7=26))),
    ('peak lr 3e-2 (from 1e-2)', dict(lr=3e-2)),
    ('group norm with 2 groups (from 4)', dict(net=dict(gn_groups=2))),
    ('batch size 128 (from 512)', dict(bs=128)),
    ('widths c1=16, c2=16 (from 12, 24)', dict(net=dict(c1=16, c2=16))),
    ('widths c1=16, c2=16, c4=32, c7=24 (from 12, 24, 24, 32)', dict(net=dict(c1=16, c2=16, c4=32, c7=24))),
    (
        "group norm scales exempt from weight decay (from decayed, fastai's default)",
        dict(exempt_gn_scale=True),
    ),
    (
        'widths c1=16, c2=16, c4=32, c7=24 and group norm scales exempt',
        dict(net=dict(c1=16, c2=16, c4=32, c7=24), exempt_gn_scale=True),
    ),
    ('norm after the ReLU (conv, ReLU, norm; from conv, norm, ReLU)', dict(net=dict(norm_after_relu=True))),
    ('residual branches start at zero (C5 and C9 norm scales 0)', dict(net=dict(zero_init_residual=True))),
    ('label smoothing 0.2 (from 0.1)', dict(label_smoothing=0.2)),
    ('average of the weights (EMA, decay 0.99 a step) scored and kept', dict(ema=0.99)),
    ('Lookahead around the optimizer (k 6, alpha 0.5)', dict(lookahead=True)),
    ('cutout of 8x8 pixels', dict(cutout=8)),
    ('mixup, alpha 0.2', dict(mixup=0.2)),
    ('C1 initialized as the whitening of 3x3 patches', dict(whiten_c1=True)),
    ('batch size 128 (from 256)', dict(bs=128)),
    ('8x8 stage wider, 16x16 thinner: c7=36, c4=20 (from 32, 24)', dict(net=dict(c4=20, c7=36))),
    ('skips around each of C4, C5, C8, C9 (from around C4 C5 and C8 C9)', dict(net=dict(skips='layer'))),
    # 2,276 more parameters (48,650) where they cost the most: 11.19 M MACs an image (1.26x), for the fit that
    # batch norm lacks (its train accuracy ends near 83%)
    ('wider 32x32 stage: c1=16, c2=32 (from 12, 24)', dict(net=dict(c1=16, c2=32))),
    ('random crops padded by 2 pixels (from 4)', dict(crop_pad=2)),
    # less augmentation again, for networks that fit too little (batch norm's train accuracy ends near 85%)
    ('random crops padded by 1 pixel (from 2)', dict(crop_pad=1)),
    # the exercise norm measured its changes one by one; the extra norm built on it takes them as one
    ("the exercise norm's batch size, crops and widths (from its own; extras only)", base_changes),
    # the search grid ended at the rates batch norm and the ws- norms chose: one step past it, for every norm
    ("peak lr twice the recipe's", lambda r: dict(lr=2 * r.lr)),
    # batch norm fits only ~85% of its training images, with 3,600 parameters left under the limit: spend
    # them where a weight costs least (64 multiply-accumulates per image at 8x8)
    ('wider 8x8 stage: c7=34 (from 32)', dict(net=dict(c7=34))),
    # a smooth activation, as airbench's: gradient flows for slightly negative inputs too, which a network
    # that fits too little may use
    ('GELU activations (from ReLU)', dict(net=dict(act='gelu'))),
]


def changed(base, fields):
    """`base` with `fields` replaced (`fields` may be a function of `base` that gives them); a `net` change is
    merged into the recipe's own network settings."""
    if callable(fields): fields = fields(base)
    if 'net' in fields: fields = {**fields, 'net': {**base.net, **fields['net']}}
    return replace(base, **fields)


def parse_rows(only: str | None) -> list[int]:
    "The rows of CHANGES that --only names (comma-separated numbers); all of them without it."
    if only is None: return list(range(len(CHANGES)))
    try: rows = [int(i) for i in only.split(',') if i.strip()]
    except ValueError: rows = []
    if not rows or any(not 0 <= i < len(CHANGES) for i in rows):
        raise StudyError(f"--only {only!r}: expected row numbers 0 to {len(CHANGES) - 1}, comma-separated")
    twice = sorted({i for i in rows if rows.count(i) > 1})
    if twice: raise StudyError(f"--only {only!r}: row {', '.join(map(str, twice))} given twice")
    return rows


def ablation_plan(norms, rows, out: Path, **settings) -> list:
    """(title, recipe, folder, change, base) for each row of CHANGES and norm, the norms taking turns; a
    change that a norm's recipe already has, or that breaks its network or the rules, is left out."""
    plan = []
    for i in rows:
        change, fields = CHANGES[i]
        for norm in norms:
            base = recipe(norm, **settings)
            try: r = changed(base, fields)
            except ValueError as e:   # e.g. widths that the norm's group count does not divide
                print(f"{change}: skipped, not a {base.norm} norm network: {e}")
                continue
            if i and r == base:
                print(f"{change}: skipped, the {base.norm} norm recipe has it already")
                continue
            folder = out / 'ablation' / f"{r.norm}-{i:02d}-e{r.epochs}-s{r.seed}"
            plan.append((f"{r.norm} norm, {change}", r, folder, change, recipe_label(base)))
    return plan


def reuse_identical_runs(plan, root: Path):
    """Copy into each unfinished run's folder a finished run of exactly its recipe from another folder under
    `root`, so that a recipe that has adopted a change does not train again what that change's row trained."""
    finished = [d for d in sorted(root.iterdir()) if (d / 'metrics.json').exists()] if root.exists() else []
    for _, r, folder, *_ in plan:
        if kept_run(folder, r): continue
        same = next((d for d in finished if d != folder and kept_run(d, r)), None)
        if same:
            # an older recipe's run: none of its files may stay (and nothing else is there: checked)
            if check_run_dir(folder).exists(): shutil.rmtree(folder)
            shutil.copytree(same, folder)
            print(f"{folder.name}: the same recipe as the finished run in {same.name}, copied")


def ablation_rows(plan) -> list:
    "A row of ablation.csv for each finished run of `plan`."
    rows = []
    for _, r, folder, change, base in plan:
        m = kept_run(folder, r)
        if m is None: continue
        rows.append(dict(change=change, norm=r.norm, epochs=r.epochs, precision=r.precision, seed=r.seed,
                         params=m['params'], test_acc=m['test_acc'], seconds=m['seconds'],
                         device=m['device_name'], data_md5=m['data_md5'], scored_on=m['evaluated_on'],
                         base=base))
    return rows


def write_rows(rows: list, f: Path):
    """Add `rows` to the table `f`, each replacing an older row of its change, norm, length, seed, scoring and
    base."""
    key = ['change', 'norm', 'epochs', 'seed', 'scored_on', 'base']
    old = pd.read_csv(f) if f.exists() else pd.DataFrame(columns=key)
    df = pd.concat([old, pd.DataFrame(rows)], ignore_index=True)
    filled = df[key].astype(str)   # rows from before a column existed compare as its missing value
    df[~filled.duplicated(keep='last')].to_csv(f, index=False)


@call_parse
def main(
    norms: str = None,         # norms to ablate, comma-separated (default: every registered norm)
    epochs: int = 5,           # epochs per run
    seed: int = 0,             # seed of every run
    data: str = None,          # CIFAR-10 folder or .tgz
    only: str = None,          # comma-separated row numbers of CHANGES to run (default: all)
    holdout: int = HOLDOUT,    # score on this many training images set aside (0: on the test set)
    n_train: int = None,       # train on a random subset (quick checks only)
    n_test: int = None,        # score on a random subset (quick checks only)
    precision: str = None,     # pin every run's precision (fp32, bf16), so one ablation can span machines
    out: str = None,           # results folder (default: results/): its ablation/ and ablation.csv
    resume: bool = False,      # keep runs already finished with the same recipe
    jobs: int = None,  # runs at once, a process each (default: GPU 4, AMX CPU 2, at most 1 a core; else 1)
    fuse: str = 'auto',        # yes: rows that differ only in lr, wd or crops as one network; no; auto: where
                               # measured faster on this kind of machine (normnets_fused.FUSED_FASTER)
    replace_results: bool = False,   # let rows of subsets (--n-train, --n-test) replace results/
    cluster: str = None,       # train on a Ray cluster: auto (this machine's, or $RAY_ADDRESS) or host:port
    threads: int = 2,          # CPU threads of each run on a --cluster
):
    "Train each norm once per change; record its accuracy and seconds beside its recipe's."
    keep_freed_memory()
    with cli_errors():   # bad values, data or folders, before any work; Ctrl-C after the rows are written
        rows = parse_rows(only)
        given = dict(n_train=n_train, n_test=n_test, precision=precision)
        settings = dict(epochs=epochs, seed=seed, holdout=holdout,
                        **{k: v for k, v in given.items() if v is not None})
        names, fuse = parse_norms(norms), parse_fuse(fuse)
        check_jobs(jobs, fuse)
        out = path_option('out', out, COMMITTED)
        plan = ablation_plan(names, rows, out, **settings)   # every recipe checked first
        runs = [p[:3] for p in plan]
        if runs: jobs, fuse = how_to_train(runs[0][1], jobs, fuse)
        check_committed(out, quick_options(names, dict(n_train=n_train, n_test=n_test)), replace_results)
        if plan: find_data(data)
        on = join_cluster(cluster, threads, runs[0][1]) if runs else None
        check_out(out)
        cifar = load_cifar(data) if plan else None
        with locked(check_out(out / 'ablation')):
            if resume: reuse_identical_runs(plan, out / 'ablation')
            try: run_plan(runs, cifar, resume, cell=True, jobs=jobs, fuse=fuse, cluster=on)
            finally: write_rows(ablation_rows(plan), out / 'ablation.csv')
