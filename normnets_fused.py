"""Several runs trained as one fused network (`normnets.NormNet` with `copies`), each still its own run.

    from normnets_fused import train_fused
    train_fused([recipe('bn', seed=s) for s in range(3)], ['bn0', 'bn1', 'bn2'])   # 3 run folders

One small run leaves most of a GPU idle between its many small kernels; K runs fused launch the same kernels,
each K times larger (HFTA: Wang et al., MLSys 2021). Each copy is its own run, mathematically: its own seed's
initial weights, data order, crops and flips (its own `DataLoaders`), its own peak learning rate and weight
decay (the optimizer scales each copy's rows), its own loss (the fused loss is the sum of the copies', so each
copy's gradient is its own run's), metrics and history. At the end each copy is unfused and written as the
folder a separate run writes (`write_run`), which records the runs it trained with in `fused_with`.
"""
import json, time
from functools import partial

import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.optimizer import Optimizer, average_grad, average_sqr_grad, debias, step_stat

from normnets import fuse, unfuse
from normnets_device import RuleError
from normnets_files import check_run_dirs
from normnets_learner import (DeviceAvgLoss, DeviceAvgMetric, DeviceAvgSmoothLoss, DeviceMixedPrecision,
                              EpochSeconds, normnet_learner, progress)
from normnets_runs import recipe_dls, seed_run, train_run, write_run

__all__ = ['FusedDL', 'FusedLoss', 'FUSED_OPTIMIZERS', 'check_fusable', 'fusable_groups', 'FUSED_FASTER',
           'fuse_by_default', 'fused_learner', 'train_fused']

# Recipe fields each copy may have of its own: the rest must be the same for all (one network, one batch size,
# as many batches an epoch, one schedule, one precision, one device).
PER_COPY = ('lr', 'wd', 'seed', 'crop_pad')
# Training tricks the fused loop has no per-copy form of.
TRICKS = ('ema', 'lookahead', 'cutout', 'mixup', 'whiten_c1', 'exempt_gn_scale')


def shared_fields(r) -> dict:
    "The fields of recipe `r` that every run fused with it must share."
    return {k: v for k, v in r.to_dict().items() if k not in PER_COPY}


def check_fusable(recipes: list) -> list:
    "Refuse, before any work, runs that cannot train as one network: a clear error that names the difference."
    if not recipes: raise RuleError("fusion of no run: give at least one recipe")
    first = shared_fields(recipes[0])
    for r in recipes:
        other = {k: v for k, v in shared_fields(r).items() if v != first[k]}
        if other:
            raise RuleError(f"runs whose {', '.join(other)} differ cannot train as one network ("
                            + '; '.join(f"{k} {first[k]!r} and {v!r}" for k, v in other.items()) + ')')
        tricks = [t for t in TRICKS if getattr(r, t)]
        if tricks: raise RuleError(f"{', '.join(tricks)}: not trained fused; train the runs one by one")
    if recipes[0].opt not in FUSED_OPTIMIZERS:
        fusable = ', '.join(FUSED_OPTIMIZERS)
        raise RuleError(f"optimizer {recipes[0].opt!r}: not trained fused (only {fusable})")
    return recipes


def fusable_groups(runs: list, only=None) -> list[list]:
    """The (title, recipe, folder) `runs` grouped into those that can train as one network, in their order;
    a run that cannot be fused with any (a training trick), or whose recipe `only` refuses, is a group of its
    own."""
    groups = {}
    for i, run in enumerate(runs):
        r = run[1]
        alone = any(getattr(r, t) for t in TRICKS) or (only is not None and not only(r))
        same = json.dumps(shared_fields(r), sort_keys=True, default=str)
        groups.setdefault(i if alone else same, []).append(run)
    return list(groups.values())


# Where fused runs train faster than the same runs one at a time, as (device type, precision, norm): the rule
# `--fuse auto` follows, written from benchmarks/speed.py's measurements (the median of its rounds). A variant
# enters here for a kind of machine once speed.py measures it faster fused there, at the study's seeds and at
# 8 runs. Measured so far on CPUs: on AMD EPYC in float32 every variant slower fused (0.67-0.86x one run
# alone, results/speed.md); in bfloat16 batch norm faster, on AMD EPYC with AVX512-BF16 (1.30x at 3 runs,
# 1.18x at 8) and on Intel Xeon with AMX (1.23x, 1.75x), the other variants within the benchmark's noise of
# one run alone or slower (0.80-1.12x; results/speed-bf16.md, speed-amx.md). On an H200, 3 fused copies
# took 5.54 ms a step, 3 runs' captured steps one after another 4.3 ms (../shared/gpu-results).
FUSED_FASTER: set[tuple[str, str, str]] = {('cpu', 'bf16', 'batch')}


