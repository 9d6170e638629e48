"""Training: the rules are enforced before any work, a quick real training learns, and the exported learner
works on its own in a fresh fastai session. Uses the real CIFAR-10 (NORMNETS_DATA, see the README)."""
import json, subprocess, sys, textwrap

import pandas as pd
import pytest
import torch
from torch import nn
from PIL import Image
from fastai.learner import load_learner

from normnets_data import REPO_DIR, get_dls, load_cifar

sys.path.insert(0, str(REPO_DIR / 'scripts'))
from fastai.callback.fp16 import MixedPrecision
import train
from train import RuleError, check_rules, make_learner, resolve_precision, train_variant
from normnets import FloatGroupNorm, normnet

TRAIN = [sys.executable, str(REPO_DIR / 'scripts' / 'train.py')]


def run(args, **kw): return subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)


def test_cli_refuses_21_epochs_before_any_work(tmp_path):
    r = run(TRAIN + ['--norm', 'bn', '--epochs', '21', '--out', str(tmp_path / 'out'), '--data', str(tmp_path / 'none')])
    assert r.returncode != 0
    assert 'error: --epochs 21: the rules allow 1 to 20 epochs' in r.stderr
    assert not (tmp_path / 'out').exists()


def test_cli_bad_norm_and_bad_data(tmp_path):
    r = run(TRAIN + ['--norm', 'instance', '--epochs', '1', '--out', str(tmp_path / 'out')])
    assert r.returncode != 0 and "unknown norm 'instance'" in r.stderr
    r = run(TRAIN + ['--norm', 'ln', '--epochs', '1', '--data', str(tmp_path / 'missing.tgz'), '--out', str(tmp_path / 'out')])
    assert r.returncode != 0 and 'CIFAR-10 data not found at' in r.stderr and 'missing.tgz' in r.stderr
    r = run(TRAIN + ['--norm', 'ln', '--epochs', '1', '--precision', 'fp8', '--out', str(tmp_path / 'out')])
    assert r.returncode != 0 and "unknown precision 'fp8'" in r.stderr
    assert not (tmp_path / 'out').exists()


