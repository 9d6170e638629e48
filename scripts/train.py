"""Train one normnets variant on CIFAR-10 with a fastai `Learner` and a one-cycle schedule.

    python scripts/train.py --norm gn            # 20 epochs, writes results/group/
    python scripts/train.py --norm bn --epochs 5 --out /tmp/bn5

Writes under --out: history.csv (one row an epoch), metrics.json (final
accuracies, parameters, seed, versions, device, data and its md5), model.pkl
(`learn.export`, for `load_learner`; float32), curves.png, misclassified.png,
confusion.png and per_class.csv. Everything is written to a temporary folder
and moved into place at the end, so an interrupted run leaves nothing behind.
"""
import contextlib, ctypes, json, platform, shutil, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # normnets*.py without an install

import pandas as pd
import torch
from torch import nn
from torch.amp import GradScaler
import fastai
from fastai.callback.core import Callback
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import default_device, set_seed
from fastai.interpret import ClassificationInterpretation
import fastai.callback.schedule   # adds Learner.fit_one_cycle
import fastai.vision.learner      # adds plot_top_losses for images
from fastcore.foundation import L
from fastcore.script import call_parse, CliError

from normnets import PARAM_LIMIT, normnet, norm_name, architecture_id, count_params, count_macs
from normnets_data import REPO_DIR, get_dls, plain_train_dl
import plots

MAX_EPOCHS = 20        # the exercise's rule
PASS_ACCURACY = 0.70   # the exercise's bar; the epoch a variant first passes it is reported

# ---------------------------------------------------------------- hyperparameters
# Plain Python, one place. Batch size and peak learning rate were chosen by the short runs in
# results/ablation.md; the rest are common starting points, not tuned here.
BS = 256               # twice the steps of 512 at the same speed on 2 CPU cores; group and layer norm need them
LR = 1e-2              # one-cycle peak for Adam (fastai's default optimizer, decoupled weight decay)
WD = 0.05              # fastai exempts BatchNorm parameters and all biases; see exempt_gn_from_wd
LABEL_SMOOTHING = 0.1  # soft targets regularize this small network a little
PRECISION = 'auto'     # bfloat16 mixed precision where the hardware computes it natively, else float32
PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')


class RuleError(ValueError):
    "A run that would break the exercise's rules."


def check_rules(model, epochs: int):
    "Refuse, before any training, a run of more than 20 epochs or a model of 50,000 parameters or more."
    if not 1 <= epochs <= MAX_EPOCHS: raise RuleError(f"--epochs {epochs}: the rules allow 1 to {MAX_EPOCHS} epochs")
    n = count_params(model)
    if n >= PARAM_LIMIT: raise RuleError(f"the model has {n:,} parameters: the rules require fewer than {PARAM_LIMIT:,}")


class EpochSeconds(Callback):
    "Wall-clock seconds of each epoch (training and validation); fastai's Recorder keeps only a formatted string."
    def before_fit(self): self.seconds = []
    def before_epoch(self): self.start = time.perf_counter()
    def after_epoch(self): self.seconds.append(time.perf_counter() - self.start)


def cpuinfo(field: str) -> str:
    "The first value of `field` in /proc/cpuinfo ('model name', 'flags'), or '' where there is none (not Linux)."
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith(field))
    except (OSError, StopIteration): return ''


def device_name(device) -> str:
    "What computed the numbers: the GPU's name, or the CPU's model and the threads torch used."
    device = torch.device(device)
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    cpu = cpuinfo('model name') or platform.processor() or platform.machine()
    return f"{cpu} (CPU, {torch.get_num_threads()} threads)"


