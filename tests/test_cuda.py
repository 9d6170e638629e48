"""The CUDA path, where there is a GPU (skipped elsewhere; the CPU tests cover its logic with faked devices
and the captured step's function run eagerly): the augmentation never waits for the GPU, training waits for
it a few times an epoch rather than every batch, the captured step's graph replays the eager step, fused runs
keep every tensor on the GPU, runs in threads on streams of their own train as alone, and a run trains and
records itself on the GPU in the precision `auto` picks
there.
Uses the real CIFAR-10 (NORMNETS_DATA, see the README)."""
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from normnets_data import crop_flip, get_dls
from normnets_device import native_bf16
from normnets_recipes import recipe
from normnets_learner import normnet_learner
from normnets_runs import recipe_dls, seed_run, train_run
from normnets_fused import train_fused
from test_learner import FromReference, StepStates   # the CPU test's teacher forcing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')


class SyncCount:
    "Counts the host-device synchronizations inside the block (PyTorch's sync debug mode, as warnings)."
    def __enter__(self):
        torch.cuda.synchronize()
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode('default')
        self.caught.__exit__(*exc)
        messages = [str(w.message) for w in self.records]
        self.n = sum('synchroniz' in m and 'prototype' not in m for m in messages)   # not the mode's notice


def test_crop_flip_on_the_gpu_waits_for_nothing_and_equals_the_cpus():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy, dx = torch.randint(0, 9, (2, 256), generator=g)
    flip = torch.rand(256, generator=g) < 0.5
    on_gpu = [t.cuda() for t in (x, dy, dx, flip)]
    with SyncCount() as syncs: y = crop_flip(*on_gpu, 4)
    assert syncs.n == 0, [str(w.message) for w in syncs.records]
    assert torch.equal(y.cpu(), crop_flip(x, dy, dx, flip, 4))


@pytest.mark.parametrize('precision', ['bf16', 'fp16', 'fp32'])
def test_training_waits_for_the_gpu_per_epoch_not_per_batch(precision):
    """Batches, augmentation, metrics and the optimizer step stay on the GPU: the host waits a few times an
    epoch (reading the epoch's metrics), not at each of its 64 batches. float16's loss scaling (PyTorch's
    GradScaler) reads its overflow check twice a step, waits of its own."""
    dls = get_dls(n_train=16384, n_test=512, bs=256, device='cuda')
    learn = normnet_learner(dls, recipe('bn', bs=256, device='cuda', precision=precision))
    assert hasattr(learn, 'captured_step') == (precision != 'fp16')   # fp16 keeps fastai's loop
    epochs = 2
    with learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(1)   # warm-up: the first batches allocate and pick kernels
        with SyncCount() as syncs: learn.fit_one_cycle(epochs)
    steps = epochs * len(dls.train)
    loss_scaling = 2 * steps if precision == 'fp16' else 0
    assert syncs.n - loss_scaling <= 10 * epochs, f"{syncs.n} waits in {epochs} epochs, {steps} steps"


def test_a_run_trains_on_the_gpu_and_says_so(tmp_path):
    m = train_run(recipe('gn', epochs=3, bs=256, n_train=16384, n_test=1024, device='cuda'), tmp_path / 'gn')
    assert m['device'].startswith('cuda') and torch.cuda.get_device_name() == m['device_name']
    assert m['precision'] == ('bf16' if native_bf16('cuda') else 'fp16')
    assert m['training_step'] == ('captured CUDA graph' if m['precision'] != 'fp16' else "fastai's loop")
    assert m['test_acc'] > 0.25 and m['train_acc'] > 0.25   # it learns (chance: 0.1)
    assert (tmp_path / 'gn' / 'model.pkl').exists() and (tmp_path / 'gn' / 'misclassified.png').exists()


@pytest.mark.parametrize('norm', ['bn', 'gn'])
def test_fused_runs_train_on_the_gpu_with_every_tensor_there(tmp_path, norm):
    """Two runs fused on the GPU: the model, the loaders' batches and every per-copy tensor of the optimizer
    on the recipe's device from construction (the first fused step on an H200 failed on a CPU tensor)."""
    runs = [recipe(norm, seed=s, epochs=1, n_train=4096, n_test=512, device='cuda') for s in (0, 1)]
    metrics = train_fused(runs, [tmp_path / 'a', tmp_path / 'b'])
    assert [m['device'] for m in metrics] == ['cuda', 'cuda'] and all(m['test_acc'] > 0.1 for m in metrics)


@pytest.mark.parametrize('norm', ['bn', 'gn', 'ws-ln'])
def test_the_captured_graph_replays_the_step_run_eagerly(norm):
    """Each training step replayed from the CUDA graph ends where the same step run eagerly ends, from the
    same state (teacher-forced, as the CPU test compares the eager step with fastai's loop): 24 steps at the
    recipe's own rates, warm-up and capture among them."""
    r = recipe(norm, device='cuda', n_train=24 * recipe(norm).bs, n_test=256, epochs=1)
    learners = []
    for graph in (False, True):
        seed_run(r)
        learners.append(normnet_learner(recipe_dls(r), r))
        learners[-1].captured_step.graph = graph
    states = StepStates()
    with learners[0].no_bar(), learners[0].no_logging(): learners[0].fit_one_cycle(1, cbs=states)
    forced = FromReference(states.states)
    with learners[1].no_bar(), learners[1].no_logging(): learners[1].fit_one_cycle(1, cbs=forced)
    assert len(forced.gaps) == 24 and max(forced.gaps) < 1e-5, forced.gaps
    assert learners[1].recorder.values[0][1] == pytest.approx(learners[0].recorder.values[0][1], abs=0.02)


def test_runs_in_threads_on_streams_of_their_own_train_as_they_would_alone():
    """Two runs at once in one process, each in a thread on a CUDA stream of its own (speed.py's "runs at
    once"): each warms up, captures and replays its own step, and ends where it ends trained alone."""
    recipes = [recipe(n, device='cuda', n_train=16 * 256, n_test=256, epochs=1, bs=256) for n in ('bn', 'gn')]
    def learner(r):
        seed_run(r)
        return normnet_learner(recipe_dls(r), r)
    def fit(learn):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1)
        stream.synchronize()   # this run's stream alone: the other thread may be capturing its step
        return torch.cat([p.detach().float().flatten() for p in learn.model.parameters()])
    alone = [fit(learner(r)) for r in recipes]
    learners = [learner(r) for r in recipes]
    with ThreadPoolExecutor(2) as pool: together = list(pool.map(fit, learners))
    assert all(hasattr(learn, 'captured_step') for learn in learners)
    for a, t in zip(alone, together): torch.testing.assert_close(t, a, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs a second GPU')
def test_a_run_on_a_second_gpu_captures_and_waits_on_its_own_device():
    r = recipe('gn', device='cuda:1', n_train=8 * 128, n_test=128, epochs=1)
    seed_run(r)
    learn = normnet_learner(recipe_dls(r), r)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1)
    assert next(learn.model.parameters()).device == torch.device('cuda:1')
    assert learn.recorder.values[0][1] > 0
