"""One run: trained with its recipe, scored, and written to its folder (`train_run`), which the study, the
scripts, the benchmarks and the tests all use.

    from normnets_recipes import recipe
    from normnets_runs import train_run
    metrics = train_run(recipe('bn', epochs=5), 'runs/bn5')   # history, metrics, model and figures

Everything is written to a temporary folder beside the run's and moved into place at the end, so that an
interrupted run leaves nothing behind.
"""
import copy, json, math, platform, shutil, time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
import fastai
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from fastai.torch_core import set_seed

from normnets import PASS_ACCURACY, architecture_id, count_macs, count_params
from normnets_data import get_dls, plain_train_dl
from normnets_device import device_name
from normnets_recipes import Recipe
from normnets_learner import EpochSeconds, autocast_of, normnet_learner
from normnets_files import check_run_dir, private_tmp_dir, replace_run_dir
import normnets_plots as plots

__all__ = ['seed_run', 'recipe_dls', 'history_frame', 'evaluate', 'flip_tta_accuracy',
           'with_batch_statistics', 'shuffled_test_set', 'accuracy_at', 'batch_statistics_accuracy', 'finite',
           'train_run', 'write_run']


def seed_run(r: Recipe):
    """Seed Python, NumPy and torch for the run, and set cuDNN as the recipe asks: deterministic kernels
    (reproducible), or autotuned to the fastest (fastai's `set_seed` leaves autotuning as it found it)."""
    set_seed(r.seed, reproducible=r.reproducible)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not r.reproducible, r.reproducible


def recipe_dls(r: Recipe, data=None, cifar=None):
    "The `DataLoaders` a recipe trains on (its batch size, subsets, seed and device)."
    return get_dls(data, bs=r.bs, n_train=r.n_train, n_test=r.n_test, seed=r.seed, device=r.device,
                   cifar=cifar, holdout=r.holdout, crop_pad=r.crop_pad, cutout=r.cutout)


def history_frame(learn: Learner, seconds) -> pd.DataFrame:
    """The Recorder's per-epoch values as a table. train_loss is fastai's smoothed training loss at the
    epoch's end."""
    df = pd.DataFrame(learn.recorder.values, columns=learn.recorder.metric_names[1:-1])
    df = df.rename(
        columns={'train_accuracy': 'train_acc', 'valid_accuracy': 'test_acc', 'valid_loss': 'test_loss'}
    )
    df.insert(0, 'epoch', range(1, len(df) + 1))
    df['seconds'] = seconds
    return df[['epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'seconds']]


def evaluate(learn: Learner, out: Path, title: str) -> dict:
    """Figures and per-class accuracy of the trained model on the test set, from fastai's
    ClassificationInterpretation."""
    interp = ClassificationInterpretation.from_learner(learn)
    plots.misclassified_grid(interp, title, out / 'misclassified.png')
    plots.confusion(interp, title, out / 'confusion.png')
    cm = interp.confusion_matrix()
    per_class = pd.DataFrame({'class': list(interp.vocab), 'test_acc': cm.diagonal() / cm.sum(1)})
    per_class.to_csv(out / 'per_class.csv', index=False)
    return dict(zip(per_class['class'], per_class['test_acc']))


@torch.no_grad()
def flip_tta_accuracy(learn: Learner) -> float:
    "Test accuracy with test-time augmentation: each image's probabilities averaged with its mirror image's."
    learn.model.eval()
    correct = 0
    for x, y in learn.dls.valid:
        with autocast_of(learn): probs = learn.model(x).softmax(1) + learn.model(x.flip(-1)).softmax(1)
        correct = correct + (probs.argmax(1) == y).sum()   # summed on the device, read once
    return int(correct) / len(learn.dls.valid_ds)


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose batch norms normalize with each batch's statistics (momentum 0:
    the running averages are left as they were), as a model left in training mode would."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d): m.train(); m.momentum = 0.0
    return model


def shuffled_test_set(dls) -> tuple:
    """The whole test set as the model sees it (normalized) and its labels, shuffled once (seed 0): it is
    stored class by class, and in that order a batch would hold one class."""
    x, y = (torch.cat([t.as_subclass(torch.Tensor) for t in ts]) for ts in zip(*dls.valid))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(y.device)
    return x[order], y[order]


@torch.no_grad()
def accuracy_at(model: nn.Module, x, y, bs: int) -> float:
    "Accuracy of `model` on images `x` with labels `y` in batches of `bs`, counted on the device, read once."
    correct = sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(bs), y.split(bs)))
    return int(correct) / len(y)


