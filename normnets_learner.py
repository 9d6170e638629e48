"""The fastai side of normnets: a `Learner` that carries a norm's recipe, and its callbacks.

    from normnets_data import get_dls
    from normnets_learner import normnet_learner
    learn = normnet_learner(get_dls(), 'gn')   # the group-norm variant with its recipe
    learn.fit_one_cycle(20)                    # at the recipe's peak learning rate

The callbacks keep a fit on its device (metrics summed there, mixed precision on a CPU too, on a GPU each step
one captured CUDA graph), show progress as a terminal or a log file wants it, and time and estimate the fit.
Importing this module changes no process-wide state.
"""
import contextlib, dataclasses, sys, threading, time
from functools import partial

import torch
from torch import nn
from torch.amp import GradScaler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback, CancelBatchException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.mixup import MixUp
from fastai.callback.progress import ProgressCallback
import fastai.callback.schedule   # noqa: F401  adds Learner.fit_one_cycle
from fastai.learner import Learner, AvgMetric, AvgLoss, AvgSmoothLoss
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import debias
from fastai.torch_core import find_bs
import fastai.vision.learner      # noqa: F401  adds plot_top_losses for images
from fastcore.foundation import L

from normnets import init_whitening
from normnets_data import Cutout, RandomCropFlip
from normnets_device import RuleError, machine_kind
from normnets_recipes import N_TRAIN, OPTIMIZERS, Recipe, recipe, with_lookahead

__all__ = ['normnet_learner', 'recipe', 'DeviceMixedPrecision', 'autocast_of', 'DeviceAvgMetric',
           'RecorderOnHost', 'DeviceAvgLoss', 'DeviceAvgSmoothLoss', 'SparseProgress', 'LineProgress',
           'progress', 'WeightEMA', 'adam_step', 'sgd_step', 'scheduled_values', 'CapturedStep',
           'captured_step_fits', 'COMPILED_FASTER', 'COMPILE_PAYS_AFTER', 'compiled_step_fits',
           'FirstStepsEstimate', 'EpochSeconds']


class DeviceMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` (autocast, and loss scaling for float16) on the data's device: fastai's
    autocasts on CUDA only, and a CPU with bfloat16 arithmetic trains normnets faster in it
    (benchmarks/speed.py measures how much)."""
    def before_fit(self):
        device = self.dls.device.type
        self.autocast, self.scales = torch.autocast(device, dtype=self.dtype), L()
        # bfloat16 has float32's range: only float16 needs its loss scaled.
        self.learn.scaler = GradScaler(device, **{**self.kwargs, 'enabled': self.dtype == torch.float16})

    def before_batch(self):   # `CapturedStep` autocasts its own training steps
        if not (self.training and hasattr(self.learn, 'captured_step')): super().before_batch()

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


class RecorderOnHost(Callback):
    """The Recorder's losses as numbers after a fit: `DeviceAvgSmoothLoss` keeps each on the device, so that
    a step never waits for the GPU, and fastai's `plot_loss` plots numbers on the host. One copy a fit."""
    order = 100   # after the Recorder's own after_fit
    def after_fit(self):
        r = self.learn.recorder
        if r.losses and torch.is_tensor(r.losses[0]): r.losses = L(torch.stack(list(r.losses)).tolist())


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


# ---------------------------------------------------------------- the training step as one CUDA graph

def adam_step(params, grads, state, hp, decayed, sqr_mom, eps):
    """fastai's `Adam` (decoupled weight decay, dampened averages, debiased) on lists of tensors: every value
    that a schedule changes is a device tensor of `hp` (filled each step), so that the step can be captured
    once and replayed. `decayed`: the parameters weight decay acts on."""
    decay, mom, damp, debias2, step_size = hp
    avgs, sqrs = [s['grad_avg'] for s in state], [s['sqr_avg'] for s in state]
    if decayed: torch._foreach_mul_(decayed, decay)
    torch._foreach_mul_(avgs, mom)
    torch._foreach_add_(avgs, torch._foreach_mul(grads, damp))
    torch._foreach_mul_(sqrs, sqr_mom)
    torch._foreach_addcmul_(sqrs, grads, grads, value=1 - sqr_mom)
    denom = torch._foreach_div(sqrs, debias2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(avgs, denom)
    torch._foreach_mul_(update, step_size)
    torch._foreach_add_(params, update)


def sgd_step(params, grads, state, hp, decayed, wd):
    """`NesterovSGD` (L2 weight decay added to the gradients of `decayed`, (param, grad) pairs) on lists of
    tensors, its scheduled values device tensors of `hp`."""
    mom, neg_lr = hp
    avgs = [s['grad_avg'] for s in state]
    if decayed: torch._foreach_add_([g for _, g in decayed], [p for p, _ in decayed], alpha=wd)
    torch._foreach_mul_(avgs, mom)
    torch._foreach_add_(avgs, grads)
    update = torch._foreach_mul(avgs, mom)
    torch._foreach_add_(update, grads)
    torch._foreach_mul_(update, neg_lr)
    torch._foreach_add_(params, update)


def scheduled_values(opt: str, h: dict, step: int) -> list[float]:
    """The values `adam_step` or `sgd_step` reads from `hp` at optimizer step `step` (from 1), computed on the
    host in double precision from fastai's hyperparameters `h`, as fastai's optimizer computes them."""
    lr, mom, wd = h['lr'], h['mom'], h['wd']
    if opt == 'sgd': return [mom, -lr]
    debias1, debias2 = (debias(m, 1 - m, step) for m in (mom, h['sqr_mom']))
    return [1 - lr * wd, mom, 1 - mom, debias2, -lr / debias1]


class CapturedStep(Callback):
    """Each training step (forward, loss, backward and the optimizer's step) as one CUDA graph, replayed on
    every batch: a step of this small network is mostly Python launching kernels, and a replay launches them
    all at once. The first `warmup` steps run eagerly on a side stream (allocations, cuDNN's choices), the
    next is captured with autocast inside and static input buffers. Each batch is copied into the buffers, the
    learning rate and momentum fastai's `ParamScheduler` set are written to device tensors, the graph is
    replayed, `learn.pred` and `learn.loss` point at its outputs, and the batch is cancelled: the Recorder,
    metrics and schedulers still run in `after_batch`. The optimizer's state is fastai's (`learn.opt.state`),
    so a fit without it goes on from where one with it stopped. With `graph=False` (any device) every step
    runs eagerly: the same function, which the tests compare with fastai's loop on a CPU. Where no graph is
    captured, `compiled=True` runs the function through `torch.compile` (`backend`): on a CPU it fuses the
    elementwise work of normalization, ReLU, skips and the optimizer into a few loops (`COMPILED_FASTER`). A
    compile that fails trains on eagerly after one line that says so."""
    # Last of a batch's callbacks: it cancels the batch, so every other `before_batch` (the schedulers that
    # set this step's hyperparameters, timers) must have run.
    order = 1000
    capturing = threading.Lock()   # torch.cuda.graph synchronizes the GPU and empties its cache on entry

    def __init__(self, graph: bool = True, warmup: int = 3, compiled: bool = False, backend='inductor'):
        self.graph, self.warmup, self.compiled, self.backend = graph, warmup, compiled, backend
        self.took, self.fitting = None, False   # the training step of the last fit: none yet

    def before_fit(self):
        # fastai's get_preds and validate send before_fit too: a learner that has not trained (the runs of a
        # fused network, each scored on its own) has no optimizer, and nothing here to prepare
        self.fitting = self.learn.opt is not None
        if not self.fitting: return
        r, opt = self.learn.recipe, self.learn.opt
        if len(opt.param_lists) != 1: raise RuleError("the captured step takes one parameter group")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.state = [opt.state[p] for p in self.params]
        for p, s in zip(self.params, self.state):   # fastai's own state, as its optimizer would create it
            s.setdefault('grad_avg', torch.zeros_like(p))
            if r.opt == 'adam': s.setdefault('sqr_avg', torch.zeros_like(p))
        self.steps = self.state[0].get('step', 0)   # Adam's step count, fastai's, shared with its loop
        self.do_wd = [s.get('do_wd', True) for s in self.state]
        h = opt.hypers[0]
        self.constants = {k: h[k] for k in ('wd', 'sqr_mom', 'eps') if k in h}   # captured as numbers
        self.hp = torch.zeros(5 if r.opt == 'adam' else 2, dtype=self.params[0].dtype,
                              device=self.params[0].device)
        amp = getattr(self.learn, 'device_mixed_precision', None)
        self.autocast = torch.autocast(self.dls.device.type, dtype=amp.dtype, cache_enabled=False) \
            if amp else contextlib.nullcontext()
        self.inputs = self.targets = self.cuda_graph = None
        # torch's loss inside fastai's `BaseLoss`, whose reshapes cast to fastai's tensor types (which recurse
        # under torch.compile): normnets' predictions and targets already have the shapes it makes
        self.criterion = getattr(self.learn.loss_func, 'func', self.learn.loss_func)
        # a learner exported with this callback and loaded on a machine without a GPU trains eagerly there
        self.capture = self.graph and self.dls.device.type == 'cuda'
        self.side = torch.cuda.Stream(self.dls.device) if self.capture else None
        self.eager = 0
        self.step_fn = self.step
        if self.compiled and not self.capture and not torch._dynamo.config.disable:   # TORCH_COMPILE_DISABLE
            if getattr(self, 'compiled_step', None) is None:
                # Compiled once a learner, its later fits reusing it. Dynamo's caches emptied first: a
                # process that trains many runs one after another (a grid) would reach its limit of graphs
                # a function and run every later one eagerly.
                torch.compiler.reset()
                self.compiled_step, self.first = torch.compile(self.step, backend=self.backend), True
            self.step_fn = self.compiled_step

    def step(self):
        "One training step on the static batch: forward, loss, backward, the optimizer's step."
        for p in self.params: p.grad = None   # backward writes the gradients afresh
        with self.autocast:
            pred = self.model(self.inputs).float()
            loss = self.criterion(pred, self.targets)
        loss.backward()
        grads, hp, c = [p.grad for p in self.params], self.hp.unbind(), self.constants
        with torch.no_grad():
            if self.learn.recipe.opt == 'adam':
                decayed = [p for p, d in zip(self.params, self.do_wd) if d]
                adam_step(self.params, grads, self.state, hp, decayed, c['sqr_mom'], c['eps'])
            else:
                decayed = [(p, g) for p, g, d in zip(self.params, grads, self.do_wd) if d and c['wd']]
                sgd_step(self.params, grads, self.state, hp, decayed, c['wd'])
        return pred.detach(), loss.detach()

    def before_batch(self):
        if not self.training: return
        h = self.opt.hypers[0]
        if any(h[k] != v for k, v in self.constants.items()):
            raise RuleError(f"the captured step takes {', '.join(self.constants)} as constant through a fit")
        x, y = (t.as_subclass(torch.Tensor) for t in (self.xb[0], self.yb[0]))
        if self.inputs is None: self.inputs, self.targets = torch.empty_like(x), torch.empty_like(y)
        if x.shape != self.inputs.shape:   # normnets' training loaders drop the last partial batch
            raise RuleError(f"the captured step trains on batches of one shape: {tuple(self.inputs.shape)}, "
                            f"then {tuple(x.shape)}; use a training DataLoader with drop_last=True")
        self.inputs.copy_(x, non_blocking=True)
        self.targets.copy_(y, non_blocking=True)
        self.steps += 1
        for t, v in zip(self.hp, scheduled_values(self.learn.recipe.opt, h, self.steps)): t.fill_(v)
        if self.cuda_graph is not None: self.cuda_graph.replay()
        elif not self.capture: self.out = self.run_step()
        elif self.eager < self.warmup:   # warm-up, real steps: on the side stream, as capture needs
            main = torch.cuda.current_stream(self.dls.device)   # the run's device's, not device 0's
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side): self.out = self.step()
            main.wait_stream(self.side)
            self.eager += 1
        else:
            # Captured on this learner's own side stream, checking this thread's calls only, one capture at
            # a time in a process: several learners, each in a thread on a stream of its own, train at once.
            self.cuda_graph = torch.cuda.CUDAGraph()
            with CapturedStep.capturing, torch.cuda.graph(self.cuda_graph, stream=self.side,
                                                          capture_error_mode='thread_local'):
                self.out = self.step()
            self.cuda_graph.replay()   # capturing records the step; replaying it trains on this batch
        self.learn.pred, self.learn.loss = self.out
        raise CancelBatchException()

    def run_step(self):
        """The step, compiled or eager (`self.step_fn`). A compile that fails (no C++ compiler, an error of
        inductor's) is one line, and this step and every later one run eagerly. The first call puts batch
        norm's running statistics back first: the forward pass may have run before the backward pass's compile
        failed (nothing else changes before the optimizer's step, the last part compiled)."""
        if self.step_fn == self.step: return self.step()
        saved = [b.clone() for b in self.model.buffers()] if self.first else None
        self.first = False
        try: return self.step_fn()
        except Exception as e:   # noqa: BLE001  dynamo and inductor raise many kinds; a bug raises again
            if saved: torch._foreach_copy_(list(self.model.buffers()), saved)
            cause = getattr(e, 'inner_exception', None) or e   # what the backend raised, in dynamo's error
            said = str(cause).strip().splitlines()
            print(f"torch.compile failed ({type(cause).__name__}: {said[0][:150] if said else ''}); this run "
                  "trains eagerly", file=sys.stderr, flush=True)
            self.step_fn, self.compiled, self.compiled_step = self.step, False, None
            return self.step()

    def after_fit(self):
        if not self.fitting: return
        for s in self.state: s['step'] = self.steps
        # what the fit trained with, as metrics.json records it
        self.took = ('captured CUDA graph' if self.capture else
                     'compiled (torch.compile)' if self.step_fn != self.step else 'one function, eager')
        # picklable again, and holding none of the optimizer's state (an exported learner carries no Adam
        # moments) nor the model's parameters: the next fit takes them afresh
        self.cuda_graph = self.side = self.inputs = self.targets = self.out = self.hp = None
        self.autocast = None
        self.params = self.state = self.do_wd = self.step_fn = self.criterion = None

    def __getstate__(self):   # the compiled function stays in this process (pickle cannot carry it)
        return {k: v for k, v in self.__dict__.items() if k != 'compiled_step'}


def captured_step_fits(r: Recipe) -> bool:
    """Whether recipe `r` trains with `CapturedStep`: on a GPU, in bf16 or fp32 (fp16's loss scaling reads
    its overflow check every step), without the tricks that act between fastai's steps (EMA, Lookahead,
    MixUp)."""
    return torch.device(r.device).type == 'cuda' and r.precision != 'fp16' and not (
        r.ema or r.lookahead or r.mixup)


# Where the compiled step trains faster than the same step eager: (machine kind, precision, norm) whose
# median ratio in benchmarks/speed.py's `compiled` table was 1.05x or more at every batch size measured (8, 32
# and the recipe's). On the AMD EPYC with AVX512-BF16 (results/speed-bf16.md, 9 rounds each): batch norm
# 1.08-1.19x in bf16 and 1.11-1.16x in fp32, layer norm 1.09-1.23x in bf16; not layer norm in fp32
# (1.01-1.05x) nor group norm (0.81-1.04x). The Intel Xeon with AMX and the float32 AMD are not measured yet:
# they train eagerly.
COMPILED_FASTER: set[tuple[str, str, str]] = {
    ('cpu-bf16', 'bf16', 'batch'), ('cpu-bf16', 'fp32', 'batch'), ('cpu-bf16', 'bf16', 'layer')}
# The training steps a run needs for its compile to pay: the compile took up to 29 s there (less where
# inductor's cache held its kernels), and a compiled step saved 0.002 s (batch norm, batch size 8) to 0.009 s
# (layer norm, 128). A quick check compiles nothing; a full-length run of batch norm's recipe (3,900 steps)
# about breaks even, and trains eagerly.
COMPILE_PAYS_AFTER = 4000


def training_steps(r: Recipe) -> int:
    "The optimizer steps of a run of recipe `r` (its training loader drops the last partial batch)."
    return (r.n_train or N_TRAIN - r.holdout) // r.bs * r.epochs


def compiled_step_fits(r: Recipe) -> bool:
    """Whether recipe `r` trains with `CapturedStep`'s function compiled: where it measured faster
    (`COMPILED_FASTER`), in bf16 or fp32, for enough steps to pay for the compile, without the tricks that act
    between fastai's steps, and unless torch's `TORCH_COMPILE_DISABLE=1` turns compiling off (the tests train
    eagerly)."""
    return ((machine_kind(r.device), r.precision, r.norm) in COMPILED_FASTER
            and training_steps(r) >= COMPILE_PAYS_AFTER and not (r.ema or r.lookahead or r.mixup)
            and not torch._dynamo.config.disable)


def dls_settings(dls) -> dict:
    """The recipe fields that the `DataLoaders` decide: batch size, device, and the training batches' crop
    padding and cutout (`get_dls`' transforms; a loader without them keeps the recipe's)."""
    tfms = dls.train.after_batch.fs
    crop = next((t for t in tfms if isinstance(t, RandomCropFlip)), None)
    cut = next((t for t in tfms if isinstance(t, Cutout)), None)
    return {'bs': dls.train.bs, 'device': dls.device.type,
            **({'crop_pad': crop.pad, 'cutout': cut.size if cut else 0} if crop else {})}


def normnet_learner(dls, norm: str | Recipe, **overrides) -> Learner:
    """A fastai `Learner` of the `norm` variant with its recipe (`recipe(norm, **overrides)`, or a `Recipe`):
    label-smoothed cross-entropy, the recipe's optimizer, peak learning rate (`fit_one_cycle(n)` uses it) and
    weight decay, accuracy on train and test, channels-last, and mixed precision where the hardware has it.
    The batch size, device and training augmentation are the `DataLoaders`' (`dls_settings`), and
    `learn.recipe` records them: an option of `overrides` that contradicts them is refused."""
    from_dls = dls_settings(dls)
    clash = {k: v for k, v in overrides.items() if k in from_dls and k != 'device' and v != from_dls[k]}
    if clash:
        said = ', '.join(f"{k}={v} but the DataLoaders' {k} is {from_dls[k]}" for k, v in clash.items())
        raise RuleError(f"{said}: pass it to get_dls instead")
    if isinstance(norm, Recipe) and torch.device(norm.device).type != dls.device.type:   # cuda is cuda:0
        raise RuleError(f"the recipe trains on {norm.device} but the DataLoaders are on {dls.device.type}: "
                        "pass device= to get_dls, or move them with dls.to(device)")
    if isinstance(norm, Recipe):
        differ = {k: v for k, v in from_dls.items() if k != 'device' and getattr(norm, k) != v}
        r = dataclasses.replace(norm, **differ) if differ else norm
    else: r = recipe(norm, **{**from_dls, **overrides})
    if len(dls.train) == 0:
        raise RuleError(f"the training set ({len(dls.train_ds)} images) holds no batch of {dls.train.bs}")
    opt_func = partial(with_lookahead, opt_func=OPTIMIZERS[r.opt]) if r.lookahead else OPTIMIZERS[r.opt]
    # The model on the data's device from the start, not at fit: what is built from its parameters (an
    # optimizer's state, a fused run's per-copy tensors) is then on that device too.
    learn = Learner(dls, r.model().to(dls.device),
                    loss_func=CrossEntropyLossFlat(label_smoothing=r.label_smoothing),
                    opt_func=opt_func, lr=r.lr, wd=r.wd, metrics=DeviceAvgMetric(accuracy))
    learn.remove_cb(learn.progress).add_cbs([progress(), RecorderOnHost()])   # fastai's default bar, replaced
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
    if captured_step_fits(r): learn.add_cb(CapturedStep())
    elif compiled_step_fits(r): learn.add_cb(CapturedStep(graph=False, compiled=True))
    return learn


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
