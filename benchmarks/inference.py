"""Inference: what each normalization costs once trained, measured on the study's own models.

    python benchmarks/inference.py --data ../shared/data/cifar10-jpeg.tgz

For each variant's first-seed model of the study (results/<norm>/model.pkl):
1. Batch statistics at test time. Batch norm evaluated with the statistics of each test batch instead of its
   running averages, as a model accidentally left in training mode would be, at test batch sizes 1, 2, 8, 32
   and 256; the running statistics and group and layer norm at the same sizes. The test images are shuffled
   once (seed 0), so that a batch is not all one class (the test set is stored class by class).
2. Folding. Batch norm folded into the convolution before it (`normnets.fold_batchnorm`): images/s against the
   model as trained. Group and layer norm cannot be folded: images/s against the same network with their
   statistics taken out (the per-channel scale and shift only), which is what computing statistics at
   inference costs.
Writes results/inference.csv and results/inference.png.
"""
import copy, json, time

import matplotlib
import pandas as pd
import torch
from torch import nn
from fastcore.script import call_parse

from normnets import NORMS, fold_batchnorm
from normnets_data import REPO_DIR, get_dls, load_cifar   # first: it quiets fastai's import warning
from fastai.learner import load_learner
from normnets_files import FolderError, check_out, damaged, read_json
from normnets_device import device_name, keep_freed_memory, resolve_device
from normnets_recipes import TRAINING_FIELDS
from normnets_runs import accuracy_at, shuffled_test_set, with_batch_statistics
from normnets_cli import cli_errors, path_option
import normnets_plots as plots

TEST_BATCH_SIZES = (1, 2, 8, 32, 256)


def test_tensors(cifar, device) -> tuple:
    """The whole test set as normalized float images (the study's validation pipeline) and labels, shuffled
    once."""
    return shuffled_test_set(get_dls(cifar=cifar, device=device))


class AffineOnly(nn.Module):
    """A group norm's per-channel scale and shift without its statistics: what remains if statistics cost
    nothing."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x): return x * self.weight[:, None, None] + self.bias[:, None, None]


def without_statistics(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm): setattr(parent, name, AffineOnly(child))
    return model


@torch.no_grad()
def paired_images_per_second(a: nn.Module, b: nn.Module, x, bs: int = 512, reps: int = 5) -> tuple:
    """Images/s of `a` and of `b` over `x` in batches of `bs`: the best of `reps` passes each, the two taking
    turns (after an untimed pass each), so that both meet the same machine state."""
    a, b = (m.eval().to(memory_format=torch.channels_last) for m in (a, b))
    x = x.contiguous(memory_format=torch.channels_last)
    best = {id(a): float('inf'), id(b): float('inf')}
    for i in range(reps + 1):
        for m in (a, b):
            start = time.perf_counter()
            for xb in x.split(bs): m(xb)
            if x.device.type == 'cuda': torch.cuda.synchronize()
            if i: best[id(m)] = min(best[id(m)], time.perf_counter() - start)
    return len(x) / best[id(a)], len(x) / best[id(b)]


def study_models(results, device) -> dict:
    """{norm: float32 model on `device`} of each variant's first-seed run in the study's folder `results`
    (<norm>/, a metrics.json and a model.pkl), every run read before any is measured: a run that lost its
    model, or whose model cannot be read, is an error that names it."""
    found = [n for n in NORMS if (results / n / 'metrics.json').exists()]
    if not found:
        raise FolderError(f"{results} holds no study model (<norm>/model.pkl): run scripts/run_all.py "
                          "first, or pass the study's folder as --results")
    for n in found:
        problem = damaged(results / n) or ('model.pkl missing' if not (results / n / 'model.pkl').is_file()
                                           else None)
        if problem: raise FolderError(f"{results / n}: {problem}; train it again (scripts/run_all.py "
                                      "--resume) or restore it")
    models = {}
    for n in found:
        try: models[n] = load_learner(results / n / 'model.pkl').model.to(device).float()
        except Exception as e:   # a pickle of another project or version: torch's, pickle's own errors
            raise FolderError(f"{results / n / 'model.pkl'}: cannot load it ({type(e).__name__}: {e})") from e
    return models


def accuracy_rows(models: dict, x, y) -> list:
    "Every model at every test batch size; batch norm also with the statistics of each test batch."
    rows = []
    for norm, model in models.items():
        modes = {f'{norm}: running statistics': model.eval(), f'{norm}: batch statistics':
                 with_batch_statistics(model)} if norm == 'batch' else {norm: model.eval()}
        for mode, m in modes.items():
            for bs in TEST_BATCH_SIZES:
                rows.append(
                    dict(kind='accuracy', norm=norm, mode=mode, test_bs=bs, test_acc=accuracy_at(m, x, y, bs))
                )
                print(f"{mode}, test batch size {bs}: {rows[-1]['test_acc']:.4f}", flush=True)
    return rows


def speed_rows(models: dict, x) -> list:
    """Images/s of each model as trained against the model changed: batch norm folded into the convolutions,
    group and layer norm with their statistics taken out."""
    rows = []
    for norm, model in models.items():
        changed, change = (
            (fold_batchnorm(model), 'batch norm folded into the convolutions')
            if norm == 'batch'
            else (without_statistics(model), 'statistics taken out (scale and shift only)')
        )
        as_trained, changed_ips = paired_images_per_second(model, changed, x)
        rows.append(dict(kind='speed', norm=norm, mode=change, test_bs=512, images_per_s=as_trained,
                         changed_per_s=changed_ips))
        print(
            f"{norm} norm: {as_trained:.0f} images/s as trained, {changed_ips:.0f} with {change}", flush=True
        )
    return rows


def measure(models: dict, x, y) -> list:
    "The accuracy rows and the speed rows."
    return accuracy_rows(models, x, y) + speed_rows(models, x)


@call_parse
def main(
    data:str=None,      # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    results:str=None,   # the study's folder, with <norm>/model.pkl (default: results/)
    device:str='cpu',   # where to measure
):
    "Measure batch statistics at test time, folding and the cost of statistics; write inference.csv and .png."
    matplotlib.use('Agg')
    keep_freed_memory()
    with cli_errors():   # a bad device or folder, no models, damaged runs, bad data: before measuring
        device = resolve_device(device)
        results = check_out(path_option('results', results, REPO_DIR / 'results'), create=False)
        torch.manual_seed(0)
        models = study_models(results, device)
        # each model's recipe as its run recorded it, so that the page can say whether it is today's
        recipes = pd.DataFrame([{'norm': n, **{k: m.get(k) for k in TRAINING_FIELDS}}
                                for n in models for m in [read_json(results / n / 'metrics.json')]])
        x, y = test_tensors(load_cifar(data), device)
        df = pd.DataFrame(measure(models, x, y))
    df = df.merge(recipes.assign(net=recipes.net.map(json.dumps)), on='norm', how='left')
    df['device_name'], df['torch'] = device_name(device), torch.__version__
    df.to_csv(results / 'inference.csv', index=False)
    plots.inference(df[df.kind == 'accuracy'], results / 'inference.png')
    print(f"wrote {results / 'inference.csv'} and {results / 'inference.png'}")
