"""Ablation: each change to the training recipe measured on its own against the current recipe.

    python benchmarks/ablation.py --data ../shared/data/cifar10-jpeg.tgz --epochs 5

Every row trains the same variant with the same seed and data for --epochs epochs (short runs, to rank changes
cheaply), changing one thing of its recipe (`dataclasses.replace`). Writes results/ablation.csv as each row
finishes; `scripts/report.py` turns it into results/ablation.md. The current recipe's row reuses the committed
study's run when one matches (full length, say: --epochs 20).
"""
import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
from fastcore.script import call_parse

from normnets_data import REPO_DIR, load_cifar
from normnets_learner import keep_freed_memory, recipe, train_run
from normnets_study import kept_run, run_dir

# (change, the recipe fields it changes). The first row is the current recipe. The labels say
# what each change was measured against: the recipe had batch size 512 when these rows ran (256 since).
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
]


@call_parse
def main(
    norm:str='bn',     # variant to ablate
    epochs:int=5,      # epochs per run
    seed:int=0,        # seed of every run
    data:str=None,     # CIFAR-10 folder or .tgz
    only:str=None,     # comma-separated row numbers of CHANGES to run (default: all)
    out:str=None,      # table to write (default: results/ablation.csv)
):
    "Train the variant once per change; record test accuracy and seconds beside the current recipe's."
    keep_freed_memory()
    out = Path(out) if out else REPO_DIR / 'results' / 'ablation.csv'
    rows = pd.read_csv(out).to_dict('records') if out.exists() else []
    cifar, base = load_cifar(data), recipe(norm, epochs=epochs, seed=seed)
    for i in [int(i) for i in only.split(',')] if only else range(len(CHANGES)):
        change, fields = CHANGES[i]
        r = replace(base, **fields)
        m = kept_run(run_dir(REPO_DIR / 'results', r.norm, seed), r)   # the study may have trained it already
        if m: print(f"{change}: the study's run of it, {r.norm} norm, seed {seed}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                m = train_run(r, Path(tmp) / 'run', cifar=cifar, figures=False)
        rows = [
            row for row in rows if (row['change'], row['norm'], row['epochs']) != (change, r.norm, epochs)
        ]
        rows.append(
            dict(
                change=change,
                norm=r.norm,
                epochs=epochs,
                precision=r.precision,
                seed=seed,
                params=m['params'],
                test_acc=m['test_acc'],
                seconds=m['seconds'],
                device=m['device_name'],
                data_md5=m['data_md5'],
            )
        )
        pd.DataFrame(rows).to_csv(out, index=False)
        print(f"{change}: test accuracy {m['test_acc']:.4f} ({m['seconds']:.0f} s)", flush=True)
