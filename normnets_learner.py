"""The fastai side of normnets: each norm's training recipe, and a fastai `Learner` that carries it.

    from normnets_data import get_dls
    from normnets_learner import normnet_learner
    learn = normnet_learner(get_dls(), 'gn')   # the group-norm variant with its recipe
    learn.fit_one_cycle(20)                    # at the recipe's peak learning rate

Sections follow a run: the recipe (one dataclass, validated on creation, one per norm), the hardware it runs
on (device, precision), the `Learner`, and one run trained and written to a folder (`train_run`), which the
scripts, benchmarks and tests all use. Importing this module changes no process-wide state.
"""
import contextlib, copy, ctypes, dataclasses, json, math, numbers, platform, shutil, sys, time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.amp import GradScaler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
import fastai
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.mixup import MixUp
from fastai.callback.progress import ProgressCallback
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner, AvgMetric, AvgLoss, AvgSmoothLoss
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import Adam, Lookahead, Optimizer, average_grad, l2_reg
from fastai.torch_core import default_device, find_bs, set_seed
import fastai.callback.schedule   # noqa: F401  adds Learner.fit_one_cycle
import fastai.vision.learner      # noqa: F401  adds plot_top_losses for images
from fastcore.foundation import L

from normnets import MAX_EPOCHS, PARAM_LIMIT, PASS_ACCURACY, normnet, norm_name, architecture_id
from normnets import count_params, count_macs, init_whitening
from normnets_data import BS, CIFAR10_COUNTS, get_dls, plain_train_dl
from normnets_files import check_run_dir, private_tmp_dir, replace_run_dir
import normnets_plots as plots

__all__ = ['PRECISIONS', 'NesterovSGD', 'OPTIMIZERS', 'RECIPES', 'Recipe', 'recipe', 'RuleError',
           'OPTIMIZER_SETTINGS', 'TRAINING_FIELDS', 'HARDWARE_FIELDS', 'recipe_label', 'at_batch_size',
           'recorded_recipe', 'resolve_device', 'resolve_precision', 'native_bf16', 'device_name',
           'keep_freed_memory', 'normnet_learner', 'progress', 'with_lookahead', 'WeightEMA', 'autocast_of',
           'seed_run', 'recipe_dls',
           'FirstStepsEstimate', 'EpochSeconds', 'history_frame', 'flip_tta_accuracy',
           'shuffled_test_set', 'accuracy_at', 'with_batch_statistics', 'batch_statistics_accuracy',
           'train_run', 'write_run']

PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')
# Images in CIFAR-10's training and test sets: what a recipe's subsets and held-out set are drawn from.
N_TRAIN, N_TEST = (10 * n for n in CIFAR10_COUNTS.values())


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


class RuleError(ValueError):
    "A run that would break the exercise's rules or cannot train as asked."


# ---------------------------------------------------------------- the recipe

@dataclass(frozen=True)
class Recipe:
    """Everything a run depends on. The defaults are the study's, stated once here; `RECIPES` changes them per
    norm. Saved whole in each run's metrics.json and compared whole by `--resume`; change it with
    `dataclasses.replace`. `device` 'auto' and precision 'auto' are resolved on creation, so a saved recipe
    says what really ran."""
    norm: str = 'batch'
    epochs: int = MAX_EPOCHS
    bs: int = BS   # twice the steps of 512 at the same speed on 2 CPU cores; group and layer norm need them
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
        n = count_params(self.model())
        if n >= PARAM_LIMIT:
            raise RuleError(f"the model has {n:,} parameters: the rules require fewer than {PARAM_LIMIT:,}")

    def model(self) -> nn.Module: return normnet(self.norm, **self.net)

    def to_dict(self) -> dict: return dataclasses.asdict(self)


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


def at_batch_size(r: Recipe, bs: int) -> Recipe:
    """`r` at batch size `bs`, its peak learning rate scaled by sqrt(bs / r.bs): the gradient's noise grows
    as the batch shrinks, and the square root keeps the step's noise about the same (one rule for every
    norm)."""
    return dataclasses.replace(r, bs=bs, lr=r.lr * math.sqrt(bs / r.bs))


# ---------------------------------------------------------------- the hardware