def test_models_of_50000_parameters_or_more_are_refused(tmp_path):
    check_rules(normnet('gn'), 20)
    with pytest.raises(RuleError, match='fewer than 50,000'): check_rules(normnet('gn', c7=48), 5)
    with pytest.raises(RuleError, match='fewer than 50,000'):
        train_variant('gn', 1, net=dict(c7=48), out=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('norm,exempt_gn_scale', [('bn', False), ('gn', False), ('ln', False), ('gn', True)])
def test_weight_decay_acts_on_the_expected_parameters(norm, exempt_gn_scale):
    learn = make_learner(get_dls(n_train=256, n_test=256, bs=128, device='cpu'), norm, exempt_gn_scale=exempt_gn_scale)
    if learn.opt is None: learn.create_opt()
    learn.opt.set_hypers(lr=0.1, wd=1.0)
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    for p in learn.model.parameters(): p.grad = torch.zeros_like(p)   # Adam moves nothing: only decay acts
    learn.opt.step()
    for name, p in learn.model.named_parameters():
        module = learn.model.get_submodule(name.rsplit('.', 1)[0])
        # fastai decays weights but not biases nor BatchNorm's parameters; GroupNorm's scale unless exempted.
        decayed = name.endswith('.weight') and (isinstance(module, nn.Conv2d) or
                                                isinstance(module, nn.GroupNorm) and not exempt_gn_scale)
        assert torch.allclose(p, before[name] * (0.9 if decayed else 1.0)), name


@pytest.mark.parametrize('flags, auto', [('fpu avx2 avx512f avx512_bf16', 'bf16'), ('fpu amx_bf16 amx_tile', 'bf16'),
                                         ('fpu avx2 avx512f avx512bw', 'fp32'), ('', 'fp32')])
def test_precision_auto_takes_bf16_only_where_the_cpu_has_it(monkeypatch, flags, auto):
    "AVX-512 alone is not enough (oneDNN would emulate bfloat16); no readable flags means float32."
    monkeypatch.setattr(train, 'cpuinfo', lambda field: flags if field == 'flags' else '')
    assert resolve_precision('auto', 'cpu') == auto
    assert resolve_precision('fp32', 'cpu') == 'fp32'
    with pytest.raises(ValueError, match="unknown precision 'half'"): resolve_precision('half', 'cpu')


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_training_runs_in_the_precision_asked_for(precision):
    "Dtypes seen inside a real fastai training step: bf16 convolutions and group norm in and out, float32 weights."
    learn = make_learner(get_dls(n_train=256, n_test=128, bs=128, device='cpu'), 'gn', precision=precision)
    assert any(isinstance(cb, MixedPrecision) for cb in learn.cbs) == (precision == 'bf16')
    seen = {}
    for m in learn.model.modules():
        if isinstance(m, (nn.Conv2d, FloatGroupNorm)):
            m.register_forward_hook(lambda m, i, o: seen.setdefault(type(m).__name__, set()).add((i[0].dtype, o.dtype)))
    with learn.no_logging(), learn.no_bar(): learn.fit(1)
    half = torch.bfloat16 if precision == 'bf16' else torch.float32
    assert {o for _, o in seen['Conv2d']} == {half}                 # every convolution's output
    assert seen['FloatGroupNorm'] == {(half, half)}                  # computed in float32 inside, see test_model
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    "Batch norm, one epoch on 10,000 real training images, scored on 2,000 test images."
    out = tmp_path_factory.mktemp('quick') / 'bn'
    metrics = train_variant('bn', epochs=1, bs=128, seed=0, out=out, n_train=10_000, n_test=2_000)
    return out, metrics


def test_quick_accuracy_check(quick_run):
    out, m = quick_run
    # Measured on the offline JPEG copy (2 CPU threads): 0.352, 0.380 and 0.414 test accuracy with seeds 0, 1, 2.
    # 0.25 leaves a 0.10 margin under the worst of them and is still 2.5 times chance (0.10).
    assert m['test_acc'] > 0.25
    assert m['n_train'] == 10_000 and m['n_test'] == 2_000 and m['epochs'] == 1


def test_run_writes_its_files(quick_run):
    out, m = quick_run
    hist = pd.read_csv(out / 'history.csv')
    assert list(hist.columns) == ['epoch', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'seconds']
    assert len(hist) == 1 and hist.test_acc.iloc[0] == pytest.approx(m['test_acc'])
    saved = json.loads((out / 'metrics.json').read_text())
    for key in ['train_acc', 'test_acc', 'params', 'epochs', 'seed', 'seconds', 'wall_seconds', 'precision', 'torch',
                'fastai', 'device', 'data', 'data_source', 'data_md5']:
        assert saved[key] is not None, key
    assert saved['data_md5'] == load_cifar().fingerprint
    assert not [p for p in out.parent.iterdir() if p.name.startswith('.')]    # no temporary folder left


def test_exported_learner_works_in_a_fresh_session(quick_run, tmp_path):
    out, _ = quick_run
    c = load_cifar()
    files = []
    for i in range(4):
        files.append(tmp_path / f'test{i}.png'); Image.fromarray(c.x_test[i]).save(files[-1])
    code = textwrap.dedent(f"""
        from fastai.vision.all import *
        learn = load_learner({str(out / 'model.pkl')!r})
        files = {[str(f) for f in files]!r}
        label, idx, probs = learn.predict(files[0])
        preds, _ = learn.get_preds(dl=learn.dls.test_dl(files))
        assert preds.shape == (4, 10), preds.shape
        assert torch.allclose(preds[0], probs, atol=1e-5)
        assert label == learn.dls.vocab[preds[0].argmax()]
        print(json.dumps(preds.argmax(1).tolist()))
    """)
    r = run([sys.executable, '-c', code], cwd=tmp_path)   # a fresh interpreter, outside the repo
    assert r.returncode == 0, r.stderr[-2000:]
    fresh = json.loads(r.stdout.strip().splitlines()[-1])
    # The same predictions as the model in this session on the decoded test images.
    learn = load_learner(out / 'model.pkl')
    assert not any(isinstance(cb, MixedPrecision) for cb in learn.cbs)   # exported for float32 inference anywhere
    dls = get_dls(cifar=c, device='cpu')
    x, _ = next(iter(dls.valid))
    learn.model.eval()
    with torch.no_grad(): here = learn.model(x[:4]).argmax(1).tolist()
    assert fresh == here
