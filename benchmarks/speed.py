"""Speed: normnets against the usual way these networks are trained, and against the machine's limit.

    python benchmarks/speed.py --data ../shared/data/cifar10-jpeg.tgz

Measured in one run, on one machine, with the same torch threads:
1. normnets: training images/s over real training steps after warm-up (the real `get_dls` pipeline and the
   real fastai `Learner` loop), inference images/s over the test set, and forward MACs per image (counted).
2. The usual pipeline: a published 49,672-parameter solution of the same exercise, a plain PyTorch loop,
   a torch DataLoader over per-image PIL transforms with 2 workers, batch size 128, SGD.
3. The machine's limit: GFLOP/s of a large matrix multiply in float32, and in bfloat16 when normnets trains in it,
   and each variant's achieved training GFLOP/s (3 x 2 x forward MACs x images/s: forward, and backward for
   inputs and for weights) as a fraction of the peak of the precision it trains in.
4. What the speed choices are worth, measured the same way: normnets in float32, with group norm in bfloat16, with
   glibc's default allocator, without channels-last, with batch norm in NCHW, with widths of 16 at 32x32, through
   torch.compile, at twice the batch size, with the usual per-image data pipeline, and as run once more (the noise).
Then a torch.profiler table of the top operators of one variant's training step, and the projected wall time
of the full study. Writes results/speed.md; the last line of stdout is machine-readable.
"""
import sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
import pandas as pd
import torch
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from fastcore.script import call_parse
from torchvision import transforms
from PIL import Image

from normnets import NORMS, FloatGroupNorm, normnet, count_macs, count_params
from normnets_data import REPO_DIR, get_dls, load_cifar
from train import BS, PRECISION, make_learner, device_name, keep_freed_memory, resolve_precision
import report

# Widths with 16 channels at 32x32, where normnets has 12 and 24: AVX-512 holds 16 floats, and PyTorch's
# channels-last CPU batch norm is several times slower on 12 or 24 channels than on 16. Measured here for speed;
# results/ablation.md has what they cost in accuracy.
ALIGNED_WIDTHS = dict(c1=16, c2=16, c4=32, c7=24)

# ---------------------------------------------------------------- the usual pipeline

def usual_net(dropout=0.05) -> nn.Sequential:
    "The published 49,672-parameter solution: conv -> ReLU -> BatchNorm -> Dropout, with 1x1 transitions."
    def block(c_in, c_out): return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(c_out), nn.Dropout(dropout)]
    return nn.Sequential(
        *block(3, 32), *block(32, 54), nn.Conv2d(54, 10, 1, bias=False), nn.MaxPool2d(2),
        *block(10, 16), *block(16, 16), *block(16, 32), nn.Conv2d(32, 16, 1, bias=False), nn.MaxPool2d(2),
        *block(16, 32), *block(32, 32), *block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 10, 1, bias=False), nn.Flatten())


class PILDataset(torch.utils.data.Dataset):
    "CIFAR-10 the way torchvision's CIFAR10 dataset serves it: a PIL image per item, then per-image transforms."
    def __init__(self, x, y, tfm): self.x, self.y, self.tfm = x, y, tfm
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.tfm(Image.fromarray(self.x[i])), int(self.y[i])


def usual_loader(cifar, bs=128, workers=2):
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    tfm = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                              transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.utils.data.DataLoader(PILDataset(cifar.x_train, cifar.y_train, tfm), batch_size=bs, shuffle=True,
                                       num_workers=workers, drop_last=True, persistent_workers=workers > 0)


def time_plain_loop(model, loader, device, steps, warmup, channels_last=False) -> float:
    "Images/s of a plain PyTorch training loop (SGD) over `steps` batches after `warmup`."
    model = model.to(device)
    if channels_last: model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn, n, it = nn.CrossEntropyLoss(), 0, iter(loader)
    model.train()
    for i in range(warmup + steps):
        try: x, y = next(it)
        except StopIteration: it = iter(loader); x, y = next(it)
        if i == warmup: sync(device); start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        if i >= warmup: n += len(x)
    sync(device)
    return n / (time.perf_counter() - start)


# ---------------------------------------------------------------- normnets through fastai

def sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()


class StepTimer(Callback):
    "Times `steps` training batches after `warmup` of them, then stops the fit."
    order = 100
    def __init__(self, warmup, steps): self.warmup, self.steps = warmup, steps
    def before_fit(self): self.count, self.images = 0, 0
    def before_batch(self):
        if self.count == self.warmup: sync(self.dls.device); self.start = time.perf_counter()
    def after_batch(self):
        self.count += 1
        if self.count > self.warmup: self.images += len(self.xb[0])
        if self.count == self.warmup + self.steps:
            sync(self.dls.device); self.seconds = time.perf_counter() - self.start
            raise CancelFitException()


