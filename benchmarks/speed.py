"""Speed: normnets against the usual way these networks are trained, and against the machine's limit.

    python benchmarks/speed.py --data ../shared/data/cifar10-jpeg.tgz

Measured in one run, on one machine (the GPU if there is one, else the CPU), with the same torch threads:
1. normnets: training images/s over real training steps after warm-up (the real `get_dls` pipeline and the
   real fastai `Learner` of each norm's recipe at its own batch size), inference images/s over the test set,
   forward MACs per image; and the training images/s of the reference (`REFERENCE_RECIPE`), normnets before
   its recipe search.
2. The usual pipeline: a published 49,672-parameter solution of the same exercise, a plain PyTorch loop, a
   torch DataLoader over per-image PIL transforms with 2 workers, batch size 128, SGD.
3. The machine's limit: GFLOP/s of a large matrix multiply in float32 and in the precision normnets trains in,
   and each variant's achieved training GFLOP/s (3 x 2 x forward MACs x images/s: forward, and backward for
   inputs and for weights) as a fraction of it.
4. What the speed choices are worth: each row of `CHANGES` changes one thing against a variant as run.
5. A torch.profiler breakdown of the batch-norm variant's training step, and the projected time of the study.
6. Several runs at once against one run alone: each variant's runs trained as one fused network, and the
   study's projected time with each variant's seeds fused; batch and group norm's runs each in a process of
   its own (`--jobs`) and, on a GPU, each in a thread on a CUDA stream of its own in one process.
Each comparison of 4 and 6 is measured `--rounds` times, each time right after what it is compared with
(`paired`): on a shared machine one measurement can be 15% off, and the rounds' ratios show how far.
Writes the measurements to results/speed.json on a CPU without bfloat16 arithmetic, speed-bf16.json on one
with AVX512-BF16, speed-amx.json on one with AMX (`cpu_kind`), gpu/speed.json on a GPU; `scripts/report.py`
turns them into the pages of the same names.
"""
import contextlib, functools, json, multiprocessing, os, platform, statistics, threading, time
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pandas as pd
import torch
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from fastai.optimizer import OptimWrapper
from fastcore.script import call_parse
from PIL import Image
from torchvision import transforms

from normnets import NORMS, FloatGroupNorm, normnet, count_macs, count_params
from normnets_data import REPO_DIR, get_dls, load_cifar
from normnets_files import FolderError, check_out, read_json
from normnets_fused import fused_learner
from normnets_device import cpu_kind, device_name, keep_freed_memory, resolve_device
from normnets_recipes import STUDY_SEEDS, TRAINING_FIELDS, recipe
from normnets_learner import CapturedStep, normnet_learner
from normnets_runs import recipe_dls, seed_run
from normnets_cli import cli_errors, path_option
from normnets_study import JOBS_AT_ONCE, start_worker

# ---------------------------------------------------------------- the reference

# The network and recipe of normnets before the recipe search: 46,374 parameters, 8.88 M MACs per image, batch
# norm, Adam, batch size 256: what each variant's recipe costs in speed is its images/s against this one's,
# measured in the same run. Every network option, the batch size and the crops are pinned, so the reference
# stays what it is when the defaults change.
REFERENCE_NORM, REFERENCE_BS = 'batch', 256
REFERENCE_RECIPE = dict(opt='adam', crop_pad=4,
                        net=dict(c1=12, c2=24, c3=16, c4=24, c6=32, c7=32, gn_groups=4, norm_after_relu=False,
                                 zero_init_residual=False, skips='branch'))


# ---------------------------------------------------------------- the usual pipeline

def usual_net(dropout=0.05) -> nn.Sequential:
    "The published 49,672-parameter solution: conv -> ReLU -> BatchNorm -> Dropout, with 1x1 transitions."
    def block(c_in, c_out):
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.BatchNorm2d(c_out),
            nn.Dropout(dropout),
        ]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 54),
        nn.Conv2d(54, 10, 1, bias=False),
        nn.MaxPool2d(2),
        *block(10, 16),
        *block(16, 16),
        *block(16, 32),
        nn.Conv2d(32, 16, 1, bias=False),
        nn.MaxPool2d(2),
        *block(16, 32),
        *block(32, 32),
        *block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(32, 10, 1, bias=False),
        nn.Flatten(),
    )


class PILDataset(torch.utils.data.Dataset):
    """CIFAR-10 the way torchvision's CIFAR10 dataset serves it: a PIL image per item, then per-image
    transforms."""
    def __init__(self, x, y, tfm): self.x, self.y, self.tfm = x, y, tfm
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.tfm(Image.fromarray(self.x[i])), int(self.y[i])


