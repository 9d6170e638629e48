"""Runs trained as one fused network: each copy is its separate run (its data, initial weights, learning rate
and weight decay), and is written out as the run folder a separate run writes."""
import dataclasses, json, math

import pandas as pd
import pytest
import torch
from fastai.learner import Learner

import normnets_fused
from normnets import NORMS, fuse, normnet, unfuse
from normnets_data import load_cifar
from normnets_files import RUN_FILES, damaged
from fastcore.script import CliError
from normnets_fused import FUSED_OPTIMIZERS, check_fusable, fused_learner, train_fused
from normnets_device import RuleError, device_name
from normnets_recipes import OPTIMIZERS, recipe
from normnets_learner import FirstStepsEstimate, normnet_learner
from normnets_runs import recipe_dls, seed_run
from normnets_study import kept_run, summarize
import run_all

TINY = dict(epochs=1, n_train=200, n_test=100, bs=100, precision='fp32', device='cpu')


@pytest.fixture(scope='module')
def cifar(): return load_cifar()


def flat(model) -> torch.Tensor:
    return torch.cat([v.flatten() for v in model.state_dict().values() if v.dtype.is_floating_point])


def two_runs(norm: str, scale: float = 1.) -> list:
    "Seeds 0 and 1 of `norm`, the second at half the peak lr and twice the weight decay (lr x `scale`)."
    r = recipe(norm, **TINY)
    return [dataclasses.replace(r, lr=r.lr * scale), dataclasses.replace(r, seed=1, lr=r.lr * scale / 2,
                                                                          wd=r.wd * 2)]


def fitted(learn: Learner, *args) -> Learner:
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, *args)
    return learn


