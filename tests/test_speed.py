"""The speed benchmark's parts, without timing anything: the usual pipeline is the network the issue
describes, the alternatives it measures compute what normnets computes, its timer counts the images it trained
on, and its measurements render as a page."""
import platform
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

import speed
from normnets import count_macs, count_params, normnet
from normnets_data import Cifar, get_dls, load_cifar
from normnets_device import keep_freed_memory
from normnets_recipes import RECIPES, TRAINING_FIELDS, recipe
from normnets_pages import speed_page


def test_usual_net_is_the_published_49672_parameter_solution():
    net = speed.usual_net()
    assert count_params(net) == 49_672
    convs = [
        (m.in_channels, m.out_channels, m.kernel_size[0]) for m in net.modules() if isinstance(m, nn.Conv2d)
    ]
    assert convs == [(3, 32, 3), (32, 54, 3), (54, 10, 1), (10, 16, 3), (16, 16, 3), (16, 32, 3), (32, 16, 1),
                     (16, 32, 3), (32, 32, 3), (32, 32, 3), (32, 10, 1)]
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert count_macs(net) > 20e6   # over twice normnets' 8.9 M: its 32x32 layers are wide


def test_reference_is_the_network_and_recipe_before_the_search():
    ref = recipe(speed.REFERENCE_NORM, **speed.REFERENCE_RECIPE)
    assert (count_params(ref.model()), count_macs(ref.model())) == (46_374, 8_884_544)


@pytest.fixture(scope='module')
def small_dls(): return get_dls(n_train=512, n_test=128, bs=64, device='cpu')


@pytest.mark.parametrize('norm, tweak', [('batch', speed.nchw_batch_norm), ('group', speed.bf16_group_norm)])
def test_alternatives_compute_the_same_function(small_dls, norm, tweak):
    "The layout and dtype alternatives change how a layer computes, never what: same outputs in float32."
    learn = speed.recipe_learner(small_dls, norm, precision='fp32')
    other = speed.recipe_learner(small_dls, norm, precision='fp32')
    other.model.load_state_dict(learn.model.state_dict())
    tweak(other)
    kinds = lambda learn: {type(m) for m in learn.model.modules()}
    assert kinds(other) != kinds(learn)   # the tweak did replace the norm layers
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(): expected, got = learn.model.train()(x), other.model.train()(x)   # batch statistics
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_step_timer_times_the_steps_after_warm_up_then_stops_the_fit(small_dls):
    learn = speed.recipe_learner(small_dls, 'layer', precision='fp32')
    timer = speed.StepTimer(warmup=2, steps=3)
    with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(1, cbs=timer)   # an epoch has 8 batches
    assert timer.count == 5 and timer.images == 3 * 64 and timer.seconds > 0


@pytest.fixture(scope='module')
def small_cifar():
    c = load_cifar()
    sizes = dict(x_train=1024, y_train=1024, x_test=256, y_test=256)
    return Cifar({k: getattr(c, k)[:n] for k, n in sizes.items()}, c.source, c.fingerprint)


def test_runs_at_once_train_side_by_side_and_count_every_image(small_cifar, monkeypatch):
    """Runs at once, as threads or as processes, each train their own recipe's steps, and their timed steps
    start together (the barrier): each one's window overlaps every other's."""
    timed = []
    monkeypatch.setattr(speed, 'summed_throughput', lambda t: timed.append(t) or 1.0)
    cpu = torch.device('cpu')
    speed.threads_throughput(small_cifar, cpu, 'batch', 2, steps=3, warmup=1)
    with speed.timing_processes(small_cifar, 2) as pool:
        speed.processes_throughput(pool, cpu, 'group', 2, steps=3, warmup=1)
    for t, norm in zip(timed, ('batch', 'group')):
        images, starts, ends = zip(*t)
        assert images == (3 * recipe(norm).bs,) * 2 and max(starts) < min(ends)


