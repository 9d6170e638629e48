"The network's rules: size, shape, normalization, skip connections, names."
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normnets import (NORMS, PARAM_LIMIT, FloatGroupNorm, LayerNorm2d, WSConv2d, architecture_id, count_macs,
                      count_params, fold_batchnorm, fuse, init_whitening, normnet, norm_name, register_norm,
                      unfuse)

NAMES = [n for e in NORMS.values() for n in (e.name, e.alias)]


@pytest.mark.parametrize('norm', NAMES)
def test_under_param_limit_and_shape(norm):
    model = normnet(norm)
    assert count_params(model) < PARAM_LIMIT
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))]


def test_each_variant_has_its_norm_and_no_other():
    convs = lambda m: [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    for norm, kind in [('batch', nn.BatchNorm2d), ('group', FloatGroupNorm), ('layer', LayerNorm2d)]:
        model = normnet(norm)
        layers = norm_layers(model)
        assert len(layers) == len(convs(model)) - 1          # after every conv but the classifier
        assert all(type(l) is kind for l in layers), (norm, {type(l).__name__ for l in layers})
    for l in norm_layers(normnet('group')):
        assert 1 < l.num_groups < l.num_channels
    for l in norm_layers(normnet('layer')):
        assert l.num_groups == 1
    for plain, ws in [('group', 'ws-group'), ('layer', 'ws-layer')]:   # the same norms after WS convolutions
        assert [type(l) for l in norm_layers(normnet(ws))] == [type(l) for l in norm_layers(normnet(plain))]
        *standardized, classifier = convs(normnet(ws))
        assert all(type(c) is WSConv2d for c in standardized) and type(classifier) is nn.Conv2d
    assert [n for n, e in NORMS.items() if e.exercise] == ['batch', 'group', 'layer']
    extras = {n: e.base for n, e in NORMS.items() if not e.exercise}
    assert extras == {'ws-group': 'group', 'ws-layer': 'layer'}


def test_weight_standardization_convolves_with_each_filter_at_zero_mean_and_unit_variance():
    conv = WSConv2d(5, 7, 3, padding=1, bias=False)
    # filters of different scales and offsets, large enough that the 1e-5 added to the variance is negligible
    with torch.no_grad(): conv.weight.mul_(10 * torch.rand(7, 1, 1, 1) + 5).add_(torch.randn(7, 1, 1, 1))
    w = conv.weight.flatten(1)
    standardized = (w - w.mean(1, keepdim=True)) / w.std(1, unbiased=False, keepdim=True)
    standardized = standardized.view_as(conv.weight)
    x = torch.randn(2, 5, 6, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x, standardized, padding=1), atol=1e-4, rtol=1e-4)
    with torch.no_grad(): conv.weight.mul_(10).add_(3)   # a filter's scale and offset no longer matter
    torch.testing.assert_close(conv(x), F.conv2d(x, standardized, padding=1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('norm_after_relu', [False, True])
def test_zero_initialized_residual_branches_start_as_nothing(norm_after_relu):
    model = normnet('gn', zero_init_residual=True, norm_after_relu=norm_after_relu)
    for branch_end in (model.C5, model.C9):
        assert branch_end.norm.weight.eq(0).all()
        assert branch_end(torch.randn(2, branch_end[0].in_channels, 8, 8)).eq(0).all()
    assert normnet('gn').C5.norm.weight.eq(1).all()   # the default initialization is left alone


def test_norm_after_relu_puts_each_norm_after_its_activation():
    model = trained_looking(normnet('batch', norm_after_relu=True))
    assert [type(m) for m in model.C5] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]
    assert [type(m) for m in model.c3] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU, nn.BatchNorm2d]
    folded = fold_batchnorm(model)   # a norm after the ReLU does not fold into the convolution before it
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 10
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(folded(x), model(x))


def test_layer_norm_normalizes_over_chw_per_sample():
    ln = LayerNorm2d(8)
    with torch.no_grad(): ln.weight.uniform_(0.5, 2); ln.bias.uniform_(-1, 1)
    x = torch.randn(3, 8, 5, 5) * 4 + 2
    expected = F.layer_norm(x, x.shape[1:]) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), expected, atol=1e-5, rtol=1e-5)


