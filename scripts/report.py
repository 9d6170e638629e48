"""Write README.md from the result files under results/: every number and figure in it comes from them.

    python scripts/report.py                  # results/ -> README.md
    python scripts/report.py --results /tmp/study --readme /tmp/study/README.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pandas as pd
import torch
from fastcore.script import call_parse

from normnets import NORMS, PARAM_LIMIT, WIDTHS, GN_GROUPS, normnet, count_params, count_macs
from normnets_data import REPO_DIR

PCT_COLUMNS = ('train_acc', 'train_acc_std', 'best_test_acc', 'test_acc', 'test_acc_std')


def markdown_table(df: pd.DataFrame) -> str:
    "A pandas table as GitHub markdown (pandas' own to_markdown needs an extra package)."
    cells = df.astype(object).fillna('').astype(str)   # missing values (NaN, None) as empty cells
    lines = ['| ' + ' | '.join(map(str, df.columns)) + ' |', '|' + '---|' * len(df.columns)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in cells.values.tolist()]
    return '\n'.join(lines) + '\n'


def pct(x, digits=2) -> str: return '' if pd.isna(x) else f'{100 * x:.{digits}f}'


def summary_markdown(summary: pd.DataFrame, missing=()) -> str:
    "The results table (accuracies in %, mean ± standard deviation over seeds where there are several)."
    t = pd.DataFrame({'norm': summary.norm, 'params': summary.params.map('{:,}'.format), 'epochs': summary.epochs,
                      'seeds': summary.seeds})
    for col, name in (('train_acc', 'train acc %'), ('test_acc', 'test acc %')):
        t[name] = [pct(m) + (f' ± {pct(s)}' if pd.notna(s) else '') for m, s in zip(summary[col], summary[f'{col}_std'])]
    t['best test acc %'] = summary.best_test_acc.map(pct)
    t['test acc % with flip TTA'] = summary.tta_test_acc.map(pct)
    t['train loss'] = summary.train_loss.map('{:.3f}'.format)
    t['test loss'] = summary.test_loss.map('{:.3f}'.format)
    t['epochs to 70%'] = summary.epochs_to_70.map(lambda e: '' if pd.isna(e) else f'{round(e, 1):g}')   # mean over seeds
    t['train s'] = summary.seconds.map('{:.0f}'.format)
    text = markdown_table(t)
    if len(summary):
        text += f"\nDevice: {summary.device.iloc[0]}. Data: {summary.data.iloc[0]} (md5 `{summary.data_md5.iloc[0]}`).\n"
    if missing: text += f"\n**Missing (not finished): {', '.join(missing)}.**\n"
    return text


def runs_markdown(runs: pd.DataFrame) -> str:
    "One row per run: the spread behind the means."
    runs = runs.sort_values(['norm', 'seed'], key=lambda c: c.map(NORMS.index) if c.name == 'norm' else c)
    return markdown_table(pd.DataFrame({
        'norm': runs.norm, 'seed': runs.seed, 'train acc %': runs.train_acc.map(pct), 'test acc %': runs.test_acc.map(pct),
        'test acc % with flip TTA': runs.tta_test_acc.map(pct),
        'epochs to 70%': runs.epochs_to_70.map(lambda e: '' if pd.isna(e) else f'{e:g}'),
        'train s': runs.seconds.map('{:.0f}'.format), 'folder': runs.run.map(lambda r: f'`{r}`')}))


def architecture_markdown() -> str:
    "The layer table (output shape and parameters of each layer) and, per variant, its norm layers, parameters, MACs."
    model, rows = normnet('batch'), []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: rows.append((name, m, tuple(o.shape[1:]))))
             for name, m in model.named_children()]
    model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks: h.remove()
    layers = pd.DataFrame({
        'layer': [n for n, _, _ in rows],
        'what': [describe_layer(n, m) for n, m, _ in rows],
        'output (C, H, W)': [' x '.join(map(str, s)) for _, _, s in rows],
        'parameters': [f'{count_params(m):,}' for _, m, _ in rows]})
    variants = pd.DataFrame([dict(variant=f'{n} norm', normalization=norm_layer(n), parameters=f'{count_params(normnet(n)):,}',
                                  **{'MACs / image': f'{count_macs(normnet(n)) / 1e6:.2f} M'}) for n in NORMS])
    return markdown_table(layers) + '\n' + markdown_table(variants)


def describe_layer(name, m) -> str:
    if name == 'gap': return 'global average pool'
    if name == 'C10': return f'1x1 conv {m.in_channels} -> {m.out_channels} (logits)'
    conv = m[0]
    k = conv.kernel_size[0]
    what = f'{k}x{k} conv {conv.in_channels} -> {conv.out_channels}, norm, ReLU'
    if any(isinstance(l, torch.nn.MaxPool2d) for l in m): what = f'{k}x{k} conv {conv.in_channels} -> {conv.out_channels}, 2x2 max-pool, norm, ReLU'
    if name in ('C5', 'C9'): what += f" (+ output of C{int(name[1]) - 2})"
    return what


def norm_layer(norm: str) -> str:
    return {'batch': 'BatchNorm2d: per channel over (N, H, W) of the batch',
            'group': f'GroupNorm({GN_GROUPS}, C): per sample over {GN_GROUPS} groups of channels x (H, W)',
            'layer': 'LayerNorm2d = GroupNorm(1, C): per sample over all of (C, H, W)'}[norm]


def load_study(results: Path):
    summary = pd.read_csv(results / 'summary.csv')
    runs = pd.read_csv(results / 'runs.csv')
    histories = {n: pd.read_csv(results / n / 'history.csv') for n in summary.norm}
    return summary, runs, histories


def findings_markdown(summary: pd.DataFrame, histories: dict) -> str:
    "The findings, each sentence built from the measured numbers."
    s = summary.set_index('norm')
    order = s.test_acc.sort_values(ascending=False)
    names = {n: f'{n} norm' for n in s.index}
    acc = lambda n: f"{pct(s.test_acc[n])}%" + (f" ± {pct(s.test_acc_std[n])}" if pd.notna(s.test_acc_std[n]) else '')
    lines = []
    ranking = ', then '.join(f"{names[n]} ({acc(n)})" for n in order.index)
    lines.append(f"- **Accuracy.** Ranked by final test accuracy: {ranking}"
                 f"{' (mean ± standard deviation over ' + str(int(s.seeds.iloc[0])) + ' seeds)' if s.seeds.iloc[0] > 1 else ''}. "
                 f"The gap between best and worst is {100 * (order.iloc[0] - order.iloc[-1]):.2f} points; every variant is "
                 f"{'above' if (s.test_acc > 0.7).all() else 'NOT above'} the 70% bar.")
    conv = '; '.join(f"{names[n]} after {round(s.epochs_to_70[n], 1):g}" if pd.notna(s.epochs_to_70[n])
                     else f"{names[n]} never" for n in s.index)
    early = '; '.join(f"{names[n]} {pct(h.test_acc.iloc[min(4, len(h) - 1)], 1)}%" for n, h in histories.items())
    mean = ' (mean over seeds)' if s.seeds.iloc[0] > 1 else ''
    lines.append(f"- **Convergence.** Epochs to first pass 70% test accuracy{mean}: {conv}. Test accuracy after "
                 f"epoch {min(5, min(len(h) for h in histories.values()))} (first seed): {early}.")
    drops = {n: (h.test_acc.diff().min(), int(h.epoch[h.test_acc.diff().idxmin()]) if len(h) > 1 else 0)
             for n, h in histories.items()}
    stab = '; '.join(f"{names[n]} {100 * -d:.2f} points (epoch {e})" if d < 0 else f"{names[n]} never dropped"
                     for n, (d, e) in drops.items())
    lines.append(f"- **Stability.** Largest fall of test accuracy from one epoch to the next: {stab}. "
                 "Batch norm's test curve is evaluated with running averages of batch statistics, which lag behind "
                 "the weights while the learning rate is high; group and layer norm compute the same statistics in "
                 "training and evaluation, so their test curves follow the training curve.")
    gaps = '; '.join(f"{names[n]} {100 * (s.train_acc[n] - s.test_acc[n]):.2f} points" for n in s.index)
    lines.append(f"- **Generalization.** Train minus test accuracy (train accuracy measured on the un-augmented "
                 f"training images after training): {gaps}. With fewer than {PARAM_LIMIT:,} parameters the "
                 "network underfits more than it overfits.")
    secs = '; '.join(f"{names[n]} {s.seconds[n] / s.epochs[n]:.1f} s" for n in s.index)
    lines.append(f"- **Cost.** Seconds per epoch (training and evaluation) on {s.device.iloc[0]}: {secs}.")
    lines.append("- **Batch size and inference.** Batch norm normalizes each channel over the batch, so its "
                 "statistics get noisy with small batches and it behaves differently in training and inference, "
                 "where fixed running averages replace them; they can then be folded into the convolution, free at "
                 "inference. Group norm (per sample, groups of channels) and layer norm (per sample, all channels) "
                 "do not depend on the batch at all: the same computation at batch size 1 or 512, in training and "
                 "inference, at the price of computing statistics at inference time too. Layer norm gives all "
                 "channels of a layer one mean and variance; group norm lets groups of channels keep their own "
                 "scale, which sits between the two.")
    return '\n'.join(lines) + '\n'


PRECISION_WORDS = {'fp32': 'float32', 'bf16': 'bfloat16 mixed precision', 'fp16': 'float16 mixed precision'}


def precision_markdown(results: Path) -> str:
    """The full study in float32 (the runs.csv of the last float32 study, kept in precision/fp32-runs.csv) against the
    current one, per variant: what mixed precision changed in accuracy and time."""
    kept, runs = results / 'precision' / 'fp32-runs.csv', pd.read_csv(results / 'runs.csv')
    if not kept.exists() or 'precision' not in runs or (runs.precision == 'fp32').all(): return ''
    old = pd.read_csv(kept)
    spread = lambda r: pct(r.test_acc.mean()) + (f" ± {pct(r.test_acc.std(ddof=1))}" if len(r) > 1 else '')
    epoch_s = lambda r: (r.seconds / r.epochs).mean()
    rows = []
    for norm in [n for n in NORMS if n in set(runs.norm)]:
        a, b = old[old.norm == norm], runs[runs.norm == norm]
        rows.append({'norm': norm, 'runs': f"{len(a)} / {len(b)}", 'test acc % float32': spread(a),
                     f"test acc % {PRECISION_WORDS[b.precision.iloc[0]].split()[0]}": spread(b),
                     'difference (points)': f"{100 * (b.test_acc.mean() - a.test_acc.mean()):+.2f}",
                     's / epoch float32': f"{epoch_s(a):.1f}", 's / epoch now': f"{epoch_s(b):.1f}",
                     'speed-up': f"{epoch_s(a) / epoch_s(b):.2f}x"})
    seeds = ', '.join(map(str, sorted(set(old.seed) | set(runs.seed))))
    return ("\nThe full study in both precisions (test accuracy: mean ± standard deviation over the runs, seeds "
            f"{seeds}):\n\n" + markdown_table(pd.DataFrame(rows)) + "\nThe seconds per epoch come from the two "
            "studies' own runs, which did not share a machine state; `benchmarks/speed.py` below measures the speed "
            "side by side.\n")


def study_minutes(runs: pd.DataFrame) -> str:
    "Wall time of the study's first seed (every variant, from loading the data to the last file), as a sentence."
    first = runs[runs.seed == runs.seed.min()]
    if 'wall_seconds' not in first or first.wall_seconds.isna().any(): return ''
    return (f"The study's first seed (3 variants x {first.epochs.iloc[0]} epochs, each run from loading the data to its "
            f"last file) took **{first.wall_seconds.sum() / 60:.1f} minutes** of wall time on {first.device.iloc[0]}.\n")


def section(path: Path, fallback: str) -> str:
    return path.read_text() if path.exists() else fallback


def write_readme(results: Path = REPO_DIR / 'results', readme: Path = REPO_DIR / 'README.md'):
    "README.md from the committed results."
    results, readme = Path(results), Path(readme)
    summary, runs, histories = load_study(results)
    rel = lambda p: Path(p).relative_to(readme.parent) if Path(p).is_relative_to(readme.parent) else Path(p)
    r = rel(results)
    per_class = pd.read_csv(results / 'per_class.csv').set_index('class')
    per_class_md = markdown_table(per_class.map(lambda x: pct(x, 1)).reset_index())
    worst = '; '.join(f"{n} norm: {per_class[n].idxmin()} ({pct(per_class[n].min(), 1)}%)" for n in per_class.columns)
    if 'batch' in per_class:
        gaps = per_class.drop(columns='batch').sub(per_class['batch'], axis=0)
        worst += '. Largest loss against batch norm: ' + '; '.join(
            f"{n} norm on {gaps[n].idxmin()} ({100 * gaps[n].min():+.1f} points)" for n in gaps.columns)
    figures = '\n'.join(f"### {n} norm\n\n![{n} norm curves]({r}/{n}/curves.png)\n\n"
                        f"![{n} norm misclassified]({r}/{n}/misclassified.png)\n\n"
                        f"![{n} norm confusion matrix]({r}/{n}/confusion.png)\n" for n in summary.norm)
    text = TEMPLATE.format(
        architecture=architecture_markdown(), summary=(results / 'summary.md').read_text() + '\n' + study_minutes(runs),
        findings=findings_markdown(summary, histories),
        per_class=per_class_md, worst=worst, runs=runs_markdown(runs), figures=figures, results=r,
        speed=section(results / 'speed.md', '_No speed benchmark has been recorded yet: run `python benchmarks/speed.py`._\n'),
        ablation=section(results / 'ablation.md', '_No ablation has been recorded yet._\n'),
        device=summary.device.iloc[0], data=summary.data.iloc[0], md5=summary.data_md5.iloc[0],
        bs=runs.bs.iloc[0], lr=runs.lr.iloc[0], wd=runs.wd.iloc[0], ls=runs.label_smoothing.iloc[0],
        torch=runs.torch.iloc[0], fastai=runs.fastai.iloc[0], precision_table=precision_markdown(results),
        precision=PRECISION_WORDS[runs.precision.iloc[0] if 'precision' in runs else 'fp32'], widths=', '.join(f'{k}={v}' for k, v in WIDTHS.items()))
    readme.write_text(text)
    return readme


TEMPLATE = """\
# normnets