def resolve_device(device) -> str:
    """'auto' -> fastai's default device ('cuda' where there is a GPU, else 'cpu'); else the device asked for,
    checked."""
    if device in (None, 'auto'): return default_device().type
    try: device = torch.device(device)
    except (RuntimeError, TypeError):
        raise RuleError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    available = {'cpu': 1, 'cuda': torch.cuda.device_count(), 'mps': int(torch.backends.mps.is_available())}
    if device.type not in available:
        raise RuleError(f"device {str(device)!r}: normnets trains on cpu, cuda or mps")
    if not available[device.type]: raise RuleError(f"device {str(device)!r}: none on this machine")
    if device.index is not None and device.index >= available[device.type]:
        raise RuleError(f"device {str(device)!r}: this machine has {available[device.type]} {device.type} "
                        "device(s), numbered from 0")
    return str(device)


def cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ('model name', 'flags'), or '' where there is none (not
    Linux)."""
    try:
        return next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith(field))
    except (OSError, StopIteration):
        return ''


def native_bf16(device) -> bool:
    """Whether `device` has bfloat16 arithmetic. A GPU from compute capability 8.0 on (A100, H100, RTX 30xx
    and later): `torch.cuda.is_bf16_supported()` also says yes for a T4 or V100, which emulate bfloat16 and
    have no bfloat16 convolutions. An x86 CPU with AVX512-BF16 or AMX (read from /proc/cpuinfo): oneDNN also
    emulates it on AVX-512 CPUs without them (many Intel laptops), untested here, so those count as without.
    """
    device = torch.device(device)
    if device.type == 'cuda': return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != 'cpu': return False
    return torch.backends.mkldnn.is_available() and bool(
        {'avx512_bf16', 'amx_bf16'} & set(cpuinfo('flags').split())
    )


def resolve_precision(precision: str, device) -> str:
    """'auto' -> 'bf16' where the hardware has bfloat16 arithmetic (`native_bf16`), 'fp16' (with loss scaling)
    on older GPUs, 'fp32' on other CPUs. Other values are checked and returned: fp16 trains only on a GPU."""
    if precision not in PRECISIONS:
        raise RuleError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    on_gpu = torch.device(device).type == 'cuda'
    if precision == 'fp16' and not on_gpu:
        raise RuleError("precision 'fp16' needs a GPU: use bf16 or fp32 on a CPU")
    if precision != 'auto': return precision
    if native_bf16(device): return 'bf16'
    return 'fp16' if on_gpu else 'fp32'


def device_name(device) -> str:
    "What computed the numbers: the GPU's name, or the CPU's model and the threads torch used."
    device = torch.device(device)
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    cpu = cpuinfo('model name') or platform.processor() or platform.machine()
    return f"{cpu} (CPU, {torch.get_num_threads()} threads)"


def keep_freed_memory() -> bool:
    """Keep memory that PyTorch frees in the process, for the next step to reuse (Linux with glibc; elsewhere
    a no-op). By default glibc hands the few-MB activation buffers of each training step back to the OS and
    faults them in again, zeroed, on the next one: about 20,000 page faults a step (benchmarks/speed.py
    measures what they cost). Process-wide, and it stays set: scripts call it in their main, never on import.
    """
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc': return False
    libc = ctypes.CDLL('libc.so.6')
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt's parameter numbers (malloc.h)
    # Blocks up to 32 MB (glibc's maximum) come from the heap instead of their own mmap, and the heap is
    # trimmed only when over 1 GB of it is free.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


# ---------------------------------------------------------------- the Learner

class DeviceMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` (autocast, and loss scaling for float16) on the data's device: fastai's
    autocasts on CUDA only, and a CPU with bfloat16 arithmetic trains normnets faster in it
    (benchmarks/speed.py measures how much)."""
    def before_fit(self):
        device = self.dls.device.type
        self.autocast, self.scales = torch.autocast(device, dtype=self.dtype), L()
        # bfloat16 has float32's range: only float16 needs its loss scaled.
        self.learn.scaler = GradScaler(device, **{**self.kwargs, 'enabled': self.dtype == torch.float16})

    @property
    def dtype(self): return torch.bfloat16 if self.amp_mode.value == 'bf16' else torch.float16


def autocast_of(learn: Learner):
    "The autocast context `learn` trains in, for code that calls the model directly."
    amp = getattr(learn, 'device_mixed_precision', None)
    return torch.autocast(learn.dls.device.type, dtype=amp.dtype) if amp else contextlib.nullcontext()


# fastai's metrics move each batch's value to the CPU (`to_detach(cpu=True)`), which on a GPU waits for the
# batch to finish: one host sync a batch. These keep the running sums on the device; the epoch's value is read
# once.
class DeviceAvgMetric(AvgMetric):
    "`AvgMetric` summed on the device."
    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total += self.func(learn.pred, *learn.yb).detach() * bs
        self.count += bs