def test_group_norm_computes_in_float32_and_returns_the_input_type():
    gn, plain = FloatGroupNorm(4, 8), nn.GroupNorm(4, 8)
    with torch.no_grad(): gn.weight.uniform_(0.5, 2); gn.bias.uniform_(-1, 1)
    plain.load_state_dict(gn.state_dict())
    x = torch.randn(3, 8, 5, 5) * 4 + 2
    torch.testing.assert_close(gn(x), plain(x))   # in float32 it is plain GroupNorm
    xb = x.bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16): y = gn(xb)
    assert y.dtype == torch.bfloat16
    # statistics of the float32 values, rounded once
    torch.testing.assert_close(y, plain(xb.float()).bfloat16())


def test_skip_connections_add_one_layer_to_another():
    model = normnet('batch').eval()
    seen = {}
    for name in ['C3', 'C5', 'C7', 'C9']:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    model.c6.register_forward_pre_hook(lambda m, i: seen.__setitem__('into_c6', i[0]))
    model.gap.register_forward_pre_hook(lambda m, i: seen.__setitem__('into_gap', i[0]))
    model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(seen['into_c6'], seen['C3'] + seen['C5'])
    torch.testing.assert_close(seen['into_gap'], seen['C7'] + seen['C9'])


def test_layer_order_matches_the_spec():
    names = [n for n, _ in normnet('ln').named_children()]
    assert names == ['C1', 'C2', 'c3', 'C3', 'C4', 'C5', 'c6', 'C7', 'C8', 'C9', 'gap', 'C10']
    model = normnet('ln')
    assert [model.c3[0].kernel_size, model.c6[0].kernel_size, model.C10.kernel_size] == [(1, 1)] * 3
    assert all(
        getattr(model, n)[0].kernel_size == (3, 3) for n in ['C1', 'C2', 'C3', 'C4', 'C5', 'C7', 'C8', 'C9']
    )
    assert isinstance(model.c3[1], nn.MaxPool2d) and isinstance(model.c6[1], nn.MaxPool2d)


def test_unknown_norm_lists_the_valid_names():
    with pytest.raises(ValueError) as e: normnet('no-such-norm')
    for name in NAMES: assert f"'{name}'" in str(e.value)
    assert norm_name(' GN ') == 'group'


def test_registering_a_taken_name_or_alias_or_an_unknown_base_is_refused():
    with pytest.raises(ValueError, match='already registered'):
        register_norm('batch', 'xx', nn.BatchNorm2d, '')
    with pytest.raises(ValueError, match='already registered'):
        register_norm('other', 'gn', nn.BatchNorm2d, '')
    for base in ('no-such-norm', 'ws-group'):   # an extra builds on one of the exercise's norms
        with pytest.raises(ValueError, match='not a registered exercise norm'):
            register_norm('other', 'xx', nn.BatchNorm2d, '', base=base)
    assert list(NORMS)[:3] == ['batch', 'group', 'layer']


def trained_looking(model):
    "Batch norm statistics and affines away from their initial values, as after training; scales positive."
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 2); m.bias.uniform_(-1, 1)
            if isinstance(m, nn.BatchNorm2d): m.running_mean.uniform_(-1, 1); m.running_var.uniform_(0.5, 2)
    return model.eval()


def test_folding_batch_norm_keeps_the_predictions():
    model = trained_looking(normnet('batch'))
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())   # the original is left as it was
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_a_negative_scale_after_a_pool_is_not_folded():
    "max-pool commutes with an increasing map only: a negative scale after c3's pool keeps that batch norm."
    model = trained_looking(normnet('batch'))
    with torch.no_grad(): model.c3[2].weight[0] = -1.0
    folded = fold_batchnorm(model)
    assert isinstance(folded.c3[2], nn.BatchNorm2d) and not isinstance(folded.C3[1], nn.BatchNorm2d)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('norm', list(NORMS))
def test_an_image_alone_is_predicted_as_in_a_batch(norm):
    "In eval mode no norm looks at the other images of a batch: batch norm uses its running statistics."
    torch.manual_seed(0)
    model = trained_looking(normnet(norm))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, together, atol=1e-4, rtol=1e-4)


def test_count_macs_counts_every_conv():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 4, 1))
    assert count_macs(conv) == 32 * 32 * 8 * 27 + 16 * 16 * 4 * 8