def batch_statistics_accuracy(learn: Learner, bs: int) -> float | None:
    """Test accuracy of a batch-norm network scored with the statistics of each test batch of `bs` images (not
    its running averages): how it would score if it normalized at test time as it trained. The test images
    are shuffled once (`shuffled_test_set`): a batch of one class would be normalized with that class's
    statistics. None for a network without batch norm."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in learn.model.modules()): return None
    x, y = shuffled_test_set(learn.dls)
    with autocast_of(learn): return accuracy_at(with_batch_statistics(learn.model), x, y, bs)


def finite(o):
    "`o` with every NaN or infinity replaced by None, so that metrics.json stays valid JSON (a diverged run)."
    if isinstance(o, dict): return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)): return [finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o): return None
    return o


def train_run(r: Recipe, out, data=None, cifar=None, cell: bool = False, cbs=()) -> dict:
    """Train the recipe's variant and write its folder `out` (`write_run`), which may hold a run, replaced,
    and nothing else (checked before training); `cbs`: more callbacks of the fit. Returns the metrics."""
    start, out = time.perf_counter(), check_run_dir(out)
    seed_run(r)
    dls = recipe_dls(r, data, cifar)
    learn = normnet_learner(dls, r)
    timer = EpochSeconds()
    learn.fit_one_cycle(r.epochs, cbs=[timer, *cbs])
    return write_run(learn, r, out, history_frame(learn, timer.seconds), start, cell)


def write_run(learn: Learner, r: Recipe, out: Path, hist: pd.DataFrame, start: float, cell: bool = False,
              **recorded) -> dict:
    """Write the folder `out` of a trained run: history.csv (`hist`), metrics.json (results, the recipe, the
    versions, device, data, the files written and `recorded`), model.pkl (`learn.export`, float32, for
    `load_learner`), curves.png, misclassified.png/.csv, confusion.png and per_class.csv; a `cell` of a grid
    writes only history.csv and metrics.json. Everything is written to a temporary folder beside `out` and
    moved into place at the end, so an interrupted run leaves nothing behind. `start`: when the run began, on
    `time.perf_counter`'s clock. Returns the metrics."""
    dls = learn.dls
    tmp = private_tmp_dir(out)
    try:
        hist.to_csv(tmp / 'history.csv', index=False)
        title = f"{r.norm} norm"
        per_class = None
        if not cell:
            plots.curves(hist, title, tmp / 'curves.png')
            per_class = evaluate(learn, tmp, title)
        # Final train accuracy: one pass over the training images as they are (no augmentation), in eval mode.
        train_loss, train_acc = learn.validate(dl=plain_train_dl(dls))
        passed = hist.index[hist.test_acc >= PASS_ACCURACY]
        metrics = dict(
            **r.to_dict(),
            arch=architecture_id(learn.model),
            params=count_params(learn.model),
            macs=count_macs(learn.model),
            train_acc=train_acc,
            train_loss=train_loss,
            test_acc=hist.test_acc.iloc[-1],
            test_loss=hist.test_loss.iloc[-1],  # the last epoch's test pass
            tta_test_acc=flip_tta_accuracy(learn),  # reported beside the plain score, never instead of it
            # batch norm with each test batch's statistics, batches of the training size (None without it)
            batch_stats_test_acc=batch_statistics_accuracy(learn, r.bs),
            best_test_acc=float(hist.test_acc.max()),
            epochs_to_70=int(passed[0]) + 1 if len(passed) else None,
            seconds=float(hist.seconds.sum()),
            training_step=getattr(getattr(learn, 'captured_step', None), 'took', None) or "fastai's loop",
            per_class_test_acc=per_class,
            device_name=device_name(dls.device),
            torch=torch.__version__,
            fastai=fastai.__version__,
            python=platform.python_version(),
            n_train_images=len(dls.train_ds),
            n_test_images=len(dls.valid_ds),
            evaluated_on=f'{len(dls.valid_ds)} held-out training images' if r.holdout else 'the test set',
            **dls.cifar.describe(),
            **recorded,
        )
        if not cell:
            # The exported learner runs in float32 through fastai's loop, on any machine; `learn.to_bf16()`
            # on a GPU brings mixed precision back.
            for cb in ('device_mixed_precision', 'captured_step'):
                if hasattr(learn, cb): learn.remove_cb(getattr(learn, cb))
            try: learn.export(tmp / 'model.pkl')
            except RuntimeError as e:   # torch's writer says only "unexpected pos" when the disk is full
                free = shutil.disk_usage(tmp).free / 2**20
                raise OSError(f"cannot write {out / 'model.pkl'}: {free:.0f} MB free on its disk ({e})") \
                    from e
        # Everything this run cost: data, training, evaluation, figures and export (what the study's wall time
        # adds up).
        metrics['wall_seconds'] = time.perf_counter() - start
        # What the run wrote: a run is whole only while every one of these is there (normnets_files.damaged).
        metrics['files'] = sorted([p.name for p in tmp.iterdir()] + ['metrics.json'])
        (tmp / 'metrics.json').write_text(json.dumps(finite(metrics), indent=2, allow_nan=False) + '\n')
        replace_run_dir(tmp, out)
    finally:
        if tmp.exists(): shutil.rmtree(tmp)
    return metrics