def test_a_failed_run_at_once_stops_the_others_waiting_for_it(small_cifar, monkeypatch):
    def recipe_failing_at_seed_1(norm, seed, **kw):
        if seed == 1: raise ValueError('seed 1 fails')
        return recipe(norm, seed=seed, **kw)
    monkeypatch.setattr(speed, 'recipe', recipe_failing_at_seed_1)
    with pytest.raises(ValueError, match='seed 1 fails'):
        speed.threads_throughput(small_cifar, torch.device('cpu'), 'batch', 2, steps=3, warmup=1)


def test_runs_at_once_are_all_their_images_over_the_span_of_all_their_steps():
    assert speed.summed_throughput([(100, 0.0, 2.0), (300, 1.0, 4.0)]) == 100.0


def test_each_comparison_is_measured_in_rounds_right_after_its_baseline():
    calls = []
    def timed(name, ips):
        def measure(): calls.append(name); return ips.pop(0)
        return measure
    change, as_run = timed('change', [90., 120., 100.]), timed('as run', [100., 100., 80.])
    median, base, ratios = speed.paired(change, as_run, rounds=3)
    assert calls == ['as run', 'change'] * 3
    assert (median, base) == (100., 100.) and ratios == pytest.approx([0.9, 1.2, 1.25])


def test_projected_study_time_adds_training_and_evaluation():
    v = pd.DataFrame({'train_ips': [1000.0, 500.0], 'infer_ips': [10_000.0, 10_000.0]})
    # per run: 2 epochs x (50 s or 100 s of training + 1 s of testing), then 9 s of final evaluation
    # (4 test passes and one over the training images)
    assert speed.projected_study_seconds(v, seeds=3, epochs=2) == pytest.approx(
        3 * ((2 * 51 + 9) + (2 * 101 + 9))
    )


