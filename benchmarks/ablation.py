"""Ablation: each change to the training recipe measured on its own against the current recipe.

    python benchmarks/ablation.py --data ../shared/data/cifar10-jpeg.tgz --epochs 5

Every row trains the same variant with the same seed and data for --epochs epochs (short runs, to rank
changes cheaply), changing one thing. Writes results/ablation.md (and .csv) as each row finishes. The
current recipe's row reuses the committed study's run when one matches (full length, say: --epochs 20).
"""
import sys, tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
import pandas as pd
from fastcore.script import call_parse
from fastai.torch_core import default_device

from train import BS, LR, WD, PRECISION, train_variant, resolve_precision
from run_all import finished, recipe, run_dir
from normnets import norm_name
from normnets_data import REPO_DIR, load_cifar
import report

# (change, keyword arguments of train_variant that make it). The first row is the current recipe. The labels say
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
    ("group norm scales exempt from weight decay (from decayed, fastai's default)", dict(exempt_gn_scale=True)),
    ('widths c1=16, c2=16, c4=32, c7=24 and group norm scales exempt', dict(net=dict(c1=16, c2=16, c4=32, c7=24),
                                                                          exempt_gn_scale=True)),
]


def write_table(rows: list, out: Path):
    "ablation.csv (one row a run) and ablation.md (each run against the current recipe of its variant and epochs)."
    df = pd.DataFrame(rows)
    df['precision'] = df['precision'].fillna('fp32') if 'precision' in df else 'fp32'   # rows from before mixed precision
    df.to_csv(out.with_suffix('.csv'), index=False)
    key = ['norm', 'epochs', 'precision']   # a change is compared with the current recipe run the same way
    base = df[df.change == CHANGES[0][0]].set_index(key).test_acc
    base_acc = [base.get(k) for k in df[key].itertuples(index=False, name=None)]
    diff = 100 * (df.test_acc - pd.Series(base_acc, dtype=float))
    table = pd.DataFrame({
        'change': df.change, 'norm': df.norm, 'epochs': df.epochs, 'precision': df.precision,
        'params': df.params.map('{:,}'.format),
        'test acc % (current recipe)': [report.pct(a) for a in base_acc],
        'test acc % (with the change)': df.test_acc.map(report.pct),
        'difference (points)': diff.map(lambda d: '' if pd.isna(d) else f'{d:+.2f}'),
        'train s': df.seconds.map('{:.0f}'.format)})
    changed = (df.change != CHANGES[0][0]) & diff.notna()
    kinds = [('helped (more than +0.5 points)', changed & (diff > 0.5)),
             ('within 0.5 points, no clear effect for one seed', changed & (diff.abs() <= 0.5)),
             ('hurt (more than 0.5 points lost)', changed & (diff < -0.5))]
    verdict = '; '.join(f"{label}: " + ', '.join(f"{c} ({n}, {e} epochs, {d:+.2f})" for c, n, e, d in
                                                 zip(df.change[m], df.norm[m], df.epochs[m], diff[m]))
                        for label, m in kinds if m.any())
    out.write_text(f"Each row changes one thing in the recipe and trains the variant for the given epochs with seed "
                   f"{df.seed.iloc[0]}, on {df.device.iloc[0]}, data md5 `{df.data_md5.iloc[0]}` (written by "
                   "`benchmarks/ablation.py`). 'current recipe' is the recipe when the row ran; the change column says "
                   "what it was changed from. Seconds are wall time: rows that ran while other jobs shared the cores "
                   "took longer.\n\n" + report.markdown_table(table) + f"\nIn short, {verdict}.\n")


def study_run(norm: str, epochs: int, seed: int, data) -> dict | None:
    "The committed study's run of the current recipe with this length, seed and data, if there is one."
    norm = norm_name(norm)
    precision = resolve_precision(PRECISION, default_device())
    return finished(run_dir(REPO_DIR / 'results', norm, seed, 0),
                    **recipe(norm, epochs, BS, LR, WD, seed, load_cifar(data), precision=precision))


@call_parse
def main(
    norm:str='bn',     # variant to ablate
    epochs:int=5,      # epochs per run
    seed:int=0,        # seed of every run
    data:str=None,     # CIFAR-10 folder or .tgz
    only:str=None,     # comma-separated row numbers to run (default: all; 'none' rewrites the table only)
    out:str=None,      # table to write (default: results/ablation.md)
):
    "Train the variant once per change and tabulate test accuracy and seconds against the current recipe."
    out = Path(out) if out else REPO_DIR / 'results' / 'ablation.md'
    rows = pd.read_csv(out.with_suffix('.csv')).to_dict('records') if out.with_suffix('.csv').exists() else []
    picks = [] if only == 'none' else [int(i) for i in only.split(',')] if only else range(len(CHANGES))
    for i in picks:
        change, kwargs = CHANGES[i]
        m = study_run(norm, epochs, seed, data) if i == 0 else None   # the current recipe may be trained already
        if m: print(f"{change}: the study's run of it, {m['norm']} norm, seed {seed}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                m = train_variant(norm, epochs, seed=seed, data=data, out=Path(tmp) / 'run', **kwargs)
        rows = [r for r in rows if not (r['change'] == change and r['norm'] == m['norm'] and r['epochs'] == epochs)]
        rows.append(dict(change=change, norm=m['norm'], epochs=epochs, precision=m['precision'], seed=seed, params=m['params'],
                         test_acc=m['test_acc'], seconds=m['seconds'], device=m['device'], data_md5=m['data_md5']))
        write_table(rows, out)
        print(f"{change}: test accuracy {m['test_acc']:.4f} ({m['seconds']:.0f} s)", flush=True)
    if only == 'none' and rows: write_table(rows, out)   # each trained row already rewrote it
