"""The speed benchmark's parts, without timing anything: the usual pipeline is the network the issue describes, the
alternatives it measures compute what normnets computes, and its timer counts the images it trained on."""
import platform, sys

import pytest
import torch
from torch import nn

from normnets import count_macs, count_params
from normnets_data import REPO_DIR, get_dls

sys.path.insert(0, str(REPO_DIR / 'benchmarks'))
import speed
from train import keep_freed_memory, make_learner


def test_usual_net_is_the_published_49672_parameter_solution():
    net = speed.usual_net()
    assert count_params(net) == 49_672
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(3, 32, 3), (32, 54, 3), (54, 10, 1), (10, 16, 3), (16, 16, 3), (16, 32, 3), (32, 16, 1),
                     (16, 32, 3), (32, 32, 3), (32, 32, 3), (32, 10, 1)]
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert count_macs(net) > 20e6   # over twice normnets' 8.9 M: its 32x32 layers are wide


@pytest.mark.parametrize('norm, tweak', [('batch', speed.nchw_batch_norm), ('group', speed.bf16_group_norm)])
def test_alternatives_compute_the_same_function(norm, tweak):
    "The layout and dtype alternatives change how a layer computes, never what: same outputs in float32."
    dls = get_dls(n_train=256, n_test=128, bs=64, device='cpu')
    learn, other = make_learner(dls, norm, precision='fp32'), make_learner(dls, norm, precision='fp32')
    other.model.load_state_dict(learn.model.state_dict())
    tweak(other)
    assert type(other.model.C1[-2]) is not type(learn.model.C1[-2])   # the tweak did replace the norm layer
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(): expected, got = learn.model.train()(x), other.model.train()(x)   # batch statistics
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_step_timer_times_the_steps_after_warm_up_then_stops_the_fit():
    learn = make_learner(get_dls(n_train=512, n_test=128, bs=64, device='cpu'), 'layer', precision='fp32')
    timer = speed.StepTimer(warmup=2, steps=3)
    with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(1, cbs=timer)   # an epoch has 8 batches
    assert timer.count == 5 and timer.images == 3 * 64 and timer.seconds > 0


def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory() == (platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc')