class DeviceAvgLoss(AvgLoss):
    "`AvgLoss` summed on the device."
    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total += learn.loss.mean().detach() * bs
        self.count += bs


class DeviceAvgSmoothLoss(AvgSmoothLoss):
    "`AvgSmoothLoss` on the device."
    def accumulate(self, learn):
        self.count += 1
        loss = learn.loss.mean().detach().float()
        self.val = torch.lerp(loss, self.val.to(loss.device), self.beta)


class SparseProgress(ProgressCallback):
    """fastai's progress bars, with the smoothed loss read every 50 batches instead of every batch (a host
    sync each). Named `progress` like fastai's, so that `learn.no_bar()` finds it (and puts fastai's back)."""
    name = 'progress'
    def after_batch(self):
        self.pbar.update(self.iter + 1)
        if self.iter % 50 == 0 and hasattr(self, 'smooth_loss'):
            self.pbar.comment = f'{self.smooth_loss.item():.4f}'


class LineProgress(Callback):
    """Off a terminal (output to a file, nohup, CI) a line an epoch, the values of fastai's table, instead of
    a bar that redraws itself a few times a batch. Named `progress` like fastai's bar, so that
    `learn.no_bar()` finds it; silent under `learn.no_logging()`."""
    name, order = 'progress', ProgressCallback.order

    def before_fit(self):
        self.was = self.learn.logger
        if self.was is not print: return   # fastai's default logger; `no_logging` replaced it
        self.learn.logger = self.write
        self.write(self.recorder.metric_names)

    def write(self, row):
        print('  '.join(f'{v:.4f}' if isinstance(v, float) else str(v) for v in row), flush=True)

    def after_fit(self): self.learn.logger = self.was


def progress() -> Callback:
    "The progress a fit shows: bars on a terminal, a line an epoch elsewhere (`LineProgress`)."
    return SparseProgress() if sys.stdout.isatty() else LineProgress()


def exempt_gn_from_wd(learn: Learner):
    """Take GroupNorm's scale out of weight decay too. fastai (`wd_bn_bias=False`) exempts BatchNorm
    parameters and all biases but decays GroupNorm's scale. Exempting it made no clear difference
    (results/ablation.md), so the recipe keeps fastai's default and this stays an option."""
    if learn.opt is None: learn.create_opt()   # fit keeps an existing optimizer and its per-parameter state
    for m in learn.model.modules():
        if isinstance(m, nn.GroupNorm):
            for p in m.parameters(): learn.opt.state[p]['do_wd'] = False


class WeightEMA(Callback):
    """Score with, and end training on, an exponential moving average of the weights and batch norm's
    statistics over the steps (torch's `AveragedModel`): it averages the noise of the last steps out of the
    weights the run is scored and exported with."""
    def __init__(self, decay: float): self.decay, self.averaged = decay, None

    def after_step(self):
        if self.averaged is None:   # the first step of a fit; `validate` and `get_preds` take none
            ema = get_ema_multi_avg_fn(self.decay)
            self.averaged = AveragedModel(self.model, multi_avg_fn=ema, use_buffers=True)
        self.averaged.update_parameters(self.model)

    def before_validate(self):   # after TrainEval put the trained model in eval mode: the average too
        if self.averaged is not None:
            self.trained, self.learn.model = self.model, self.averaged.module.eval()

    def after_validate(self):
        if self.averaged is not None: self.learn.model = self.trained

    def after_fit(self):
        if self.averaged is None: return
        self.model.load_state_dict(self.averaged.module.state_dict())
        self.averaged = None   # the average is now the model; `learn.export` need not carry a copy