Batch, group and layer normalization compared on CIFAR-10 in one tiny, fast-training network:
`C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP C10` with skip connections, under 50,000 parameters, trained for
at most 20 epochs with fastai's one-cycle schedule. It trains on a laptop CPU as well as on a GPU.

_This README is written by `scripts/report.py` from the files in [`{results}/`]({results}); do not edit it by hand.
Its numbers come from one real run of `scripts/run_all.py` on {device}, with torch {torch} and fastai {fastai}
in {precision}, on {data} (md5 `{md5}`); accuracy on that copy is a little lower than on the lossless PNG release._

## Set up, run, test

```bash
pip install -e .                 # torch, torchvision, fastai, matplotlib, pandas (CPU or GPU)
python scripts/run_all.py        # the whole study: 3 variants x 20 epochs -> results/, README.md
python -m pytest -q tests        # the tests (about 2 minutes on 2 CPU cores; NORMNETS_DATA names the data)
```

Data: `run_all.py`, `train.py` and `get_dls` take `--data`/`data=` (a folder in fastai's `URLs.CIFAR` layout,
`train/<class>/*.png|jpg` and `test/<class>/*.png|jpg`, or a `.tgz` of one), else the `NORMNETS_DATA`
environment variable, else `data/cifar10`, else they download the official release with fastai's
`untar_data(URLs.CIFAR)` into `data/`. Without a network, point them at a local copy:
`python scripts/run_all.py --data ../shared/data/cifar10-jpeg.tgz` (the tests read `NORMNETS_DATA`).
Images are decoded once and cached as uint8 arrays under `data/cache/`.