def learner_throughput(dls, norm, steps, warmup, precision=PRECISION, tweak=None, **net) -> tuple:
    """Training images/s of the real fastai Learner loop (one-cycle, label smoothing, accuracy metric), and the learner.
    `net`: widths; `tweak`: a function that changes the learner before it trains (one of the alternatives below)."""
    learn = make_learner(dls, norm, precision=precision, **net)
    if tweak: tweak(learn)
    timer = StepTimer(warmup, steps)
    epochs = -(-(warmup + steps) // len(dls.train))   # enough epochs to reach the last timed step
    with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(epochs, cbs=timer)
    return timer.images / timer.seconds, learn


# ---------------------------------------------------------------- alternatives measured against normnets as run

def without_channels_last(learn): learn.remove_cb(learn.channels_last)


def compiled(learn):
    "The model through `torch.compile`; its compilation falls in the warm-up steps."
    learn.model = torch.compile(learn.model)


def bf16_group_norm(learn):
    "PyTorch's GroupNorm in place of normnets' FloatGroupNorm, so that it computes in bfloat16."
    for m in learn.model.modules():
        if isinstance(m, FloatGroupNorm): m.__class__ = nn.GroupNorm   # same parameters, no float32 cast


class NCHWBatchNorm2d(nn.BatchNorm2d):
    "Batch norm computed on an NCHW copy of its input, its output copied back to channels-last."
    def forward(self, x): return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


def nchw_batch_norm(learn):
    "NCHW batch norm on the layers whose channels are not a multiple of 16, where the channels-last kernel is slow."
    for m in learn.model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.num_features % 16: m.__class__ = NCHWBatchNorm2d


def inference_throughput(learn) -> float:
    "Images/s of `get_preds` over the whole test set (eval mode, the real validation pipeline)."
    learn.model.eval()
    with learn.no_bar(): learn.get_preds(dl=learn.dls.valid)   # warm-up
    sync(learn.dls.device); start = time.perf_counter()
    with learn.no_bar(): learn.get_preds(dl=learn.dls.valid)
    sync(learn.dls.device)
    return len(learn.dls.valid_ds) / (time.perf_counter() - start)


def matmul_gflops(device, dtype=torch.float32, n=4096, reps=10) -> float:
    "GFLOP/s of an n x n matrix multiply in `dtype`, the best of `reps`."
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float('inf')
    for _ in range(reps + 2):
        sync(device); t = time.perf_counter(); a @ b; sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


# Operator name fragments of each kind of work, for the profile's summary line.
OP_KINDS = {'convolutions': ('convolution',), 'normalization': ('batch_norm', 'group_norm', 'layer_norm'),
            'ReLU': ('threshold', 'clamp', 'relu'), 'max-pool': ('max_pool',)}


def profile(dls, norm, steps=10, rows=12):
    """torch.profiler's top operators by self time over `steps` training batches, each kind of work's share, and the
    GFLOP/s of the convolutions alone (their forward and backward FLOPs over their own time)."""
    learn = make_learner(dls, norm)
    with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(1, cbs=StepTimer(3, 1))   # warm-up
    timer = StepTimer(0, steps)
    with torch.profiler.profile() as prof, learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(1, cbs=timer)
    cuda = dls.device.type == 'cuda'
    events = prof.key_averages()
    self_time = lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total
    total = sum(self_time(e) for e in events)
    kind_time = {kind: sum(self_time(e) for e in events if any(f in e.key for f in frags)) for kind, frags in OP_KINDS.items()}
    shares = {kind: t / total for kind, t in kind_time.items()}
    conv_gflops = 6 * count_macs(learn.model) * timer.images / (kind_time['convolutions'] / 1e6) / 1e9
    table = events.table(sort_by='self_device_time_total' if cuda else 'self_cpu_time_total', row_limit=rows)
    return table, shares, conv_gflops


@call_parse
def main(
    data:str=None,     # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    steps:int=150,     # timed training steps per measurement
    warmup:int=10,     # untimed steps first
    out:str=None,      # markdown to write (default: results/speed.md)
):
    "Measure and print the speed table; write it to results/speed.md."
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    cifar = load_cifar(data)
    dls = get_dls(cifar=cifar, bs=BS, device=device)
    machine = device_name(device)
    precision = resolve_precision(PRECISION, device)
    cores = f"{torch.get_num_threads()} torch threads" + (f", {torch.cuda.get_device_name()}" if device.type == 'cuda' else '')
    print(f"device: {machine}; torch {torch.__version__}; {cores}; normnets trains in {precision}", flush=True)

    # glibc's default allocator first, as a fresh training process meets it: glibc adapts its thresholds to the
    # blocks a process has freed (after the usual pipeline's loop, page faults per step fall from about 20,000 to
    # under 100 here), which would hide what keep_freed_memory() saves. It cannot be undone in a process, so
    # everything after it, the usual pipeline included, runs with it.
    default_allocator_ips = learner_throughput(dls, 'batch', steps, warmup)[0]
    keep_freed_memory()

    # The machine's limit in the arithmetic normnets trains in: a bfloat16 matmul when it trains in bfloat16.
    peaks = {'fp32': matmul_gflops(device)}
    if precision != 'fp32': peaks[precision] = matmul_gflops(device, torch.bfloat16 if precision == 'bf16' else torch.float16)
    peak = peaks[precision]
    print('matmul: ' + ', '.join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items()), flush=True)

    usual = usual_net()
    usual_ips = time_plain_loop(usual, usual_loader(cifar), device, steps, warmup)
    usual_macs = count_macs(usual)
    print(f"usual pipeline: {usual_ips:.0f} images/s", flush=True)

    rows = []
    for norm in NORMS:
        ips, learn = learner_throughput(dls, norm, steps, warmup)
        macs = count_macs(learn.model)
        rows.append(dict(norm=norm, params=count_params(learn.model), macs=macs, train_ips=ips, infer_ips=inference_throughput(learn)))
        print(f"{norm} norm: {ips:.0f} training images/s", flush=True)
    df = pd.DataFrame(rows).set_index('norm', drop=False)
    df['train_gflops'] = 6 * df.macs * df.train_ips / 1e9
    df['peak_fraction'] = df.train_gflops / peak
    df['vs_usual'] = df.train_ips / usual_ips
    # One study run: 20 epochs of training and a test pass each, then the final evaluation
    # (4 test passes for interpretation and figures, 1 pass over the training images).
    per_variant = 20 * (50_000 / df.train_ips + 10_000 / df.infer_ips) + (4 * 10_000 + 50_000) / df.infer_ips
    study_minutes = per_variant.sum() / 60

    # What the speed choices are worth: each row changes one thing, against the same variant as run.
    changes = []
    def change(norm, label, ips): changes.append((norm, label, ips)); print(f"{norm} norm, {label}: {ips:.0f} images/s", flush=True)
    if precision != 'fp32':
        for norm in NORMS: change(norm, 'float32 (no mixed precision)', learner_throughput(dls, norm, steps, warmup, precision='fp32')[0])
        if precision == 'bf16':
            change('group', "PyTorch's bfloat16 group norm (no float32 cast)",
                   learner_throughput(dls, 'group', steps, warmup, tweak=bf16_group_norm)[0])
    change('batch', "glibc's default allocator (freed memory back to the OS every step)", default_allocator_ips)
    change('batch', 'without channels-last', learner_throughput(dls, 'batch', steps, warmup, tweak=without_channels_last)[0])
    change('batch', 'batch norm in NCHW on the 12- and 24-channel layers',
           learner_throughput(dls, 'batch', steps, warmup, tweak=nchw_batch_norm)[0])
    change('batch', 'widths ' + ', '.join(f'{k}={v}' for k, v in ALIGNED_WIDTHS.items()) + ' (16 channels at 32x32)',
           learner_throughput(dls, 'batch', steps, warmup, **ALIGNED_WIDTHS)[0])
    change('batch', 'torch.compile (after its compilation)', learner_throughput(dls, 'batch', steps, warmup, tweak=compiled)[0])
    change('batch', f'batch size {2 * BS}', learner_throughput(get_dls(cifar=cifar, bs=2 * BS, device=device), 'batch', steps, warmup)[0])
    change('batch', 'usual per-image PIL pipeline, plain loop, float32',
           time_plain_loop(normnet('batch'), usual_loader(cifar, bs=BS), device, steps, warmup, channels_last=True))
    change('batch', 'none: normnets as run, measured again', learner_throughput(dls, 'batch', steps, warmup)[0])
    prof, shares, conv_gflops = profile(dls, 'batch')
    share_text = ', '.join(f'{kind} {100 * x:.0f}%' for kind, x in shares.items())
    usual_gflops = 6 * usual_macs * usual_ips / 1e9

    table = pd.DataFrame({
        'network': [f'normnets, {n} norm' for n in df.norm] + ['usual pipeline (49,672-parameter solution)'],
        'parameters': [f'{p:,}' for p in df.params] + [f'{count_params(usual):,}'],
        'MACs / image': [f'{m / 1e6:.2f} M' for m in df.macs] + [f'{usual_macs / 1e6:.2f} M'],
        'precision': [precision] * len(df) + ['fp32'],
        'train images/s': [f'{x:.0f}' for x in df.train_ips] + [f'{usual_ips:.0f}'],
        'inference images/s': [f'{x:.0f}' for x in df.infer_ips] + [''],
        'x usual': [f'{x:.2f}' for x in df.vs_usual] + ['1.00'],
        'train GFLOP/s': [f'{x:.1f}' for x in df.train_gflops] + [f'{usual_gflops:.1f}'],
        'of the matmul peak in its precision': [f'{100 * x:.0f}%' for x in df.peak_fraction] + [f"{100 * usual_gflops / peaks['fp32']:.0f}%"]})
    if precision != 'fp32': table.insert(len(table.columns), 'of the fp32 matmul peak', [f"{100 * g / peaks['fp32']:.0f}%" for g in df.train_gflops] + [''])
    what = pd.DataFrame({'variant': [f'{n} norm' for n, _, _ in changes], 'change': [c for _, c, _ in changes],
                         'train images/s': [f'{ips:.0f}' for _, _, ips in changes],
                         'as run': [f'{df.train_ips[n]:.0f}' for n, _, _ in changes],
                         'relative to as run': [f'{ips / df.train_ips[n]:.2f}' for n, _, ips in changes]})
    goal = lambda ok: 'met' if ok else 'not met'
    goals = (f"Goals: training at least 3x the usual pipeline's images/s: {goal(df.vs_usual.min() >= 3)} (lowest "
             f"{df.vs_usual.min():.2f}x); at least 50% of the matmul peak: {goal(df.peak_fraction.min() >= 0.5)} (lowest "
             f"{100 * df.peak_fraction.min():.0f}%, see the profile below); the full study in 30 minutes or less: "
             f"{goal(study_minutes <= 30)} (projected {study_minutes:.1f} minutes).\n\n")
    peak_text = ' and '.join(f"{p}: **{g:.0f} GFLOP/s**" for p, g in peaks.items())
    md = (f"Measured by `benchmarks/speed.py` on {machine}, torch {torch.__version__}, {cores}, {steps} timed training "
          f"steps after {warmup} of warm-up, all in one run. normnets trains in {precision} here.\n\n"
          f"Matrix-multiply peak (4096 x 4096), {peak_text}; each variant's fraction is of the {precision} peak. "
          f"Projected full study (3 variants x 20 epochs, evaluation included): **{study_minutes:.1f} minutes**.\n\n"
          + goals + report.markdown_table(table) + '\n' + report.markdown_table(what)
          + "\nWhat normnets keeps, each a row below 1.00 above: bfloat16 autocast where the hardware has it, group and "
          "layer norm computed in float32, freed memory kept in the process, channels-last, and batches sliced and "
          "augmented whole instead of per-image PIL transforms. What it leaves out: the widths, which change the "
          "network (group norm lost accuracy with 16 channels at 32x32 in the ablation's short runs, "
          "results/ablation.md, so normnets keeps 12 and 24 there); batch size 512 (group norm lost accuracy at 512 "
          "in the same ablation); torch.compile (it needs a working C++ compiler, which many laptops lack, and "
          "compiles anew in every run); NCHW batch norm (slower). The last row measures normnets as run once more, "
          "at the end: its distance from 1.00 is this run's own noise.\n"
          + f"\nWhere the batch-norm variant's training step spends its time (torch.profiler, self time, forward and "
          f"backward together): {share_text}, the rest in the optimizer, loss, casts and data. The convolutions alone "
          f"run at {conv_gflops:.0f} GFLOP/s, {100 * conv_gflops / peak:.0f}% of the {precision} matmul peak: a 3x3 "
          f"convolution with 3 to 32 channels is a thin matrix multiply, and no work on the other operators can lift "
          f"the whole step above what its convolutions reach. Normalization, ReLU and pooling are memory-bound passes "
          f"over the activations with almost no arithmetic: they add time without adding FLOPs. Batch norm is the "
          f"largest of them: PyTorch's channels-last CPU kernel works through the (N*H*W, C) rows vectorized across "
          f"the channels, and with 12 or 24 channels every row ends in a partial vector, several times slower per "
          f"value than 16 or 32 channels (the widths row above); batch norm in NCHW on those layers costs more in "
          f"layout copies than it saves (its row above).\n\n```\n{prof}\n```\n")
    out = Path(out) if out else REPO_DIR / 'results' / 'speed.md'
    out.write_text(md)
    print('\n' + md)
    print(f"speed: vs_usual={df.vs_usual.min():.2f} peak_fraction={df.peak_fraction.min():.3f} study_minutes={study_minutes:.1f}")