def normnet_learner(dls, norm: str | Recipe, **overrides) -> Learner:
    """A fastai `Learner` of the `norm` variant with its recipe (`recipe(norm, **overrides)`, or a `Recipe`):
    label-smoothed cross-entropy, the recipe's optimizer, peak learning rate (`fit_one_cycle(n)` uses it) and
    weight decay, accuracy on train and test, channels-last, and mixed precision where the hardware has it.
    The batch size and device are the `DataLoaders`'."""
    from_dls = {'bs': dls.train.bs, 'device': dls.device.type}
    r = norm if isinstance(norm, Recipe) else recipe(norm, **{**from_dls, **overrides})
    if torch.device(r.device).type != dls.device.type:   # 'cuda' and 'cuda:0' are one device
        raise RuleError(f"the recipe trains on {r.device} but the DataLoaders are on {dls.device.type}: "
                        "pass device= to get_dls, or move them with dls.to(device)")
    if len(dls.train) == 0:
        raise RuleError(f"the training set ({len(dls.train_ds)} images) holds no batch of {dls.train.bs}")
    opt_func = partial(with_lookahead, opt_func=OPTIMIZERS[r.opt]) if r.lookahead else OPTIMIZERS[r.opt]
    # The model on the data's device from the start, not at fit: what is built from its parameters (an
    # optimizer's state, a fused run's per-copy tensors) is then on that device too.
    learn = Learner(dls, r.model().to(dls.device),
                    loss_func=CrossEntropyLossFlat(label_smoothing=r.label_smoothing),
                    opt_func=opt_func, lr=r.lr, wd=r.wd, metrics=DeviceAvgMetric(accuracy))
    learn.remove_cb(learn.progress).add_cb(progress())   # fastai's default bar, replaced
    learn.recipe = r
    learn.recorder.train_metrics = True   # accuracy of the augmented training batches, each epoch
    learn.recorder.loss, learn.recorder.smooth_loss = DeviceAvgLoss(), DeviceAvgSmoothLoss()
    if r.exempt_gn_scale: exempt_gn_from_wd(learn)
    if r.whiten_c1: init_whitening(learn.model.C1[0], dls.one_batch()[0])
    if r.ema: learn.add_cb(WeightEMA(r.ema))
    if r.mixup: learn.add_cb(MixUp(r.mixup))
    # Channels-last lets oneDNN's (CPU) and cuDNN's (GPU) fastest convolutions run without layout copies.
    learn.add_cb(ChannelsLast())
    if r.precision != 'fp32': learn.add_cb(DeviceMixedPrecision(r.precision))
    return learn


# ---------------------------------------------------------------- one run, trained and written to a folder

def seed_run(r: Recipe):
    """Seed Python, NumPy and torch for the run, and set cuDNN as the recipe asks: deterministic kernels
    (reproducible), or autotuned to the fastest (fastai's `set_seed` leaves autotuning as it found it)."""
    set_seed(r.seed, reproducible=r.reproducible)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not r.reproducible, r.reproducible


def recipe_dls(r: Recipe, data=None, cifar=None):
    "The `DataLoaders` a recipe trains on (its batch size, subsets, seed and device)."
    return get_dls(data, bs=r.bs, n_train=r.n_train, n_test=r.n_test, seed=r.seed, device=r.device,
                   cifar=cifar, holdout=r.holdout, crop_pad=r.crop_pad, cutout=r.cutout)


class FirstStepsEstimate(Callback):
    """After the first training steps, print how long this fit's training will take at that pace, and `fits`
    such fits (`unit`: what they are): a plan's estimate long before its first run ends. The first `skip`
    steps (allocation, autotuning) are not timed."""
    def __init__(self, fits: int, unit: str = 'runs', skip: int = 3, steps: int = 20):
        self.fits, self.unit, self.skip, self.steps = fits, unit, skip, steps

    def before_fit(self): self.done = 0

    def after_batch(self):
        if not self.training: return
        self.done += 1
        if self.done in (self.skip, self.skip + self.steps) and next(self.model.parameters()).is_cuda:
            torch.cuda.synchronize()   # kernels run behind the Python that launches them
        if self.done == self.skip: self.start = time.perf_counter()
        if self.done == self.skip + self.steps:
            run = (time.perf_counter() - self.start) / self.steps * self.n_iter * self.n_epoch
            plan = f", about {run * self.fits / 60:.0f} min for the {self.fits} {self.unit} at this pace"
            print(f"\nEstimated from the first steps: {run / 60:.1f} min of training for this one"
                  + (plan if self.fits > 1 else '') + " (evaluation not included)", flush=True)


class EpochSeconds(Callback):
    """Wall-clock seconds of each epoch (training and validation); fastai's Recorder keeps only a formatted
    string."""
    def before_fit(self): self.seconds = []
    def before_epoch(self): self.start = time.perf_counter()
    def after_epoch(self): self.seconds.append(time.perf_counter() - self.start)


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
            # The exported learner runs in float32, on any machine; `learn.to_bf16()` on a GPU brings mixed
            # precision back.
            if r.precision != 'fp32': learn.remove_cb(learn.device_mixed_precision)
            learn.export(tmp / 'model.pkl')
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


def recorded_recipe(metrics: dict) -> dict:
    """The recipe fields of a run's metrics.json, to compare with `Recipe.to_dict()`; a field it lacks
    compares unequal to any value."""
    return {f.name: metrics.get(f.name, dataclasses.MISSING) for f in dataclasses.fields(Recipe)}
