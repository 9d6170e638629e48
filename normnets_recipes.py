"""What a run is: each norm's training recipe, one frozen dataclass validated on creation, and the constants
every recipe depends on.

    from normnets_recipes import recipe
    r = recipe('gn', epochs=5)   # the group-norm recipe, 5 epochs; bad values are refused here

`RECIPES` holds each norm's settings where they differ from `Recipe`'s defaults; a new norm's recipe is one
entry. A saved recipe (metrics.json) says what really ran: 'auto' device and precision are resolved on
creation.
"""
import copy, dataclasses, functools, json, math, numbers
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from fastai.optimizer import Adam, Lookahead, Optimizer, average_grad, l2_reg

from normnets import MAX_EPOCHS, PARAM_LIMIT, count_params, norm_name, normnet
from normnets_data import CIFAR10_COUNTS
from normnets_device import RuleError, resolve_device, resolve_precision

__all__ = ['N_TRAIN', 'N_TEST', 'HOLDOUT', 'STUDY_SEEDS', 'NesterovSGD', 'OPTIMIZERS', 'with_lookahead',
           'Recipe', 'RECIPES', 'recipe', 'OPTIMIZER_SETTINGS', 'TRAINING_FIELDS', 'HARDWARE_FIELDS',
           'recipe_label', 'BATCH_SIZE_GRID', 'at_batch_size', 'recorded_recipe']

# Images in CIFAR-10's training and test sets: what a recipe's subsets and held-out set are drawn from.
N_TRAIN, N_TEST = (10 * n for n in CIFAR10_COUNTS.values())
# Training images set aside to score the recipe search and the ablation on, so that nothing is chosen on the
# test set (a tenth of the training images).
HOLDOUT = 5_000
STUDY_SEEDS = 3   # runs per variant in the committed study: the spread is part of the result


def nesterov_step(p, lr, mom, grad_avg, **kwargs):
    "Nesterov momentum, as PyTorch's `SGD(nesterov=True)`: a step along the gradient and the momentum ahead."
    p.data.add_(p.grad.data.add(grad_avg, alpha=mom), alpha=-lr)


def NesterovSGD(params, lr, mom: float = 0.9, wd: float = 0.) -> Optimizer:
    """SGD with Nesterov momentum and L2 weight decay added to the gradient, as PyTorch's `SGD(nesterov=True,
    weight_decay=wd)` and the published solutions of this exercise train; fastai's `SGD` has no Nesterov
    option."""
    return Optimizer(params, [l2_reg, average_grad, nesterov_step], lr=lr, mom=mom, wd=wd)


# fastai optimizers by the name a recipe gives. Adam is fastai's default (decoupled weight decay).
OPTIMIZERS = {'adam': Adam, 'sgd': NesterovSGD}


def with_lookahead(params, opt_func, **kwargs) -> Lookahead:
    """`opt_func`'s optimizer inside fastai's `Lookahead` (Zhang et al. 2019): every 6 steps the weights go
    back halfway to where they were 6 steps before, which damps the noise of large learning rates."""
    return Lookahead(opt_func(params, **kwargs))



# ---------------------------------------------------------------- the recipe

