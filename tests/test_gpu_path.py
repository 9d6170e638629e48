"""The GPU path as far as a CPU can run it: `benchmarks/gpu.sh` in stages that bring their results back whole
and fail loudly, speed.py's saved tables, and the captured step's device choice and clean-up (CUDA tests of
their own are in test_cuda.py)."""
import contextlib, os, pickle, subprocess, sys, tarfile
from types import SimpleNamespace

import pytest
import torch

import speed
from normnets_data import REPO_DIR, get_dls
from normnets_files import damaged
from normnets_learner import CapturedStep, normnet_learner

GPU_SH = ['bash', str(REPO_DIR / 'benchmarks' / 'gpu.sh')]
TRIAL = '--n-train 300 --n-test 100 --epochs 1 --seeds 1'


def gpu_sh(*stages, **env):
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"   # this Python as `python`
    return subprocess.run(GPU_SH + list(stages), cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PATH': path, **env})


def test_every_committed_gpu_run_is_whole_without_the_models_the_repository_does_not_keep():
    runs = [f.parent for f in (REPO_DIR / 'results' / 'gpu').rglob('metrics.json')]
    assert len(runs) >= 5 and [d for d in runs if damaged(d)] == []


def test_a_missing_file_the_repository_keeps_is_still_damage(tmp_path):
    "Outside the ignored paths (a git repository of the test's own), a missing model is a damaged run."
    subprocess.run(['git', 'init', '-q', str(tmp_path)], check=True)
    (tmp_path / '.gitignore').write_text('grid/*/model.pkl\n')
    for d in (tmp_path / 'grid' / 'a', tmp_path / 'study' / 'a'):
        d.mkdir(parents=True)
        (d / 'metrics.json').write_text('{"files": ["metrics.json", "model.pkl"]}')
    assert damaged(tmp_path / 'grid' / 'a') is None
    assert damaged(tmp_path / 'study' / 'a') == 'model.pkl missing'


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_gpu_sh_refuses_without_a_gpu_and_trains_nothing(tmp_path):
    r = gpu_sh('study', ROOT=str(tmp_path / 'root'), OUT=str(tmp_path / 'out'))
    assert r.returncode == 2 and 'no GPU here' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'root').exists()
    r = gpu_sh('studies', TRIAL=TRIAL)
    assert r.returncode == 2 and "unknown stage 'studies'" in r.stderr


def test_gpu_sh_trial_stage_brings_back_one_archive_and_log_that_unpack_to_what_it_wrote(tmp_path):
    root, out, clone = tmp_path / 'root', tmp_path / 'out', tmp_path / 'clone'
    r = gpu_sh('study', ROOT=str(root), OUT=str(out), NORMS='bn', TRIAL=TRIAL, BUDGET='500')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ['study.log', 'study.tgz']
    assert 'a trial on the CPU' in r.stdout and 'run_all.py' in (out / 'study.log').read_text()
    with tarfile.open(out / 'study.tgz') as tar: tar.extractall(clone)
    written = sorted(p.relative_to(root) for p in root.rglob('*') if p.is_file())
    assert written and sorted(p.relative_to(clone / 'results') for p in (clone / 'results').rglob('*')
                              if p.is_file()) == written
    assert all((clone / 'results' / f).read_bytes() == (root / f).read_bytes() for f in written)
    # a failed step fails the call, after packing what the stage has
    r = gpu_sh('study', ROOT=str(root), OUT=str(tmp_path / 'out2'), NORMS='bn', TRIAL='--epochs 99')
    assert r.returncode == 1 and 'stage study failed' in r.stdout
    assert (tmp_path / 'out2' / 'study.tgz').exists()


