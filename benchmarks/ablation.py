"""Ablation: each change to the recipe or the network measured on its own against the current recipe.

    python benchmarks/ablation.py --norm gn --epochs 5 --only 0,14,15

Every row trains the same variant with the same seed and data for --epochs epochs (short runs, to rank changes
cheaply), changing one thing of its recipe (`dataclasses.replace`; `net` changes are merged into the recipe's
own). It is scored on `HOLDOUT` training images set aside (`--holdout 0`: on the test set, as the first rows
were), so that no choice is made on the test set. Writes results/ablation.csv as each row finishes;
`scripts/report.py` turns it into results/ablation.md.
"""
import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
from fastcore.script import call_parse

from normnets_data import HOLDOUT, REPO_DIR, load_cifar
from normnets_learner import keep_freed_memory, recipe, train_run

# (change, the recipe fields it changes). The first row is the current recipe. The labels say what each change
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
]


def changed(base, fields: dict):
    "`base` with `fields` replaced; a `net` change is merged into the recipe's own network settings."
    if 'net' in fields: fields = {**fields, 'net': {**base.net, **fields['net']}}
    return replace(base, **fields)


@call_parse
def main(
    norm: str = 'bn',          # variant to ablate
    epochs: int = 5,           # epochs per run
    seed: int = 0,             # seed of every run
    data: str = None,          # CIFAR-10 folder or .tgz
    only: str = None,          # comma-separated row numbers of CHANGES to run (default: all)
    holdout: int = HOLDOUT,    # score on this many training images set aside (0: on the test set)
    n_train: int = None,       # train on a random subset (quick checks only)
    n_test: int = None,        # score on a random subset (quick checks only)
    out: str = None,           # table to write (default: results/ablation.csv)
):
    "Train the variant once per change; record its accuracy and seconds beside the current recipe's."
    keep_freed_memory()
    out = Path(out) if out else REPO_DIR / 'results' / 'ablation.csv'
    rows = pd.read_csv(out).to_dict('records') if out.exists() else []
    subset = {k: v for k, v in dict(n_train=n_train, n_test=n_test).items() if v is not None}
    base = recipe(norm, epochs=epochs, seed=seed, holdout=holdout, **subset)
    picked = [int(i) for i in only.split(',')] if only else range(len(CHANGES))
    todo = []
    for i in picked:   # every recipe checked first; a change the recipe already has is no change
        r = changed(base, CHANGES[i][1])
        if i and r == base: print(f"{CHANGES[i][0]}: skipped, the {base.norm} norm recipe has it already")
        else: todo.append((CHANGES[i][0], r))
    if not todo: return
    cifar = load_cifar(data)
    scored_on = f'{holdout} held-out training images' if holdout else 'the test set'
    for change, r in todo:
        with tempfile.TemporaryDirectory() as tmp:
            m = train_run(r, Path(tmp) / 'run', cifar=cifar, figures=False)
        key = (change, r.norm, epochs, scored_on)
        rows = [row for row in rows
                if (row['change'], row['norm'], row['epochs'], row.get('scored_on', 'the test set')) != key]
        rows.append(dict(change=change, norm=r.norm, epochs=epochs, precision=r.precision, seed=seed,
                         params=m['params'], test_acc=m['test_acc'], seconds=m['seconds'],
                         device=m['device_name'], data_md5=m['data_md5'], scored_on=scored_on))
        pd.DataFrame(rows).to_csv(out, index=False)
        print(f"{change}: accuracy on {scored_on} {m['test_acc']:.4f} ({m['seconds']:.0f} s)", flush=True)