@dataclass(frozen=True)
class Recipe:
    """Everything a run depends on. The defaults are the study's, stated once here; `RECIPES` changes them per
    norm. Saved whole in each run's metrics.json and compared whole by `--resume`; change it with
    `dataclasses.replace`. `device` 'auto' and precision 'auto' are resolved on creation, so a saved recipe
    says what really ran."""
    norm: str = 'batch'
    epochs: int = MAX_EPOCHS
    bs: int = 256   # twice the steps of 512 at the same speed on 2 CPU cores; group and layer norm need them
    lr: float = 1e-2          # one-cycle peak
    wd: float = 0.05          # fastai exempts BatchNorm parameters and all biases; see exempt_gn_scale
    opt: str = 'adam'         # a key of OPTIMIZERS
    label_smoothing: float = 0.1   # soft targets regularize this small network a little
    crop_pad: int = 4         # training images: random crops of a copy padded this much, and flips (0: flips)
    # Training tricks, off unless a recipe turns them on (benchmarks/ablation.py measures each one).
    ema: float = 0.           # > 0: score and keep an average of the weights over steps, this decay a step
    lookahead: bool = False   # fastai's Lookahead around the optimizer
    cutout: int = 0           # > 0: a random square of this side blanked in each training image
    mixup: float = 0.         # > 0: fastai's MixUp, with this Beta(alpha, alpha)
    whiten_c1: bool = False   # C1's filters start as the whitening of the training images' 3x3 patches
    precision: str = 'auto'   # bfloat16 mixed precision where the hardware computes it natively, else float32
    device: str = 'auto'      # fastai's default device: the GPU if there is one
    seed: int = 0
    n_train: int | None = None   # a random subset of the training images (quick checks); None: all of them
    n_test: int | None = None
    holdout: int = 0   # > 0: score on this many training images set aside, not the test set (recipe search)
    net: dict = field(default_factory=dict)   # overrides of normnet's widths or gn_groups, for ablations
    exempt_gn_scale: bool = False   # no weight decay on GroupNorm scales either (see exempt_gn_from_wd)
    reproducible: bool = True   # deterministic cuDNN kernels, autotuning off (benchmarks/speed.py: its cost)

    def __post_init__(self):
        put = partial(object.__setattr__, self)   # frozen: resolved values are set once, here
        put('norm', norm_name(self.norm))
        put('device', resolve_device(self.device))
        put('precision', resolve_precision(self.precision, self.device))
        for name in ('epochs', 'bs', 'crop_pad', 'cutout', 'seed', 'holdout', 'n_train', 'n_test'):
            value = getattr(self, name)
            optional = name in ('n_train', 'n_test') and value is None
            if not optional and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise RuleError(f"{name} {value!r}: must be a whole number")
        if self.seed < 0: raise RuleError(f"seed {self.seed}: must be 0 or more")
        for name in ('lr', 'wd', 'label_smoothing', 'ema', 'mixup'):
            value = getattr(self, name)
            bound = '> 0' if name == 'lr' else '>= 0'
            bad = not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            if bad or (name == 'lr' and value == 0):
                raise RuleError(f"{name} {value!r}: must be a finite number, {bound}")
        if self.label_smoothing >= 1:
            raise RuleError(f"label_smoothing {self.label_smoothing}: must be below 1")
        if self.ema >= 1: raise RuleError(f"ema {self.ema}: a decay a step, must be below 1")
        if not 0 <= self.cutout <= 32: raise RuleError(f"cutout {self.cutout}: must be 0 (off) to 32 pixels")
        if not 0 <= self.crop_pad <= 16: raise RuleError(f"crop_pad {self.crop_pad}: must be 0 to 16 pixels")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise RuleError(f"epochs {self.epochs}: the rules allow 1 to {MAX_EPOCHS} epochs")
        if self.bs < 1: raise RuleError(f"batch size {self.bs}: must be at least 1")
        if self.n_train is not None and self.n_train < self.bs:
            raise RuleError(
                f"n_train {self.n_train}: a training subset must hold at least one batch ({self.bs} images)"
            )
        if not 0 <= self.holdout < N_TRAIN:
            raise RuleError(f"holdout {self.holdout}: must be 0 (the test set) to {N_TRAIN - 1:,} images")
        n_train, n_test = N_TRAIN - self.holdout, self.holdout or N_TEST   # what the subsets are drawn from
        if self.n_train is not None and self.n_train > n_train:
            raise RuleError(f"n_train {self.n_train}: there are {n_train:,} training images to draw from")
        if self.n_test is not None and not 1 <= self.n_test <= n_test:
            raise RuleError(f"n_test {self.n_test}: must be 1 to the {n_test:,} images scored on")
        if self.opt not in OPTIMIZERS:
            raise RuleError(f"unknown optimizer {self.opt!r}: expected one of {', '.join(OPTIMIZERS)}")
        n = params_of(self.norm, json.dumps(self.net, sort_keys=True))
        if n >= PARAM_LIMIT:
            raise RuleError(f"the model has {n:,} parameters: the rules require fewer than {PARAM_LIMIT:,}")

    def model(self) -> nn.Module: return normnet(self.norm, **self.net)

    def to_dict(self) -> dict: return dataclasses.asdict(self)


@functools.lru_cache(maxsize=None)
def params_of(norm: str, net: str) -> int:
    """Parameters of the network of `norm` with options `net` (JSON), built once: a plan of thousands of
    runs checks each recipe's network without building it again. Its initialization draws nothing from the
    generators that a run has seeded, so that making a recipe never changes what a run draws."""
    with torch.random.fork_rng(devices=[]): return count_params(normnet(norm, **json.loads(net)))