@pytest.mark.parametrize('optimizer', list(OPTIMIZERS))
def test_the_fused_optimizers_step_each_copy_as_its_own(optimizer):
    "The same gradients, five steps of a schedule: each copy at its own lr and weight decay, as if alone."
    torch.manual_seed(0)
    nets = [normnet('bn'), normnet('bn')]
    fused, lrs, wds = fuse(nets), [0.4, 0.1], [1e-4, 5e-4]
    alone = [OPTIMIZERS[optimizer](list(n.parameters()), lr=lr, wd=wd) for n, lr, wd in zip(nets, lrs, wds)]
    together = FUSED_OPTIMIZERS[optimizer](list(fused.parameters()), lr=1.)
    for p in fused.parameters():
        for name, values in (('copy_lr', lrs), ('copy_wd', wds)):
            together.state[p][name] = torch.tensor(values).repeat_interleave(len(p) // 2).view(
                -1, *[1] * (p.dim() - 1))
    for schedule, mom in zip([1., .7, .5, .3, .1], [.95, .9, .85, .9, .95]):
        grads = [torch.randn_like(p) for p in fused.parameters()]
        for p, g in zip(fused.parameters(), grads): p.grad = g.clone()
        for k, net in enumerate(nets):
            for p, g in zip(net.parameters(), grads): p.grad = g.chunk(2)[k].clone()
        together.set_hypers(lr=schedule, mom=mom)
        for opt, lr in zip(alone, lrs): opt.set_hypers(lr=lr * schedule, mom=mom)
        together.step(); [opt.step() for opt in alone]
    for k, net in enumerate(nets):
        torch.testing.assert_close(flat(unfuse(fused, k)), flat(net), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('norm', list(NORMS))
def test_fused_copies_train_as_their_separate_runs(norm, cifar):
    """Two runs of a norm, fused, against each trained alone from the same seed: the same batches, crops and
    flips, initial weights, and weights and losses after training (1e-4 relative, fp32). At the recipes' own
    peak rates the kernels' rounding differences grow within a few steps (most under weight standardization):
    the rates here are a hundredth of them."""
    runs = two_runs(norm, scale=0.01)
    alone = []
    for r in runs:
        seed_run(r)
        alone.append(fitted(normnet_learner(recipe_dls(r, cifar=cifar), r)))
    learners = []
    for r in runs:
        seed_run(r)
        learners.append(normnet_learner(recipe_dls(r, cifar=cifar), r))
    together = fitted(fused_learner(learners), 1.)
    names = together.recorder.metric_names[1:-1]
    for k, learn in enumerate(alone):
        a, b = flat(unfuse(together.model, k)), flat(learn.model)
        assert ((a - b).norm() / b.norm()).item() < 1e-4
        fused_values = dict(zip(names, together.recorder.values[-1]))
        valid_loss, valid_acc = learn.recorder.values[-1][-2:]
        assert fused_values[f'valid_loss_{k}'] == pytest.approx(valid_loss, rel=1e-4)
        assert fused_values[f'valid_accuracy_{k}'] == pytest.approx(valid_acc)
        smoothed = together.copy_smooth_loss.epochs[-1][k]
        assert smoothed == pytest.approx(learn.recorder.values[-1][0], rel=1e-4)


def test_fused_runs_are_written_as_separate_runs_and_resume_keeps_them(tmp_path, cifar):
    runs = [recipe('bn', seed=s, **TINY) for s in (0, 1)]
    outs = [tmp_path / 'batch', tmp_path / 'seeds' / 'batch-seed1']
    metrics = train_fused(runs, outs, cifar=cifar)
    for r, out, m in zip(runs, outs, metrics):
        assert damaged(out) is None and sorted(m['files']) == sorted(RUN_FILES)
        assert m['fused_with'] == ['batch', 'batch-seed1'] and m['seed'] == r.seed
        assert kept_run(out, r) is not None   # --resume keeps it: the run of exactly this recipe
    summary, missing = summarize(tmp_path, TINY, [(0, 'batch'), (1, 'batch')])
    assert missing == [] and summary.seeds.tolist() == [2]


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_a_fused_learner_is_built_on_its_recipes_device_and_trains_in_its_precision(cifar, precision):
    """Model, batches and every per-copy tensor on the recipe's device from construction, not moved there at
    fit; bf16 autocast runs on any x86 CPU (slowly), so the fused path is trained in it here too."""
    runs = [dataclasses.replace(r, precision=precision) for r in two_runs('bn')]
    learners = []
    for r in runs:
        seed_run(r)
        learners.append(normnet_learner(recipe_dls(r, cifar=cifar), r))
    learn = fused_learner(learners)
    device = torch.device(runs[0].device)
    state = [t for s in learn.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert {p.device for p in learn.model.parameters()} | {t.device for t in state} == {device}
    assert learn.dls.device == device and next(iter(learn.dls.train))[0].device == device
    fitted(learn, 1.)
    losses = [v for row in learn.recorder.values for v in row]
    assert all(math.isfinite(v) for v in losses) and learn.copy_smooth_loss.epochs


def test_the_first_steps_estimate_reaches_every_fit(tmp_path, cifar, capsys):
    "The callbacks given reach the fit, fused or alone (a group of one run is trained as a run)."
    for k in (1, 2):
        estimate = FirstStepsEstimate(3, skip=1, steps=1)   # 2 steps an epoch at this size
        runs = [recipe('bn', seed=s, **TINY) for s in range(k)]
        train_fused(runs, [tmp_path / f'{k}-{s}' for s in range(k)], cifar=cifar, cell=True, cbs=[estimate])
        assert 'Estimated from the first steps' in capsys.readouterr().out, k


def test_a_run_with_a_trick_trains_alone_in_a_fused_plan(tmp_path, cifar):
    "`fusable_groups` gives a run with a trick a group of its own: it trains as a run, not refused."
    ema = recipe('bn', ema=0.99, **TINY)
    [m] = train_fused([ema], [tmp_path / 'ema'], cifar=cifar, cell=True)
    assert m['ema'] == 0.99 and 'fused_with' not in m and damaged(tmp_path / 'ema') is None


def test_runs_that_cannot_train_as_one_are_refused_before_any_work(tmp_path, cifar):
    bn = recipe('bn', **TINY)
    with pytest.raises(RuleError, match='runs whose norm, opt, net differ'):
        check_fusable([bn, recipe('gn', **TINY)])
    with pytest.raises(RuleError, match='runs whose bs differ.*bs 100 and 50'):
        check_fusable([bn, dataclasses.replace(bn, bs=50)])
    with pytest.raises(RuleError, match='net differ'):
        check_fusable([bn, dataclasses.replace(bn, net=dict(c1=16))])
    with pytest.raises(RuleError, match='mixup: not trained fused'):
        check_fusable([dataclasses.replace(bn, mixup=.2)])
    with pytest.raises(RuleError, match='no run'): check_fusable([])
    with pytest.raises(RuleError, match='2 runs to fuse, 1 folders'):
        train_fused([bn, dataclasses.replace(bn, seed=1)], [tmp_path / 'one'], cifar=cifar)
    assert not any(tmp_path.iterdir())


def test_a_fused_study_is_the_study_of_separate_runs_and_resume_keeps_it(tmp_path, capsys):
    out, tiny = tmp_path / 'results', dict(epochs=1, n_train=200, n_test=100, bs=100)
    run_all.main(norms='bn,ln', seeds=2, fuse='yes', out=str(out), **tiny)
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('Plan:'))
    r = recipe('bn', **tiny)   # device and precision as this machine resolves them
    assert device_name(r.device) in plan and r.precision in plan   # said before training
    runs = pd.read_csv(out / 'runs.csv')
    assert len(runs) == 4 and set(runs.norm) == {'batch', 'layer'}
    assert [json.loads((out / d / 'metrics.json').read_text())['fused_with'] for d in ('batch', 'layer')] == [
        ['batch', 'batch-seed1'], ['layer', 'layer-seed1']]
    assert all(damaged(d) is None for d in [out / 'batch', out / 'layer', *(out / 'seeds').iterdir()])
    study = json.loads((out / 'study.json').read_text())   # how the study ran, and its wall time
    assert (study['runs'], study['trained'], study['fused']) == (4, 4, ['batch', 'layer'])
    assert 0 < study['wall_seconds'] < 600
    run_all.main(norms='bn,ln', seeds=2, fuse='yes', out=str(out), resume=True, **tiny)
    assert json.loads((out / 'study.json').read_text()) == study   # a resume that trained nothing keeps it
    with pytest.raises(CliError, match="--fuse 'maybe'"): run_all.main(fuse='maybe', out=str(tmp_path / 'x'))
    with pytest.raises(CliError, match='--fuse and --jobs'):
        run_all.main(norms='bn', seeds=2, fuse='yes', jobs=2, out=str(tmp_path / 'y'), **tiny)


def test_left_to_normnets_only_the_variants_measured_faster_fused_train_fused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(normnets_fused, 'FUSED_FASTER', {('cpu', 'fp32', 'batch')})
    out = tmp_path / 'results'
    run_all.main(norms='bn,ln', seeds=2, out=str(out), **TINY)
    printed = capsys.readouterr().out
    assert '2 seeds as one network for batch, the other variants one run at a time' in printed
    assert 'as 1 fused network(s) of 2 runs and 2 alone' in printed
    fused_with = {d: json.loads((out / d / 'metrics.json').read_text()).get('fused_with')
                  for d in ('batch', 'layer', 'seeds/layer-seed1')}
    assert fused_with == {'batch': ['batch', 'batch-seed1'], 'layer': None, 'seeds/layer-seed1': None}
    assert json.loads((out / 'study.json').read_text())['fused'] == ['batch']