def keep_freed_memory() -> bool:
    """Keep memory that PyTorch frees in the process, for the next step to reuse (Linux with glibc; elsewhere a no-op).
    By default glibc hands the few-MB activation buffers of each training step back to the OS and faults them in again,
    zeroed, on the next one: about 20,000 page faults a step here (benchmarks/speed.py measures what they cost).
    Process-wide, and it stays set."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc': return False
    libc = ctypes.CDLL('libc.so.6')
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt's parameter numbers (malloc.h)
    # Blocks up to 32 MB (glibc's maximum) come from the heap instead of their own mmap, and the heap is trimmed
    # only when over 1 GB of it is free.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def native_bf16(device) -> bool:
    """Whether `device` has bfloat16 arithmetic: a GPU that supports it, or an x86 CPU with AVX512-BF16 or AMX (read
    from /proc/cpuinfo). oneDNN also runs bfloat16 on AVX-512 CPUs without them (many Intel laptops) by emulating it,
    which this project has not measured: those CPUs, and those whose flags cannot be read, count as without."""
    device = torch.device(device)
    if device.type == 'cuda': return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and bool({'avx512_bf16', 'amx_bf16'} & set(cpuinfo('flags').split()))


def resolve_precision(precision: str, device) -> str:
    """'auto' -> 'bf16' where the hardware has bfloat16 arithmetic (`native_bf16`), 'fp16' on older GPUs, 'fp32' on other
    CPUs. Other values are returned as they are, after a check."""
    if precision not in PRECISIONS: raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != 'auto': return precision
    if native_bf16(device): return 'bf16'
    return 'fp16' if torch.device(device).type == 'cuda' else 'fp32'


class DeviceMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` (autocast, and loss scaling for float16) on the data's device: fastai's autocasts on CUDA
    only, and a CPU with bfloat16 arithmetic trains normnets faster in it (benchmarks/speed.py measures how much)."""
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


def exempt_gn_from_wd(learn: Learner):
    """Take GroupNorm's scale out of weight decay too. fastai (`wd_bn_bias=False`) exempts BatchNorm parameters and all
    biases but decays GroupNorm's scale. Exempting it made no clear difference (results/ablation.md), so the recipe
    keeps fastai's default and this stays an option."""
    if learn.opt is None: learn.create_opt()   # fit keeps an existing optimizer and its per-parameter state
    for m in learn.model.modules():
        if isinstance(m, nn.GroupNorm):
            for p in m.parameters(): learn.opt.state[p]['do_wd'] = False


def make_learner(dls, norm: str, lr: float = LR, wd: float = WD, label_smoothing: float = LABEL_SMOOTHING,
                 precision: str = PRECISION, exempt_gn_scale: bool = False, **net) -> Learner:
    """The `norm` variant in a fastai `Learner`: label-smoothed cross-entropy, accuracy on train and test, channels-last,
    mixed precision by `precision` (see `resolve_precision`). `exempt_gn_scale`: no weight decay on GroupNorm scales
    (see `exempt_gn_from_wd`)."""
    learn = Learner(dls, normnet(norm, **net), loss_func=CrossEntropyLossFlat(label_smoothing=label_smoothing),
                    metrics=accuracy, lr=lr, wd=wd)
    if exempt_gn_scale: exempt_gn_from_wd(learn)
    learn.recorder.train_metrics = True   # accuracy of the augmented training batches, each epoch
    # Channels-last lets oneDNN's (CPU) and cuDNN's (GPU) fastest convolutions run without layout copies.
    learn.add_cb(ChannelsLast())
    precision = resolve_precision(precision, dls.device)
    if precision != 'fp32': learn.add_cb(DeviceMixedPrecision(precision))
    return learn