# Each norm's own settings where they differ from Recipe's defaults: its best cell of the recipe search,
# confirmed at full length on held-out training images (results/search.md), and for the per-sample norms the
# norm after the ReLU (conv, ReLU, norm): their largest gain in the ablation, nothing measurable for batch
# norm (results/ablation.md). Each change after those was adopted where it gained more than half a point at
# full length, held-out, as the mean of two seeds (results/ablation.md): for every norm crops padded by 2
# pixels, not 4 (less augmentation, which the underfitting per-sample norms gain most from); for group and
# layer norm batches of 128 (twice the steps); for group norm also a wider 32x32 stage, 4 groups of 4 and 8
# channels there, not of 3 and 6 (1.26x the MACs). The ws- norms keep their own optimizer settings from the
# search and take the rest of their exercise norm's recipe, which gained them over a point each (ablation).
AFTER_RELU = dict(norm_after_relu=True)
RECIPES: dict[str, dict] = {
    'batch': dict(opt='sgd', lr=0.4, wd=1e-4, crop_pad=2),
    'group': dict(opt='adam', lr=1e-2, wd=0.01, bs=128, crop_pad=2, net=dict(AFTER_RELU, c1=16, c2=32)),
    'layer': dict(opt='adam', lr=1e-2, wd=0.01, bs=128, crop_pad=2, net=AFTER_RELU),
}
RECIPES |= {f'ws-{n}': dict(RECIPES[n], opt='adam', lr=2e-2, wd=0.05) for n in ('group', 'layer')}


def recipe(norm: str, **overrides) -> Recipe:
    "The recipe of `norm` (RECIPES over Recipe's defaults), with `overrides` on top."
    norm = norm_name(norm)
    return Recipe(norm=norm, **{**copy.deepcopy(RECIPES.get(norm, {})), **overrides})


OPTIMIZER_SETTINGS = ('opt', 'lr', 'wd')   # what benchmarks/search.py chooses for each norm
# The recipe fields that say how a run trains (not on what machine, seed or data subset): a result whose runs
# recorded other values than today's recipe says so (normnets_pages.recipe_gaps).
TRAINING_FIELDS = ('opt', 'lr', 'wd', 'bs', 'label_smoothing', 'crop_pad', 'epochs', 'net', 'exempt_gn_scale',
                   'ema', 'lookahead', 'cutout', 'mixup', 'whiten_c1')


# The recipe fields that say on what hardware a run trained, resolved from 'auto' on each machine: a run of
# another machine differs in these alone, and `--resume` names them rather than training it again unasked.
HARDWARE_FIELDS = ('precision', 'device')


def recipe_label(r: Recipe) -> str:
    """The settings a norm's recipe chose (e.g. 'sgd, lr 0.4, wd 0.0001, crop_pad 2', or 'adam, lr 0.01, wd
    0.01, bs 128, crop_pad 2, norm_after_relu true'): what an ablation row changes one thing of."""
    chosen = sorted(k for k in RECIPES.get(r.norm, {}) if k not in (*OPTIMIZER_SETTINGS, 'net'))
    other = ''.join(f", {k} {getattr(r, k)}" for k in chosen)
    net = ''.join(f", {k} {json.dumps(v)}" for k, v in sorted(r.net.items()))
    return f"{r.opt}, lr {r.lr:g}, wd {r.wd:g}{other}{net}"


# The batch-size grid's batch sizes (scripts/batch_sizes.py's default, the batch-size page's plan), besides
# each recipe's own, whose cell is the study's runs: from a little below the recipes' down to where batch
# norm's statistics are of 8 images.
BATCH_SIZE_GRID = (8, 16, 32, 64)


def at_batch_size(r: Recipe, bs: int) -> Recipe:
    """`r` at batch size `bs`, its peak learning rate scaled by sqrt(bs / r.bs): the gradient's noise grows
    as the batch shrinks, and the square root keeps the step's noise about the same (one rule for every
    norm)."""
    return dataclasses.replace(r, bs=bs, lr=r.lr * math.sqrt(bs / r.bs))


def recorded_recipe(metrics: dict) -> dict:
    """The recipe fields of a run's metrics.json, to compare with `Recipe.to_dict()`; a field it lacks
    compares unequal to any value."""
    return {f.name: metrics.get(f.name, dataclasses.MISSING) for f in dataclasses.fields(Recipe)}