def fuse_by_default(r) -> bool:
    "Whether runs of recipe `r` train fused when the command leaves it to normnets (`FUSED_FASTER`)."
    return (torch.device(r.device).type, r.precision, r.norm) in FUSED_FASTER


# ---------------------------------------------------------------- data: K loaders in lockstep

class FusedDL:
    """The training (or test) loaders of K runs in lockstep: batches of (B, K*3, H, W) images, copy k's in
    channels 3k to 3k+2, and (B, K) labels. Each loader keeps its own order and augmentation."""
    n_inp = 1

    def __init__(self, loaders: list): self.loaders = loaders

    def __len__(self): return min(len(dl) for dl in self.loaders)

    def __iter__(self):
        for batches in zip(*self.loaders):
            xs, ys = zip(*batches)
            yield torch.cat(xs, 1), torch.stack(ys, 1)

    def __getattr__(self, name):   # bs, n, device, dataset: those of the first copy's loader
        if name == 'loaders': raise AttributeError(name)
        return getattr(self.loaders[0], name)

    def to(self, device):
        for dl in self.loaders: dl.to(device)
        return self


def fused_dls(dls: list) -> DataLoaders:
    "The copies' `DataLoaders` in lockstep, on their device."
    fused = DataLoaders(FusedDL([d.train for d in dls]), FusedDL([d.valid for d in dls]),
                        device=dls[0].device)
    fused.n_inp = 1
    return fused


# ---------------------------------------------------------------- loss, metrics, optimizer

class FusedLoss:
    "The sum of the copies' label-smoothed cross-entropies (each a mean over its batch); `last`: each copy's."
    def __init__(self, label_smoothing: float): self.label_smoothing, self.last = label_smoothing, None

    def __call__(self, pred, y):   # pred (B, K, 10), y (B, K)
        per_image = F.cross_entropy(pred.flatten(0, 1).float(), y.flatten(), reduction='none',
                                    label_smoothing=self.label_smoothing)
        self.last = per_image.view(y.shape).mean(0)
        return self.last.sum()


class CopyMetric(DeviceAvgMetric):
    "A metric of copy `k` alone, named `<name>_<k>` in the Recorder."
    def __init__(self, func, k: int, name: str):
        super().__init__(lambda pred, y: func(pred[:, k], y[:, k]))
        self._name = f'{name}_{k}'

    @property
    def name(self): return self._name


class CopySmoothLoss(Callback):
    """Each copy's training loss smoothed as fastai's Recorder smooths a run's (beta 0.98, debiased), read at
    the end of each epoch's training: the train_loss of each copy's history."""
    order = 55   # after the loss, with the Recorder (50)

    def __init__(self, beta: float = 0.98): self.beta = beta

    def before_fit(self): self.val, self.count, self.epochs = 0., 0, []

    def after_loss(self):
        if not self.training: return
        self.count += 1
        self.val = torch.lerp(self.loss_func.last.detach(), torch.as_tensor(self.val).to(self.loss.device),
                              self.beta)

    def after_train(self): self.epochs.append((self.val / (1 - self.beta ** self.count)).tolist())


# Steppers of fastai's Adam and SGD with each copy's learning rate and weight decay: `copy_lr` multiplies the
# scheduled rate (fit with peak 1: `copy_lr` is the copy's peak) and `copy_wd` is the copy's decay, both
# broadcast over the parameter's rows (copy k owns the k-th block of every fused parameter).
def copy_weight_decay(p, lr, copy_lr, copy_wd, do_wd=True, **kwargs):
    "Decoupled weight decay (fastai's Adam): the weights shrink by lr * wd."
    if do_wd: p.data.mul_(1 - lr * copy_lr * copy_wd)


def copy_l2_reg(p, copy_wd, do_wd=True, **kwargs):
    "L2 weight decay (PyTorch's and this project's SGD): wd * p added to the gradient."
    if do_wd: p.grad.data.add_(p.data * copy_wd)


def copy_adam_step(p, lr, copy_lr, mom, step, sqr_mom, grad_avg, sqr_avg, eps, **kwargs):
    p.data.sub_(lr * copy_lr / debias(mom, 1 - mom, step) * grad_avg
                / ((sqr_avg / debias(sqr_mom, 1 - sqr_mom, step)).sqrt() + eps))


def copy_nesterov_step(p, lr, copy_lr, mom, grad_avg, **kwargs):
    p.data.sub_(lr * copy_lr * p.grad.data.add(grad_avg, alpha=mom))


FUSED_OPTIMIZERS = {
    'adam': lambda params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.: Optimizer(
        params, [copy_weight_decay, partial(average_grad, dampening=True), average_sqr_grad, step_stat,
                 copy_adam_step], lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd),
    'sgd': lambda params, lr, mom=0.9, wd=0.: Optimizer(
        params, [copy_l2_reg, average_grad, copy_nesterov_step], lr=lr, mom=mom, wd=wd),
}