def usual_loader(cifar, bs=128, workers=2):
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    tfm = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                              transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.utils.data.DataLoader(
        PILDataset(cifar.x_train, cifar.y_train, tfm),
        batch_size=bs,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def sync(device):
    """Wait for the work this thread launched on `device`: its current stream's alone (a device-wide sync
    would fail while a run in another thread captures its step), on the run's own device, not device 0."""
    if torch.device(device).type == 'cuda': torch.cuda.current_stream(device).synchronize()


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

class StepTimer(Callback):
    """Times `steps` training batches after `warmup` of them, then stops the fit. With a `barrier` (of runs
    measured at once) the timed steps start when every run has warmed up."""
    order = 100
    def __init__(self, warmup, steps, barrier=None):
        self.warmup, self.steps, self.barrier = warmup, steps, barrier
    def before_fit(self): self.count, self.images = 0, 0
    def before_batch(self):
        if self.count != self.warmup: return
        sync(self.dls.device)
        if self.barrier:
            try: self.barrier.wait()
            except threading.BrokenBarrierError: raise CancelFitException() from None   # another run failed
        self.start = time.perf_counter()
    def after_batch(self):
        self.count += 1
        if self.count > self.warmup: self.images += len(self.xb[0])
        if self.count == self.warmup + self.steps:
            sync(self.dls.device); self.end = time.perf_counter()
            self.seconds = self.end - self.start
            raise CancelFitException()


def recipe_learner(dls, norm, **overrides):
    "The learner of `norm`'s recipe on `dls` (its batch size and device), set up as `train_run` sets it up."
    r = recipe(norm, bs=dls.train.bs, device=str(dls.device), **overrides)
    seed_run(r)   # cuDNN autotuning too: off where the recipe is reproducible
    return normnet_learner(dls, r)


SEEDING = threading.Lock()   # runs in threads seed the process's generators and build their networks in turn


def own_learner(cifar, device, norm, seed, **overrides):
    "The learner of `norm`'s recipe at `seed` on `DataLoaders` of its own, as `train_run` builds it."
    r = recipe(norm, seed=seed, device=str(device), **overrides)
    with SEEDING:
        seed_run(r)
        return normnet_learner(recipe_dls(r, cifar=cifar), r)


def timed_fit(learn, timer: StepTimer, *args) -> StepTimer:
    "Fit `learn` quietly for enough epochs to reach the last step `timer` times (it stops the fit there)."
    epochs = -(-(timer.warmup + timer.steps) // len(learn.dls.train))
    with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(epochs, *args, cbs=timer)
    return timer


def learner_throughput(dls, norm, steps, warmup, tweak=None, **overrides) -> tuple:
    """Training images/s of the real fastai Learner loop of `norm`'s recipe with `overrides`, and the learner.
    `tweak`: a function that changes the learner before it trains (one of the alternatives below)."""
    learn = recipe_learner(dls, norm, **overrides)
    if tweak: tweak(learn)
    timer = timed_fit(learn, StepTimer(warmup, steps))
    return timer.images / timer.seconds, learn


def paired(measure, baseline, rounds: int) -> tuple[float, float, list]:
    """`baseline` and `measure` (functions that return images/s) in turn, `rounds` times: each ratio compares
    two measurements taken one right after the other, so a slow minute of a shared machine slows both. The
    medians of `measure` and `baseline`, and each round's ratio of the two."""
    base, ips = zip(*[(baseline(), measure()) for _ in range(rounds)])
    return statistics.median(ips), statistics.median(base), [m / b for m, b in zip(ips, base)]


def inference_throughput(learn) -> float:
    "Images/s of `get_preds` over the whole test set (eval mode, the real validation pipeline)."
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


# ---------------------------------------------------------------- alternatives measured against normnets as
# run

def without_channels_last(learn): learn.remove_cb(learn.channels_last)


def fastai_loop(learn):
    "A tweak: the training step through fastai's loop, not the captured step (`CapturedStep`, on a GPU)."
    if hasattr(learn, 'captured_step'): learn.remove_cb(learn.captured_step)


def torch_optimizer(opt, **options):
    """A tweak: the learner's optimizer replaced by PyTorch's `opt` through fastai's `OptimWrapper` (fastai's
    loops over the parameters in Python, several kernels each; `foreach` steps them all in a few kernels), in
    fastai's loop. PyTorch's optimizers decay every parameter: fastai exempts batch norm's and the biases."""
    def tweak(learn):
        fastai_loop(learn)
        learn.opt_func = functools.partial(OptimWrapper, opt=opt, **options)
    return tweak


def compiled_step(learn):
    "A tweak: the training step as one function (`CapturedStep` without a graph), through `torch.compile`."
    fastai_loop(learn)
    learn.add_cb(CapturedStep(graph=False, compiled=True))


def compiled(learn, **options):
    "The model through `torch.compile`, in fastai's loop; its compilation falls in the warm-up steps."
    fastai_loop(learn)
    learn.model = torch.compile(learn.model, **options)


def bf16_group_norm(learn):
    "PyTorch's GroupNorm in place of normnets' FloatGroupNorm, so that it computes in bfloat16."
    for m in learn.model.modules():
        if isinstance(m, FloatGroupNorm): m.__class__ = nn.GroupNorm   # same parameters, no float32 cast


class NCHWBatchNorm2d(nn.BatchNorm2d):
    "Batch norm computed on an NCHW copy of its input, its output copied back to channels-last."
    def forward(self, x): return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


def nchw_batch_norm(learn):
    """NCHW batch norm on the layers whose channels are not a multiple of 16, where the channels-last kernel
    is slow."""
    for m in learn.model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.num_features % 16: m.__class__ = NCHWBatchNorm2d


# Widths with 16 channels at 32x32, where normnets has 12 and 24: AVX-512 holds 16 floats, and PyTorch's
# channels-last CPU batch norm is several times slower on 12 or 24 channels than on 16.
ALIGNED_WIDTHS = dict(c1=16, c2=16, c4=32, c7=24)

# (variant, change, when it applies, learner_throughput's arguments): each row changes one thing. `when` takes
# the device type and the recipe's precision. The allocator, the batch size and the usual data pipeline are
# measured in `measure_changes` itself.
CHANGES = [
    ('batch', 'float32 (no mixed precision)', lambda dev, p: p != 'fp32', dict(precision='fp32')),
    ('group', 'float32 (no mixed precision)', lambda dev, p: p != 'fp32', dict(precision='fp32')),
    ('layer', 'float32 (no mixed precision)', lambda dev, p: p != 'fp32', dict(precision='fp32')),
    (
        'group',
        "PyTorch's bfloat16 group norm (no float32 cast)",
        lambda dev, p: p == 'bf16',
        dict(tweak=bf16_group_norm),
    ),
    (
        'batch',
        'cuDNN autotuning on (reproducible=False)',
        lambda dev, p: dev == 'cuda',
        dict(reproducible=False),
    ),
    ('batch', 'without channels-last', lambda dev, p: True, dict(tweak=without_channels_last)),
    # PyTorch's CUDA group norm returns NCHW for channels-last input (its issue 111824): copies at each layer
    ('group', 'without channels-last', lambda dev, p: dev == 'cuda', dict(tweak=without_channels_last)),
    # what the captured step gains over fastai's loop, where a run takes it (`captured_step_fits`)
    *[(n, "fastai's loop (no captured step)", lambda dev, p: dev == 'cuda' and p != 'fp16',
       dict(tweak=fastai_loop)) for n in ('batch', 'group')],
    (
        'batch',
        'batch norm in NCHW on the 12- and 24-channel layers',
        lambda dev, p: dev == 'cpu',
        dict(tweak=nchw_batch_norm),
    ),
    (
        'batch',
        'widths ' + ', '.join(f'{k}={v}' for k, v in ALIGNED_WIDTHS.items()) + ' (16 channels at 32x32)',
        lambda dev, p: True,
        dict(net=ALIGNED_WIDTHS),
    ),
    ('batch', 'torch.compile (after its compilation)', lambda dev, p: True, dict(tweak=compiled)),
    # a launch-bound GPU step: CUDA graphs replay the forward and backward's hundreds of kernels in one launch
    ('batch', "torch.compile, mode='reduce-overhead' (CUDA graphs)", lambda dev, p: dev == 'cuda',
     dict(tweak=functools.partial(compiled, mode='reduce-overhead'))),
    ('batch', "PyTorch's SGD, nesterov, foreach (OptimWrapper)", lambda dev, p: True,
     dict(tweak=torch_optimizer(torch.optim.SGD, momentum=0.9, nesterov=True, foreach=True))),
    ('group', "PyTorch's AdamW, foreach (OptimWrapper)", lambda dev, p: True,
     dict(tweak=torch_optimizer(torch.optim.AdamW, foreach=True))),
    ('group', "PyTorch's AdamW, fused (OptimWrapper)", lambda dev, p: dev == 'cuda',
     dict(tweak=torch_optimizer(torch.optim.AdamW, fused=True))),
]

# Operator name fragments of each kind of work, for the profile's summary.
OP_KINDS = {'convolutions': ('convolution',), 'normalization': ('batch_norm', 'group_norm', 'layer_norm'),
            'ReLU': ('threshold', 'clamp', 'relu'), 'max-pool': ('max_pool',)}


# ---------------------------------------------------------------- measure

def recipe_loaders(cifar, device):
    """`dls_of(norm, **overrides)`: the `DataLoaders` of that recipe (its batch size and crops), each distinct
    one built once. A variant is timed at its recipe's batch size: a smaller batch is more steps, its cost."""
    @functools.cache
    def built(bs, crop_pad): return get_dls(cifar=cifar, bs=bs, crop_pad=crop_pad, device=device)

    def dls_of(norm, **overrides):
        r = recipe(norm, **overrides)
        return built(r.bs, r.crop_pad)
    return dls_of


def measure_variants(dls_of, steps, warmup) -> list[dict]:
    """Each registered variant's training and inference images/s with its recipe, on its recipe's
    `DataLoaders` (`dls_of(norm)`)."""
    rows = []
    for norm in NORMS:
        ips, learn = learner_throughput(dls_of(norm), norm, steps, warmup)
        rows.append(
            dict(
                norm=norm,
                **{k: getattr(learn.recipe, k) for k in TRAINING_FIELDS},   # the recipe measured
                params=count_params(learn.model),
                macs=count_macs(learn.model),
                precision=learn.recipe.precision,
                train_ips=ips,
                infer_ips=inference_throughput(learn),
            )
        )
        print(
            f"{norm} norm: {ips:.0f} training images/s, {rows[-1]['infer_ips']:.0f} inference images/s",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------- several runs at once

# How many runs are fused in one network: the study's seeds of a variant, and 8, a step towards a row of the
# recipe search (the cells of one optimizer share a network and batch size: 24 and 18 in search.GRID), whose
# --fuse auto takes every measured width where its own was not measured.
FUSED_COPIES = (STUDY_SEEDS, 8)
# How many runs train at once as processes (and, on a GPU, as threads), by device type: on a GPU what a study
# trains at once where left to normnets (JOBS_AT_ONCE), and 8; on a CPU 2, a thread each on 2 cores, since a
# process holds its own copy of the images and libraries (1-2 GB: 8 beside a training run ran a 24 GB machine
# out of memory).
RUNS_AT_ONCE = {'cuda': (JOBS_AT_ONCE['cuda'], 8), 'cpu': (2,)}
# The variants measured at once: batch norm (batch 256) and group norm (batch 128), the two step costs.
AT_ONCE_NORMS = ('batch', 'group')


def fused_throughput(cifar, device, norm, copies, steps, warmup) -> float:
    """Training images/s, summed over `copies` runs of `norm`'s recipe (seeds 0, 1, ...) trained as one fused
    network through the real fastai loop, each with its own `DataLoaders`, as `train_fused` builds them."""
    learn = fused_learner([own_learner(cifar, device, norm, seed) for seed in range(copies)])
    timer = timed_fit(learn, StepTimer(warmup, steps), 1.)
    return copies * timer.images / timer.seconds


def timed_run(cifar, device, norm, seed, steps, warmup, barrier, **overrides) -> tuple[int, float, float]:
    """One run of `norm`'s recipe at `seed`, on `DataLoaders` of its own, timed beside the others at the
    `barrier`: its (images, start, end) over its timed steps. A run that fails breaks the barrier and raises;
    the others stop there, untimed (None)."""
    try: timer = timed_fit(own_learner(cifar, device, norm, seed, **overrides),
                           StepTimer(warmup, steps, barrier))
    except BaseException:
        barrier.abort()
        raise
    return (timer.images, timer.start, timer.end) if hasattr(timer, 'end') else None


def summed_throughput(timed: list) -> float:
    "Images/s of runs timed at once (`timed_run`'s): all their images over the span of all their steps."
    images, starts, ends = zip(*timed)
    return sum(images) / (max(ends) - min(starts))


def threads_throughput(cifar, device, norm, runs, steps, warmup) -> float:
    """Training images/s summed over `runs` runs at once in this process, each in a thread of its own and, on
    a GPU, on a CUDA stream of its own: while one run's Python prepares its step, the GPU replays the
    others' captured steps, in one process (one CUDA context, one copy of the data)."""
    barrier = threading.Barrier(runs)
    def run(seed):
        stream = torch.cuda.Stream(device) if device.type == 'cuda' else None
        with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
            return timed_run(cifar, device, norm, seed, steps, warmup, barrier)
    with ThreadPoolExecutor(runs) as pool: futures = [pool.submit(run, seed) for seed in range(runs)]
    return summed_throughput([f.result() for f in futures])   # a failed run's error, not a stopped one's


def start_timing_worker(threads, barrier, cifar):
    "A process of `processes_throughput`: its share of the CPU threads, the runs' barrier and the images."
    start_worker(threads)
    global worker_barrier, worker_cifar
    worker_barrier, worker_cifar = barrier, cifar


def worker_run(device, norm, seed, steps, warmup, overrides):
    return timed_run(worker_cifar, device, norm, seed, steps, warmup, worker_barrier, **overrides)


@contextlib.contextmanager
def timing_processes(cifar, runs: int):
    """`runs` processes started once for the measurements of `runs` runs at once (a started process keeps
    the images and its CUDA context), each with its share of the CPU threads, as `run_parallel` starts
    them."""
    ctx = multiprocessing.get_context('spawn')   # CUDA cannot fork
    pool = ProcessPoolExecutor(runs, mp_context=ctx, initializer=start_timing_worker,
                               initargs=(max(1, torch.get_num_threads() // runs), ctx.Barrier(runs), cifar))
    try: yield pool
    finally: pool.shutdown(cancel_futures=True)


def processes_throughput(pool, device, norm, runs, steps, warmup, **overrides) -> float:
    """Training images/s summed over `runs` runs at once, each in a process of its own (`timing_processes`:
    as many processes as runs, so each takes one), as `run_all.py --jobs` trains them."""
    futures = [pool.submit(worker_run, str(device), norm, seed, steps, warmup, overrides)
               for seed in range(runs)]
    return summed_throughput([f.result() for f in futures])


def measure_at_once(cifar, device, dls_of, steps, warmup, rounds) -> list[dict]:
    """Several runs of a variant at once, against one run alone, each round right after it (`paired`):
    images/s summed over the runs, each run `steps` steps. Each variant's runs fused into one network
    (`FUSED_COPIES` runs); for batch and group norm, `RUNS_AT_ONCE` runs each in a process of its own and, on
    a GPU, in a thread of its own in one process."""
    rows = []
    def add(norm, how, runs, measure):
        ips, alone, ratios = paired(measure, lambda: learner_throughput(dls_of(norm), norm, steps, warmup)[0],
                                    rounds)
        rows.append(dict(norm=norm, how=how, runs=runs, bs=recipe(norm).bs, train_ips=ips, alone_ips=alone,
                         ratios=ratios))
        print(f"{norm} norm, {runs} runs at once ({how}): {ips:.0f} training images/s ("
              + ', '.join(f'{x:.2f}' for x in ratios) + "x one run alone)", flush=True)
    for copies in FUSED_COPIES:
        for norm in NORMS:
            add(norm, 'fused', copies,
                lambda: fused_throughput(cifar, device, norm, copies, max(4, steps // copies), warmup))
    for runs in RUNS_AT_ONCE.get(device.type, RUNS_AT_ONCE['cpu']):
        with timing_processes(cifar, runs) as pool:
            for norm in AT_ONCE_NORMS:
                add(norm, 'processes', runs,
                    lambda: processes_throughput(pool, device, norm, runs, steps, warmup))
                if device.type == 'cuda':
                    add(norm, 'streams', runs,
                        lambda: threads_throughput(cifar, device, norm, runs, steps, warmup))
    return rows


def measure_small_batches_at_once(cifar, device, dls_of, steps, warmup, rounds) -> list[dict]:
    """On a CPU, the batch-size grid's question: at its small batch sizes (`COMPILE_BATCHES`) and in its
    precision (fp32), do runs in processes of one thread each train more images a second, summed, than one
    run of every thread? Rows as `measure_at_once`'s, each run timed over as many images as `steps` steps of
    64."""
    rows, runs = [], RUNS_AT_ONCE['cpu'][0]
    with timing_processes(cifar, runs) as pool:
        for bs in COMPILE_BATCHES:
            for norm in AT_ONCE_NORMS:
                n, grid = steps * max(1, 64 // bs), dict(bs=bs, precision='fp32')
                ips, alone, ratios = paired(
                    lambda: processes_throughput(pool, device, norm, runs, n, warmup, **grid),
                    lambda: learner_throughput(dls_of(norm, bs=bs), norm, n, warmup, precision='fp32')[0],
                    rounds)
                rows.append(dict(norm=norm, how='processes', runs=runs, **grid, train_ips=ips,
                                 alone_ips=alone, ratios=ratios))
                print(f"{norm} norm, batch size {bs}, fp32, {runs} runs at once (processes): {ips:.0f} "
                      "training images/s (" + ', '.join(f'{x:.2f}' for x in ratios) + "x one run alone)",
                      flush=True)
    return rows


def measure_changes(dls_of, cifar, steps, warmup, rounds, precision, allocator) -> list[dict]:
    """What each speed choice is worth: images/s with one thing changed, each round right after its variant
    as run (`paired`); the last row pairs a variant as run with itself, so its ratios are the benchmark's own
    noise. `allocator`: glibc's default allocator's images/s and the variant's as run right after, measured
    once at the start of the benchmark (a process cannot go back to glibc's adapted thresholds)."""
    dls = dls_of('batch')
    dev, bs, rows = dls.device.type, dls.train.bs, []
    def add(norm, change, measure):
        as_run = lambda: learner_throughput(dls_of(norm), norm, steps, warmup)[0]
        try: (ips, base, ratios), error = paired(measure, as_run, rounds), None
        except Exception as e:   # noqa: BLE001  a failed alternative is a row of the table, not the end
            ips, base, ratios, error = None, None, [], f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(dict(norm=norm, change=change, train_ips=ips, as_run_ips=base, ratios=ratios,
                         error=error))
        print(f"{norm} norm, {change}: " + (f"{ips:.0f} images/s, " + ', '.join(f'{x:.2f}' for x in ratios)
                                           + 'x as run' if ips else error), flush=True)
    for norm, change, when, kw in CHANGES:
        if when(dev, precision):
            add(norm, change, lambda: learner_throughput(dls_of(norm), norm, steps, warmup, **kw)[0])
    if allocator:
        ips, base = allocator
        rows.append(dict(norm='batch',
                         change="glibc's default allocator (freed memory back to the OS every step)",
                         train_ips=ips, as_run_ips=base, ratios=[ips / base], error=None))
    add('batch', f'batch size {2 * bs}', lambda: learner_throughput(
        dls_of('batch', bs=2 * bs), 'batch', steps, warmup)[0])
    add('batch', 'usual per-image PIL pipeline, plain loop, float32', lambda: time_plain_loop(
        normnet('batch'), usual_loader(cifar, bs=bs), dls.device, steps, warmup, channels_last=True))
    add('batch', 'none: normnets as run, measured again',
        lambda: learner_throughput(dls, 'batch', steps, warmup)[0])
    return rows


# The batch sizes the compiled step is measured at besides each recipe's own: the batch-size grid's smallest
# and a middle one, where a step is mostly overhead.
COMPILE_BATCHES = (8, 32)
EXERCISE_NORMS = tuple(n for n in NORMS if NORMS[n].exercise)   # batch, group and layer norm


class AlternatingSteps(Callback):
    """The learner's `CapturedStep` (compiled) runs its compiled and its eager function in turn, `chunk`
    training steps each, on the same model, data and state, each chunk timed: a pair of chunks is one round
    of compiled against eager, a few seconds apart, so that a slow spell of the machine slows both (`paired`'s
    idea, at a finer grain). The first pair is not a round (the compile, warm-up); the fit stops after
    `rounds` more."""
    order = CapturedStep.order - 1   # picks the function before the step runs

    def __init__(self, chunk: int, rounds: int): self.chunk, self.rounds = chunk, rounds

    def before_fit(self): self.count, self.seconds = 0, []

    def before_batch(self):
        if not self.training: return
        if self.count % self.chunk == 0:
            now = time.perf_counter()
            if self.count: self.seconds.append(now - self.start)
            if len(self.seconds) == 2 * (1 + self.rounds): raise CancelFitException()
            step = self.learn.captured_step
            step.step_fn = step.compiled_step if len(self.seconds) % 2 == 0 else step.step
            self.start = time.perf_counter()
        self.count += 1


def measure_compiled(dls_of, steps, rounds, precisions) -> list[dict]:
    """The training step compiled (`torch.compile`) against the same step eager (`AlternatingSteps`), for
    each study norm at `COMPILE_BATCHES` and its recipe's batch size, in each of `precisions`; a chunk is
    as many images as `steps` steps of 32. `compile_s`: the first compiled chunk's time beyond the median
    one's."""
    rows = []
    for precision in precisions:
        for norm in EXERCISE_NORMS:
            for bs in sorted({*COMPILE_BATCHES, recipe(norm).bs}):
                learn = recipe_learner(dls_of(norm, bs=bs), norm, precision=precision)
                compiled_step(learn)
                chunk = max(2, steps * 32 // bs)
                timer = AlternatingSteps(chunk, rounds)
                epochs = -(-chunk * 2 * (rounds + 1) // len(learn.dls.train))
                with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(epochs, cbs=timer)
                compiled, eager = (timer.seconds[2 + k::2] for k in (0, 1))
                row = dict(norm=norm, bs=bs, precision=precision, steps=chunk,
                           compiled_ips=chunk * bs / statistics.median(compiled),
                           eager_ips=chunk * bs / statistics.median(eager),
                           ratios=[e / c for c, e in zip(compiled, eager)],
                           compile_s=timer.seconds[0] - statistics.median(compiled),
                           error=None if learn.captured_step.compiled else 'the compile failed')
                rows.append(row)
                print(f"{norm} norm, batch size {bs}, {precision}: compiled {row['compiled_ips']:.0f} "
                      "images/s, "
                      f"{statistics.median(row['ratios']):.2f}x eager (rounds {min(row['ratios']):.2f} to "
                      f"{max(row['ratios']):.2f}), compiled in {row['compile_s']:.0f} s", flush=True)
    return rows


def measure_profile(dls, norm='batch', steps=10, rows=12) -> dict:
    """torch.profiler over `steps` training batches: each kind of work's share of the self time, the top
    operators, and the GFLOP/s of the convolutions alone (their forward and backward FLOPs over their own
    time)."""
    learn = recipe_learner(dls, norm)
    with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(1, cbs=StepTimer(3, 1))   # warm-up
    timer = StepTimer(0, steps)
    with torch.profiler.profile() as prof, learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(1, cbs=timer)
    cuda = dls.device.type == 'cuda'
    events = [e for e in prof.key_averages()]
    self_us = lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total
    total = sum(self_us(e) for e in events)
    kinds = {
        kind: sum(self_us(e) for e in events if any(f in e.key for f in frags))
        for kind, frags in OP_KINDS.items()
    }
    top = sorted(events, key=self_us, reverse=True)[:rows]
    return dict(norm=norm, steps=steps, shares={k: t / total for k, t in kinds.items()},
                conv_gflops=6 * count_macs(learn.model) * timer.images / (kinds['convolutions'] / 1e6) / 1e9,
                top_ops=[dict(op=e.key, calls=e.count, ms_per_step=self_us(e) / 1e3 / steps,
                              share=self_us(e) / total) for e in top])


def projected_study_seconds(
    variants: pd.DataFrame, seeds: int, epochs: int, n_train=50_000, n_test=10_000
) -> float:
    """The study's training time from the measured rates: per run, `epochs` epochs of training and a test pass
    each, then the final evaluation (4 test passes for interpretation and figures, 1 pass over the training
    images)."""
    per_run = epochs * (n_train / variants.train_ips + n_test / variants.infer_ips) \
        + (4 * n_test + n_train) / variants.infer_ips
    return float(seeds * per_run.sum())


def measure(cifar, device, steps, warmup, rounds, saved: dict | None = None,
            save=lambda result: None) -> dict:
    """Every measurement of the benchmark, in one run; each table handed to `save` as soon as it is measured,
    and the tables of `saved` (an earlier run's, cut short) kept instead of measured again."""
    dls_of = recipe_loaders(cifar, device)
    r = recipe('batch', device=str(device))
    dls, precision = dls_of('batch'), r.precision   # the profile: batch norm's recipe
    print(
        f"device: {device_name(device)}; torch {torch.__version__}; normnets trains in {precision}",
        flush=True,
    )
    result = dict(device_name=device_name(device), device=device.type, torch=torch.__version__,
                  python=platform.python_version(), threads=torch.get_num_threads(), precision=precision,
                  bs=dls.train.bs, steps=steps, warmup=warmup, rounds=rounds)
    if saved and all(saved.get(k) == v for k, v in result.items()):
        result = saved
        print(f"kept from before: {', '.join(k for k in MEASURED if k in saved)}", flush=True)

    def table(key, measured):
        if key not in result:
            result[key] = measured()
            result.setdefault('dates', {})[key] = time.strftime('%Y-%m-%d')   # a resumed run's are several
            save(result)
        return result[key]

    # glibc's default allocator first, as a fresh training process meets it: glibc adapts its thresholds to
    # the blocks a process has freed, which would hide what keep_freed_memory() saves. It cannot be undone in
    # a process, so everything after it runs with it.
    measure_allocator = 'changes' not in result and device.type == 'cpu'
    default_ips = learner_throughput(dls, 'batch', steps, warmup)[0] if measure_allocator else None
    keep_freed_memory()
    allocator = (default_ips, learner_throughput(dls, 'batch', steps, warmup)[0]) if default_ips else None

    def peaks():
        found = {'fp32': matmul_gflops(device)}
        if precision != 'fp32':
            found[precision] = matmul_gflops(device, torch.bfloat16 if precision == 'bf16' else torch.float16)
        print('matmul: ' + ', '.join(f"{p} {g:.0f} GFLOP/s" for p, g in found.items()), flush=True)
        return found

    def usual():
        net = usual_net()
        ips = time_plain_loop(net, usual_loader(cifar), device, steps, warmup)
        print(f"usual pipeline: {ips:.0f} images/s", flush=True)
        return dict(params=count_params(net), macs=count_macs(net), precision='fp32', bs=128, train_ips=ips)

    def reference():
        ref_dls = dls_of(REFERENCE_NORM, bs=REFERENCE_BS, **REFERENCE_RECIPE)
        ips, ref = learner_throughput(ref_dls, REFERENCE_NORM, steps, warmup, **REFERENCE_RECIPE)
        print(f"reference: {ips:.0f} training images/s", flush=True)
        return dict(norm=REFERENCE_NORM, bs=REFERENCE_BS, params=count_params(ref.model),
                    macs=count_macs(ref.model), precision=ref.recipe.precision, train_ips=ips)

    table('matmul_gflops', peaks)
    table('usual', usual)
    table('reference', reference)
    variants = table('variants', lambda: measure_variants(dls_of, steps, warmup))
    at_once = table('at_once', lambda: measure_at_once(cifar, device, dls_of, steps, warmup, rounds))
    table('changes', lambda: measure_changes(dls_of, cifar, steps, warmup, rounds, precision, allocator))
    # On a GPU the profiler would see a few eager steps, a capture and replays it names by kernel alone: the
    # captured step is measured by its images/s instead.
    table('profile', lambda: measure_profile(dls) if device.type == 'cpu' else None)
    # On a CPU: the grids train in float32 on any machine (--precision fp32), the study in its own precision.
    table('at_once_small', lambda: measure_small_batches_at_once(cifar, device, dls_of, steps, warmup, rounds)
          if device.type == 'cpu' else None)
    table('compiled', lambda: measure_compiled(dls_of, steps, 3 * rounds, sorted({precision, 'fp32'}))
          if device.type == 'cpu' else None)
    fused = pd.DataFrame([a for a in at_once if a['how'] == 'fused' and a['runs'] == STUDY_SEEDS])
    by_seeds = pd.DataFrame(variants).set_index('norm').assign(train_ips=fused.set_index('norm').train_ips)
    result['study'] = dict(
        seeds=STUDY_SEEDS,
        epochs=r.epochs,
        seconds=projected_study_seconds(pd.DataFrame(variants), STUDY_SEEDS, r.epochs),
        # each variant's seeds trained as one fused network; evaluation as above
        fused_seconds=projected_study_seconds(by_seeds, STUDY_SEEDS, r.epochs),
    )
    return result


# The tables `measure` saves one by one, in the order it measures them.
MEASURED = ('matmul_gflops', 'usual', 'reference', 'variants', 'at_once', 'changes', 'profile',
            'at_once_small', 'compiled')


# ---------------------------------------------------------------- write

def write_json(f: Path, data: dict):
    "Write `data` to `f` at once: to a temporary file beside it, then renamed over it."
    tmp = f.with_name(f'.{f.name}.tmp')
    tmp.write_text(json.dumps(data, indent=2) + '\n')
    os.replace(tmp, f)


@call_parse
def main(
    data:str=None,     # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    steps:int=60,      # timed training steps per measurement
    warmup:int=10,     # untimed steps first
    rounds:int=3,      # measurements of each comparison, each beside what it is compared with
    device:str=None,   # cpu or cuda (default: the GPU if there is one)
    out:str=None,      # JSON to write (default: results/speed[-bf16|-amx].json by the CPU, gpu/speed.json)
    resume:bool=False,  # keep the tables a run cut short saved (<out>.partial.json), of the same settings
):
    "Measure normnets' speed; write the measurements as JSON for scripts/report.py."
    with cli_errors():   # a bad device, an unwritable folder or bad data before any measurement; Ctrl-C
        device = torch.device(resolve_device(device))
        kind = cpu_kind()   # one file a kind of machine: a GPU, and each kind of CPU
        cpu_file = 'speed.json' if kind == 'fp32' else f'speed-{kind}.json'
        default = REPO_DIR / 'results' / ('gpu/speed.json' if device.type == 'cuda' else cpu_file)
        out = path_option('out', out, default)
        for name, value, least in (('steps', steps, 1), ('warmup', warmup, 0), ('rounds', rounds, 1)):
            if value < least: raise ValueError(f"--{name} {value}: must be at least {least}")
        check_out(out.parent)
        if out.is_dir(): raise FolderError(f"--out {out} is a folder: name the JSON file to write")
        partial = out.with_suffix('.partial.json')   # each table as it is measured: a cut run loses none
        saved = read_json(partial) if resume and partial.exists() else None
        save = lambda result: write_json(partial, result)
        result = measure(load_cifar(data), device, steps, warmup, rounds, saved, save)
        write_json(out, result)
        partial.unlink(missing_ok=True)
    print(f"wrote {out}; run python scripts/report.py to render it")