def test_whitening_init_makes_the_first_layer_decorrelate_its_patches():
    # images with strongly correlated neighbouring pixels, as photographs have
    g = torch.Generator().manual_seed(0)
    images = F.avg_pool2d(torch.randn(64, 3, 35, 35, generator=g), 4, stride=1)
    conv = init_whitening(normnet('bn').C1[0], images, eps=0)
    out = F.conv2d(images, conv.weight.detach()).permute(0, 2, 3, 1).flatten(0, 2)   # (positions, 12 filters)
    assert torch.allclose(torch.cov(out.T), torch.eye(12), atol=1e-3)   # decorrelated, unit variance
    with pytest.raises(ValueError, match='only 3 values'): init_whitening(nn.Conv2d(3, 4, 1), images)


def test_skips_around_each_layer_add_each_layers_input_to_its_output():
    model = trained_looking(normnet('batch', skips='layer'))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.C3(model.c3(model.C2(model.C1(x))))
        h = h + model.C4(h)
        h = h + model.C5(h)
        h = model.C7(model.c6(h))
        h = h + model.C8(h)
        h = h + model.C9(h)
        torch.testing.assert_close(model(x), model.C10(model.gap(h)).flatten(1))
    # the placement costs no parameter and is part of the fingerprint; the default's fingerprint is unchanged
    assert count_params(model) == count_params(normnet('batch'))
    default = architecture_id(normnet('batch'))
    assert architecture_id(model) != default == architecture_id(normnet('batch', skips='branch'))
    with pytest.raises(ValueError, match='skips'): normnet('batch', skips='everywhere')


def test_gelu_replaces_every_relu_and_nothing_else():
    model = normnet('batch', act='gelu')
    kinds = lambda m, kind: sum(isinstance(x, kind) for x in m.modules())
    assert kinds(model, nn.GELU) == kinds(normnet('batch'), nn.ReLU) == 10 and kinds(model, nn.ReLU) == 0
    assert count_params(model) == count_params(normnet('batch'))
    default = architecture_id(normnet('batch'))
    assert architecture_id(model) != default == architecture_id(normnet('batch', act='relu'))
    with pytest.raises(ValueError, match='act'): normnet('batch', act='tanh')


def test_zero_initialized_residuals_around_each_layer_start_as_nothing():
    model = normnet('gn', skips='layer', zero_init_residual=True)
    assert all(model.get_submodule(name).norm.weight.eq(0).all() for name in ('C4', 'C5', 'C8', 'C9'))


# ---------------------------------------------------------------- several copies as one network

def seeded_copies(norm: str, seeds=(0, 1), **options) -> list:
    copies = []
    for seed in seeds:
        torch.manual_seed(seed)
        copies.append(normnet(norm, **options))
    return copies


@pytest.mark.parametrize('norm', list(NORMS))
def test_a_fused_network_is_its_copies_side_by_side(norm):
    """Copy k of a fused network computes what plain network k computes on copy k's images, in training mode
    (batch statistics: each copy's own) and in eval mode, and unfuse gives it back, statistics included."""
    net_options = dict(norm_after_relu=norm != 'batch')
    plain = seeded_copies(norm, (0, 1, 2), **net_options)
    fused = fuse(plain)
    assert fused.copies == 3 and count_params(fused) == sum(map(count_params, plain))
    xs = [torch.randn(8, 3, 32, 32) for _ in plain]
    for train in (True, False):
        fused.train(train); [p.train(train) for p in plain]
        out = fused(torch.cat(xs, 1))
        assert out.shape == (8, 3, 10)
        for k, (p, x) in enumerate(zip(plain, xs)):
            torch.testing.assert_close(out[:, k], p(x), rtol=1e-4, atol=1e-5)
    for k, p in enumerate(plain):   # the batch norms saw the training batches: their statistics come back
        back = unfuse(fused, k)
        assert back.options == p.options
        assert architecture_id(back) == architecture_id(normnet(norm, **net_options))
        for (name, a), b in zip(back.state_dict().items(), p.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)
        assert not back.training


def test_only_copies_of_one_network_fuse():
    with pytest.raises(ValueError, match='the networks differ'):
        fuse([normnet('bn'), normnet('bn', c1=16)])
    with pytest.raises(ValueError, match='the networks differ'): fuse([normnet('bn'), normnet('gn')])
    with pytest.raises(ValueError, match='no network'): fuse([])
    with pytest.raises(ValueError, match='copies 0'): normnet('bn', copies=0)
    with pytest.raises(IndexError, match='copy 2 of a network of 2'): unfuse(fuse(seeded_copies('bn')), 2)
    with pytest.raises(ValueError, match='fuse plain networks'): fuse([fuse(seeded_copies('bn'))])