One variant: `python scripts/train.py --norm gn` (`--epochs`, `--bs`, `--lr`, `--seed`, `--data`, `--out`, `--precision`;
`--help` lists them). It writes `results/<norm>/`: `history.csv`, `metrics.json`, `model.pkl`, and the figures.
More than 20 epochs, or a model of 50,000 parameters or more, is refused before training starts.

## What the code is

| file | job |
|---|---|
| `normnets.py` | the network: `normnet(norm)` returns a plain `nn.Module` for `"batch"`, `"group"` or `"layer"` (`bn`, `gn`, `ln`) |
| `normnets_data.py` | CIFAR-10: finds, checks, decodes and caches it; `get_dls()` returns fastai `DataLoaders` |
| `scripts/train.py` | one variant in a fastai `Learner` with `fit_one_cycle`; history, metrics, export, figures |
| `scripts/run_all.py` | the study: every variant with the same data, seeds and schedule; summary tables and comparison |
| `scripts/plots.py` | the figures (fastai's `ClassificationInterpretation` for misclassified images and confusion) |
| `scripts/report.py` | this README, from the result files |
| `benchmarks/speed.py` | training and inference speed against the usual pipeline and the machine's matmul peak |
| `benchmarks/ablation.py` | short runs that change one thing in the recipe at a time |
| `tests/` | pytest: model rules, data errors, training refusals, a quick accuracy check, the study end to end |

In a Python or fastai session:

```python
from normnets import normnet, count_params
from normnets_data import get_dls
from fastai.vision.all import *

dls = get_dls('path/to/cifar10.tgz', bs=256)          # or get_dls() with NORMNETS_DATA set
learn = Learner(dls, normnet('gn'), metrics=accuracy)
learn.fit_one_cycle(5, 1e-2)

learn = load_learner('results/group/model.pkl')         # a trained variant
learn.predict('some_image.png')                         # ('cat', tensor(3), probabilities)
preds, _ = learn.get_preds(dl=learn.dls.test_dl(list_of_image_files))
```

Any image file works; it is resized to 32x32 if needed and normalized with the training set's statistics, as in training.

## The network

Every 3x3 and 1x1 convolution but C10 is followed by the variant's normalization and a ReLU (pooling comes
before the norm in c3 and c6, as in ResNet-9). Two skip connections add one layer to another: C3's output is
added to C5's, and C7's to C9's. Widths: {widths}. The full-resolution layers stay thin because a 3x3 weight costs
1,024 multiply-accumulates per image at 32x32 but 64 at 8x8: the parameters go where they are cheap.