def test_speed_page_renders_every_measurement(tmp_path):
    import json

    s = dict(
        device_name='a CPU',
        device='cpu',
        torch='2',
        python='3',
        threads=2,
        precision='fp32',
        bs=256,
        steps=5,
        warmup=1,
        rounds=3,
        matmul_gflops={'fp32': 100.0},
        variants=[
            dict(norm='batch', **{k: getattr(recipe('batch'), k) for k in TRAINING_FIELDS}, params=46374,
                 macs=8.88e6, precision='fp32', train_ips=2000.0, infer_ips=9000.0)
        ],
        reference=dict(
            norm='batch', params=46374, macs=8.88e6, precision='fp32', train_ips=2500.0
        ),
        usual=dict(params=49672, macs=21.1e6, precision='fp32', bs=128, train_ips=500.0),
        changes=[
            dict(norm='batch', change='without channels-last', train_ips=1000.0, as_run_ips=1900.0,
                 ratios=[0.5, 0.6, 0.45], error=None),
            dict(norm='batch', change='torch.compile', train_ips=None, as_run_ips=None, ratios=[],
                 error='no compiler'),
            dict(norm='batch', change="glibc's allocator", train_ips=900.0, as_run_ips=1000.0, ratios=[0.9],
                 error=None),
        ],
        profile=dict(
            norm='batch',
            steps=5,
            shares={'convolutions': 0.5},
            conv_gflops=50.0,
            top_ops=[dict(op='aten::conv', calls=10, ms_per_step=3.0, share=0.5)],
        ),
        at_once=[dict(norm='batch', how='fused', runs=3, bs=256, train_ips=1500.0, alone_ips=2000.0,
                      ratios=[0.7, 0.75, 0.8]),
                 dict(norm='group', how='streams', runs=4, bs=128, train_ips=8000.0, alone_ips=4000.0,
                      ratios=[2.0, 1.9, 2.1])],
        at_once_small=[dict(norm='batch', how='processes', runs=2, bs=8, precision='bf16', train_ips=1200.0,
                            alone_ips=600.0, ratios=[2.0, 1.8, 2.2])],
        compiled=[dict(norm='layer', bs=8, precision='fp32', steps=160, compiled_ips=730.0, eager_ips=640.0,
                       ratios=[1.2, 1.0, 1.1], compile_s=21.4, error=None),
                  dict(norm='group', bs=32, precision='fp32', steps=40, compiled_ips=640.0, eager_ips=640.0,
                       ratios=[1.0, 1.0, 1.0], compile_s=0.2, error='the compile failed')],
        dates={'compiled': '2026-12-07'},
        study=dict(seeds=3, epochs=20, seconds=600.0, fused_seconds=900.0),
    )
    (tmp_path / 'speed.json').write_text(json.dumps(s))
    page = speed_page(tmp_path / 'speed.json')
    table = [[c.strip() for c in line.strip('|').split('|')] for line in page.splitlines()
             if line.startswith('| ')]
    assert ['normnets, batch norm', '46,374', '8.88 M', 'fp32', '256', '2000', '9000', '4.00', '0.80',
            '106.6', '107%', 'yes'] in table   # the variant measured is today's recipe
    assert ['reference, batch norm', '46,374', '8.88 M', 'fp32', '256', '2500', '', '5.00', '1.00'] in [
        r[:9] for r in table]
    assert ['usual pipeline (49,672-parameter solution)', '49,672', '21.10 M', 'fp32', '128', '500'] in [
        r[:6] for r in table]
    assert ['batch norm', 'without channels-last', '1000', '1900', '0.50', '0.50, 0.60, 0.45'] in table
    assert ['batch norm', 'fp32', '3', 'one fused network', '256', '1500', '2000', '0.75',
            '0.70, 0.75, 0.80'] in table   # in the benchmark's precision
    assert ['group norm', 'fp32', '4', 'a thread and CUDA stream each', '128', '8000', '4000', '2.00',
            '2.00, 1.90, 2.10'] in table
    assert ['batch norm', 'bf16', '2', 'a process each', '8', '1200', '600', '2.00',
            '2.00, 1.80, 2.20'] in table
    # the compiled step against the eager one: the median of the rounds, their range, the compile's time
    assert ['layer norm', 'fp32', '8', '730', '640', '1.10', '1.00 to 1.20', '21'] in table
    assert ['group norm', 'fp32', '32', '640', '640', 'failed: the compile failed', '1.00 to 1.00',
            '0'] in table
    assert 'measured on 2026-12-07' in page
    assert page.count('measured 3 times') == 2 and page.count('(a row with one ratio was measured once)') == 1
    assert ['batch norm', "glibc's allocator", '900', '1000', '0.90', '0.90'] in table
    assert 'failed: no compiler' in page and 'floor' not in page
    assert '**10.0 minutes**' in page and '**15.0 minutes**' in page and '`aten::conv`' in page


def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory() == (platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc')


def test_each_variant_is_timed_on_its_recipes_loaders(monkeypatch):
    "A recipe's smaller batch is more steps per epoch: its speed is timed at it, and with its crops."
    monkeypatch.setitem(RECIPES, 'group', dict(RECIPES['group'], bs=128, crop_pad=3))
    monkeypatch.setattr(speed, 'get_dls', lambda **kw: SimpleNamespace(**kw))
    dls_of = speed.recipe_loaders('the images', 'cpu')
    group = dls_of('group')
    assert (group.bs, group.crop_pad, group.cifar) == (128, 3, 'the images')
    assert dls_of('group') is group and dls_of('batch', bs=512).bs == 512   # each built once
    timed = {}
    def fake_throughput(dls, norm, steps, warmup):
        timed[norm] = dls
        return 100.0, SimpleNamespace(model=normnet(norm), recipe=recipe(norm))
    monkeypatch.setattr(speed, 'learner_throughput', fake_throughput)
    monkeypatch.setattr(speed, 'inference_throughput', lambda learn: 1000.0)
    rows = speed.measure_variants(lambda norm: f'loaders of {norm}', steps=1, warmup=0)
    assert timed['group'] == 'loaders of group' and {r['norm']: r['bs'] for r in rows}['group'] == 128