def set_copy_hypers(learn: Learner, recipes: list):
    """Give every fused parameter each copy's peak learning rate and weight decay, row block by row block, on
    the parameter's device (the recipe's: the model is built there)."""
    if learn.opt is None: learn.create_opt()
    for p in learn.model.parameters():
        rows = p.shape[0] // len(recipes)
        per_row = lambda v: torch.tensor(v, dtype=p.dtype, device=p.device).repeat_interleave(rows).view(
            -1, *[1] * (p.dim() - 1))
        learn.opt.state[p]['copy_lr'] = per_row([r.lr for r in recipes])
        learn.opt.state[p]['copy_wd'] = per_row([r.wd for r in recipes])


# ---------------------------------------------------------------- the Learner, and the runs written out

def fused_learner(learners: list) -> Learner:
    """One fastai `Learner` of the plain `learners` (`normnet_learner`, each built right after its
    `seed_run`) fused: their networks side by side, their `DataLoaders` in lockstep, each copy's loss, metrics
    and smoothed training loss its own. `fit_one_cycle(epochs, 1.)` trains copy k at its own peak rate."""
    recipes = [plain.recipe for plain in learners]
    r = check_fusable(recipes)[0]
    metrics = [CopyMetric(func, k, name) for k, rk in enumerate(recipes)
               for func, name in ((accuracy, 'accuracy'),
                                  (partial(F.cross_entropy, label_smoothing=rk.label_smoothing), 'loss'))]
    learn = Learner(fused_dls([plain.dls for plain in learners]), fuse([plain.model for plain in learners]),
                    loss_func=FusedLoss(r.label_smoothing), opt_func=FUSED_OPTIMIZERS[r.opt], lr=1.,
                    metrics=metrics)
    learn.remove_cb(learn.progress).add_cbs([progress(), CopySmoothLoss(), ChannelsLast()])
    learn.recorder.train_metrics = True
    learn.recorder.loss, learn.recorder.smooth_loss = DeviceAvgLoss(), DeviceAvgSmoothLoss()
    if r.precision != 'fp32': learn.add_cb(DeviceMixedPrecision(r.precision))
    set_copy_hypers(learn, recipes)
    return learn


def copy_history(learn: Learner, k: int, seconds: list) -> pd.DataFrame:
    """Copy k's history as a separate run's (`history_frame`): its smoothed training loss, its accuracies and
    test loss, and its share of each epoch's seconds."""
    values = pd.DataFrame(learn.recorder.values, columns=learn.recorder.metric_names[1:-1])
    copies = len(learn.copy_smooth_loss.epochs[0])
    return pd.DataFrame({'epoch': range(1, len(values) + 1),
                         'train_loss': [epoch[k] for epoch in learn.copy_smooth_loss.epochs],
                         'train_acc': values[f'train_accuracy_{k}'], 'test_loss': values[f'valid_loss_{k}'],
                         'test_acc': values[f'valid_accuracy_{k}'], 'seconds': [s / copies for s in seconds]})


def train_fused(recipes: list, outs: list, data=None, cifar=None, cell: bool = False, cbs=()) -> list[dict]:
    """Train `recipes` as one fused network and write copy k as the run folder `outs[k]`, as `train_run`
    writes a run, with `fused_with` naming the runs' folders. Every recipe and folder is checked before any
    work. A run's seconds are its share of the fused run's. Returns each run's metrics."""
    if len(outs) != len(recipes):
        raise RuleError(f"{len(recipes)} runs to fuse, {len(outs)} folders for them")
    if len(recipes) == 1:   # nothing to fuse with: a run alone, whatever tricks it has (`fusable_groups`)
        return [train_run(recipes[0], outs[0], data, cifar, cell, cbs)]
    check_fusable(recipes)
    outs = check_run_dirs(outs)
    start, learners = time.perf_counter(), []
    for r in recipes:
        seed_run(r)   # the initial weights, data order, crops and flips of the run trained alone
        learners.append(normnet_learner(recipe_dls(r, data, cifar), r))
    learn, timer = fused_learner(learners), EpochSeconds()
    learn.fit_one_cycle(recipes[0].epochs, 1., cbs=[timer, *cbs])
    share, written = (time.perf_counter() - start) / len(recipes), []
    for k, (plain, r, out) in enumerate(zip(learners, recipes, outs)):
        plain.model = unfuse(learn.model, k)
        if r.precision != 'fp32': plain.device_mixed_precision.before_fit()   # its autocast, as a fit sets it
        hist = copy_history(learn, k, timer.seconds)
        written.append(write_run(plain, r, out, hist, time.perf_counter() - share, cell,
                                 fused_with=[o.name for o in outs]))
    return written