{architecture}
Group norm uses {gn} groups in every layer (3 to 8 channels a group): one group would be layer norm, one
channel a group instance norm, whose statistics are noisy on 8x8 maps. Layer norm normalizes each sample over all of
(C, H, W), as the exercise defines it, with a per-channel scale and shift.

## Training

A fastai `Learner` with `fit_one_cycle` for 20 epochs: Adam with decoupled weight decay {wd} (fastai's default:
not on biases and batch norm's parameters, but on group norm's scale; taking it off made no clear difference in the
ablation below), peak learning rate {lr}, batch size {bs}, cross-entropy with label smoothing {ls}.
Augmentation: random crop with 4 pixels of padding and a horizontal flip, on whole uint8 batches. Inputs are
normalized with the training images' channel statistics. The same recipe, data and seeds for every variant.

Mixed precision (`--precision auto`, the default): where the hardware computes bfloat16 natively (x86 CPUs with
AVX512-BF16 or AMX, GPUs that support it) the convolutions run in bfloat16 under `torch.autocast`, through a
device-agnostic version of fastai's `MixedPrecision` callback (fastai's own autocasts on CUDA only); the weights, the
optimizer and the loss stay in float32, batch norm computes its statistics in float32, and group and layer norm compute
in float32 altogether. Older GPUs train in float16 with loss scaling. Other CPUs, most laptops' among them, train in
float32: oneDNN emulates bfloat16 on AVX-512 CPUs without those instructions, which is untested here.
`--precision fp32` forces float32. The exported `model.pkl` runs in float32.