def test_speed_continues_from_the_tables_a_cut_run_saved(monkeypatch, tmp_path):
    "Each table saved as it is measured; a rerun measures only the tables it lacks."
    def never(*args, **kw): raise AssertionError('measured again')
    for name in ('matmul_gflops', 'time_plain_loop', 'learner_throughput', 'measure_variants',
                 'measure_at_once', 'measure_changes', 'measure_small_batches_at_once'):
        monkeypatch.setattr(speed, name, never)
    monkeypatch.setattr(speed, 'measure_profile', lambda dls: {'steps': 10})
    monkeypatch.setattr(speed, 'measure_compiled', lambda *a: [{'norm': 'batch'}])
    monkeypatch.setattr(speed, 'keep_freed_memory', lambda: None)
    cifar = SimpleNamespace()
    monkeypatch.setattr(speed, 'recipe_loaders', lambda cifar, device: lambda norm, **kw: SimpleNamespace(
        train=SimpleNamespace(bs=256)))
    device = torch.device('cpu')
    r = speed.recipe('batch', device='cpu')
    saved = dict(device_name=speed.device_name(device), device='cpu', torch=torch.__version__,
                 python=speed.platform.python_version(), threads=torch.get_num_threads(),
                 precision=r.precision, bs=256, steps=5, warmup=1, rounds=1, matmul_gflops={'fp32': 1.0},
                 usual={}, reference={}, changes=[],
                 variants=[{'norm': 'batch', 'train_ips': 100.0, 'infer_ips': 1000.0}],
                 at_once=[{'how': 'fused', 'runs': 3, 'norm': 'batch', 'train_ips': 150.0}], at_once_small=[])
    saves = []
    result = speed.measure(cifar, device, 5, 1, 1, dict(saved), lambda res: saves.append(dict(res)))
    assert result['profile'] == {'steps': 10} and result['compiled'] == [{'norm': 'batch'}]
    assert len(saves) == 2   # a save a table measured
    assert saves[0]['variants'] == saved['variants'] and set(saves[-1]['dates']) == {'profile', 'compiled'}
    # a different setting starts anew: the first table is measured again
    with pytest.raises(AssertionError, match='measured again'):
        speed.measure(cifar, device, 6, 1, 1, dict(saved), saves.append)


def test_sync_waits_on_this_threads_stream_of_the_runs_own_device(monkeypatch):
    asked = []
    stream = SimpleNamespace(synchronize=lambda: asked.append('stream'))
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: asked.append(device) or stream)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *a: asked.append('device-wide'))
    speed.sync(torch.device('cuda:1'))
    assert asked == [torch.device('cuda:1'), 'stream']


def test_the_captured_step_keeps_nothing_after_a_fit_and_steps_eagerly_without_a_gpu():
    """After a fit the callback holds no optimizer state (an exported learner carries no Adam moments) and the
    Recorder's losses are numbers; a step made for a GPU steps eagerly on a CPU."""
    learn = normnet_learner(get_dls(n_train=256, n_test=128, bs=64, device='cpu'), 'gn', precision='fp32')
    step = CapturedStep()   # graph=True, as a GPU learner has it, here on a CPU
    learn.add_cb(step)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1)
    assert step.capture is False and step.state is None and step.params is None
    own = pickle.dumps({k: v for k, v in vars(step).items() if k != 'learn'})   # the learner aside
    assert b'sqr_avg' not in own and len(own) < 2000
    assert all(isinstance(x, float) for x in learn.recorder.losses)   # fastai's plot_loss can plot them


def test_the_captured_steps_warm_up_waits_on_the_stream_of_its_runs_device(monkeypatch):
    "The streams a warm-up step waits on are its run's device's (cuda:1's for a run there), not device 0's."
    asked = []
    stream = SimpleNamespace(wait_stream=lambda s: None)
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: asked.append(device) or stream)
    monkeypatch.setattr(torch.cuda, 'stream', lambda s: contextlib.nullcontext())
    class WarmingUp(CapturedStep):   # every step a warm-up step, as on a GPU, without one
        def before_fit(self):
            super().before_fit()
            self.capture, self.side = True, stream
    learn = normnet_learner(get_dls(n_train=256, n_test=128, bs=64, device='cpu'), 'gn', precision='fp32')
    learn.add_cb(WarmingUp(warmup=10**6))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1)
    assert len(asked) == 4 and set(asked) == {learn.dls.device}