def history_frame(learn: Learner, seconds) -> pd.DataFrame:
    "The Recorder's per-epoch values as a table. train_loss is fastai's smoothed training loss at the epoch's end."
    df = pd.DataFrame(learn.recorder.values, columns=learn.recorder.metric_names[1:-1])
    df = df.rename(columns={'train_accuracy': 'train_acc', 'valid_accuracy': 'test_acc', 'valid_loss': 'test_loss'})
    df.insert(0, 'epoch', range(1, len(df) + 1))
    df['seconds'] = seconds
    return df[['epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'seconds']]


def evaluate(learn: Learner, out: Path, title: str) -> dict:
    "Figures and per-class accuracy of the trained model on the test set, from fastai's ClassificationInterpretation."
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
        correct += (probs.argmax(1) == y).sum().item()
    return correct / len(learn.dls.valid_ds)


def train_variant(norm='bn', epochs=MAX_EPOCHS, bs=BS, lr=LR, wd=WD, seed=0, data=None, out=None,
                  n_train=None, n_test=None, net=None, label_smoothing=LABEL_SMOOTHING, device=None,
                  precision=PRECISION, exempt_gn_scale=False) -> dict:
    """Train and evaluate one variant; write its files to `out` (default results/<norm>/) and return its metrics.
    `net` overrides `normnet`'s defaults (widths, gn_groups), for ablations."""
    start = time.perf_counter()
    norm = norm_name(norm)
    model = normnet(norm, **(net or {}))
    check_rules(model, epochs)
    out = Path(out) if out else REPO_DIR / 'results' / norm

    precision = resolve_precision(precision, device or default_device())

    keep_freed_memory()
    set_seed(seed, reproducible=True)
    dls = get_dls(data, bs=bs, n_train=n_train, n_test=n_test, seed=seed, device=device)
    learn = make_learner(dls, norm, lr=lr, wd=wd, label_smoothing=label_smoothing, precision=precision,
                         exempt_gn_scale=exempt_gn_scale, **(net or {}))
    timer = EpochSeconds()
    learn.fit_one_cycle(epochs, lr, cbs=timer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}-', dir=out.parent))
    try:
        hist = history_frame(learn, timer.seconds)
        hist.to_csv(tmp / 'history.csv', index=False)
        title = f"{norm} norm"
        plots.curves(hist, title, tmp / 'curves.png')
        per_class = evaluate(learn, tmp, title)
        # Final train accuracy: one pass over the training images as they are (no augmentation), in eval mode.
        train_loss, train_acc = learn.validate(dl=plain_train_dl(dls))
        test_loss, test_acc = hist.test_loss.iloc[-1], hist.test_acc.iloc[-1]   # the last epoch's test pass
        tta_test_acc = flip_tta_accuracy(learn)   # reported beside the plain score, never instead of it
        passed = hist.index[hist.test_acc >= PASS_ACCURACY]
        metrics = dict(
            norm=norm, arch=architecture_id(model), params=count_params(learn.model), macs=count_macs(learn.model),
            epochs=epochs, bs=bs, lr=lr, wd=wd, label_smoothing=label_smoothing, precision=precision, seed=seed,
            train_acc=train_acc, train_loss=train_loss,
            test_acc=test_acc, test_loss=test_loss, tta_test_acc=tta_test_acc,
            best_test_acc=float(hist.test_acc.max()), epochs_to_70=int(passed[0]) + 1 if len(passed) else None,
            seconds=float(sum(timer.seconds)), per_class_test_acc=per_class,
            device=device_name(dls.device), torch=torch.__version__, fastai=fastai.__version__,
            python=platform.python_version(), n_train=len(dls.train_ds), n_test=len(dls.valid_ds), **dls.cifar.describe())
        # The exported learner runs in float32, on any machine; `learn.to_bf16()` on a GPU brings mixed precision back.
        if precision != 'fp32': learn.remove_cb(learn.device_mixed_precision)
        learn.export(tmp / 'model.pkl')
        # Everything this run cost: data, training, evaluation, figures and export (what the study's wall time adds up).
        metrics['wall_seconds'] = time.perf_counter() - start
        (tmp / 'metrics.json').write_text(json.dumps(metrics, indent=2) + '\n')
        if out.exists(): shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists(): shutil.rmtree(tmp)
    return metrics


@call_parse
def main(
    norm:str='bn',           # normalization: batch/bn, group/gn or layer/ln
    epochs:int=MAX_EPOCHS,   # epochs of one-cycle training (at most 20)
    bs:int=BS,               # batch size
    lr:float=LR,             # peak learning rate of the one-cycle schedule
    wd:float=WD,             # weight decay (not on norm parameters and biases)
    seed:int=0,              # random seed: data order, augmentation, initialization
    data:str=None,           # CIFAR-10 folder or .tgz in fastai's URLs.CIFAR layout (default: $NORMNETS_DATA, data/cifar10, else download)
    out:str=None,            # output folder (default: results/<norm>/)
    precision:str=PRECISION, # auto (bf16 where the hardware has it, else fp32), fp32, bf16 or fp16 (GPU)
):
    "Train one normnets variant on CIFAR-10 and write its history, metrics, exported learner and figures."
    try: m = train_variant(norm, epochs, bs, lr, wd, seed, data, out, precision=precision)
    except ValueError as e: raise CliError(f"error: {e}")   # bad norm, broken rules, bad data: say what, exit non-zero
    print(f"{m['norm']} norm: train accuracy {m['train_acc']:.4f}, test accuracy {m['test_acc']:.4f} "
          f"({m['params']:,} parameters, {m['epochs']} epochs, {m['precision']}, {m['seconds']:.0f} s on {m['device']})")