On Linux, training keeps the memory PyTorch frees in the process (`keep_freed_memory` in `scripts/train.py`):
by default glibc hands each step's activation buffers back to the OS and faults them in again, zeroed, on the next step.
{precision_table}
## Results

{summary}
Accuracies in %. Train accuracy: one pass over the 50,000 training images without augmentation after training.
Test accuracy: the 10,000 test images after the last epoch ("best" is the best epoch, for reference only: the
reported number is the last epoch's, with no selection on the test set). Flip TTA: each test image's
probabilities averaged with its mirror image's, reported beside the plain score. Every run:

{runs}
The curves, grids and confusion matrices below are of each variant's first seed (`{results}/<norm>/`); the
other seeds' runs, with the same files, are in `{results}/seeds/`.

![comparison]({results}/comparison.png)

### Findings

{findings}
### Which classes each normalization gets wrong

Test accuracy per class (%):

{per_class}
Hardest class: {worst}.

{figures}
## Speed

`python benchmarks/speed.py` measures, in one run on one machine, normnets' training and inference throughput
through the real `get_dls` pipeline and fastai `Learner` loop, the usual way this exercise is trained (a
published 49,672-parameter solution, a plain PyTorch loop, per-image PIL transforms in a 2-worker
`DataLoader`, batch size 128), and the machine's matrix-multiply rate (in float32, and in bfloat16 when normnets
trains in it). Its second table measures what each speed choice is worth; the profile shows where a training step's
time goes.

{speed}
## Ablation

`python benchmarks/ablation.py --norm gn --epochs 5` trains one variant for a few epochs per change, one change
at a time, to rank changes cheaply before a full run. Short runs favour whatever learns fast, so a row is a hint,
not a verdict; each is one seed. With `--epochs 20` the rows are full-length runs, and the current recipe's row is
the study's own first-seed run.

{ablation}"""
TEMPLATE = TEMPLATE.replace('{gn}', str(GN_GROUPS))


@call_parse
def main(
    results:str=None,  # results folder (default: results/)
    readme:str=None,   # README to write (default: README.md)
):
    "Write the README from the result files."
    print(f"wrote {write_readme(results or REPO_DIR / 'results', readme or REPO_DIR / 'README.md')}")
