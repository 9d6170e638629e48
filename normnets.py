"""normnets: one tiny CIFAR-10 network, three normalizations.

The network is  C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP C10
(C: 3x3 conv, c: 1x1 conv, P: 2x2 max-pool, GAP: global average pool,
C10: 1x1 conv to the 10 logits), with two skip connections that add one layer's
output to a later one's, as in ResNet-9:

    C3 -> C4 -> C5 (+ C3)       at 16x16
    C7 -> C8 -> C9 (+ C7)       at 8x8

`normnet(norm)` builds it with batch, group or layer normalization after every
convolution but the last. Everything here is a plain `nn.Module`; the fastai
side (data, Learner, one-cycle) lives in `normnets_data.py` and `scripts/`.
"""
import hashlib
from functools import partial

import torch
from torch import nn

__all__ = ['NORMS', 'PARAM_LIMIT', 'WIDTHS', 'GN_GROUPS', 'FloatGroupNorm', 'LayerNorm2d', 'ConvNormAct',
           'NormNet', 'make_norm', 'normnet', 'norm_name', 'architecture_id', 'count_params', 'count_macs']

PARAM_LIMIT = 50_000  # the exercise's rule: every variant stays under it

# Channel widths of C1 C2 c3 | C3 C4 C5 c6 | C7 C8 C9. A 3x3 conv costs
# 1024 multiply-accumulates per weight at 32x32 but only 64 at 8x8, so the
# full-resolution layers stay thin (cheap on a CPU) and the parameters go to
# the 16x16 and 8x8 stages, where they buy the most accuracy per second.
WIDTHS = dict(c1=12, c2=24, c3=16, c4=24, c6=32, c7=32)

# Group norm with 4 groups in every layer (3 to 8 channels a group at these
# widths, all divisible by 4): one group is layer norm and one channel a group
# is instance norm, whose statistics are noisy on 8x8 maps and throw away each
# channel's contrast; 4 sits between them, as the GN paper's sweet spot of a few
# groups does for wide networks.
GN_GROUPS = 4


class FloatGroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 and returned in the input's type. Under bfloat16 mixed precision this is what
    CUDA's autocast does for group norm anyway, and on a CPU it is faster than PyTorch's bfloat16 group norm
    (benchmarks/speed.py measures both). In float32 it is plain GroupNorm."""
    def forward(self, x): return super().forward(x.float()).to(x.dtype)


class LayerNorm2d(FloatGroupNorm):
    "Layer norm over all of (C, H, W) per sample, with a per-channel affine: GroupNorm with one group."
    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)


NORMS = ('batch', 'group', 'layer')
_ALIASES = {'bn': 'batch', 'gn': 'group', 'ln': 'layer'}


def make_norm(norm: str, channels: int, gn_groups: int = GN_GROUPS) -> nn.Module:
    "The normalization layer of a variant for `channels` channels."
    if norm == 'batch': return nn.BatchNorm2d(channels)
    if norm == 'group': return FloatGroupNorm(gn_groups, channels)
    return LayerNorm2d(channels)


def norm_name(norm: str) -> str:
    "The canonical name ('batch', 'group', 'layer') of `norm`, which may be a short name (bn, gn, ln)."
    key = str(norm).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in NORMS:
        valid = ', '.join(f"'{n}'" for n in [*NORMS, *_ALIASES])
        raise ValueError(f"unknown norm {norm!r}: expected one of {valid}")
    return key


class ConvNormAct(nn.Sequential):
    "Conv (no bias: the norm's shift replaces it), then an optional max-pool, then norm and ReLU."
    def __init__(self, c_in: int, c_out: int, norm: str, kernel_size: int = 3, pool: bool = False,
                 gn_groups: int = GN_GROUPS):
        layers = [nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)]
        # Pooling before the norm, as in ResNet-9: max-pool commutes with ReLU,
        # and the norm then runs on a quarter of the values.
        if pool: layers.append(nn.MaxPool2d(2))
        layers += [make_norm(norm, c_out, gn_groups), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class NormNet(nn.Module):
    "C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP C10 with skips C3->C5 and C7->C9."
    def __init__(self, norm: str = 'batch', c1=12, c2=24, c3=16, c4=24, c6=32, c7=32, gn_groups: int = GN_GROUPS,
                 n_classes: int = 10):
        super().__init__()
        self.norm = norm = norm_name(norm)
        unit = partial(ConvNormAct, norm=norm, gn_groups=gn_groups)
        self.C1 = unit(3, c1)
        self.C2 = unit(c1, c2)
        self.c3 = unit(c2, c3, kernel_size=1, pool=True)   # c3 + P1
        self.C3 = unit(c3, c4)
        self.C4 = unit(c4, c4)
        self.C5 = unit(c4, c4)
        self.c6 = unit(c4, c6, kernel_size=1, pool=True)   # c6 + P2
        self.C7 = unit(c6, c7)
        self.C8 = unit(c7, c7)
        self.C9 = unit(c7, c7)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.C10 = nn.Conv2d(c7, n_classes, 1)

    def forward(self, x):
        x = self.c3(self.C2(self.C1(x)))
        x = self.C3(x)
        x = x + self.C5(self.C4(x))   # skip 1: C3 added to C5
        x = self.C7(self.c6(x))
        x = x + self.C9(self.C8(x))   # skip 2: C7 added to C9
        return self.C10(self.gap(x)).flatten(1)


def normnet(norm: str = 'batch', **kwargs) -> NormNet:
    "The network with `norm` ('batch'/'bn', 'group'/'gn' or 'layer'/'ln'); `kwargs` override `WIDTHS` or `gn_groups`."
    return NormNet(norm, **{**WIDTHS, **kwargs})


def architecture_id(model: nn.Module) -> str:
    "A short fingerprint of the layers (types, shapes, group counts): runs with the same id trained the same network."
    return hashlib.md5(repr(model).encode()).hexdigest()[:12]


def count_params(model: nn.Module) -> int:
    "Number of trainable parameters."
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def count_macs(model: nn.Module, size: int = 32) -> int:
    "Multiply-accumulates of one forward pass on one image, counted from the convolutions' real output shapes."
    macs = []
    def hook(m, inp, out):
        k = m.weight[0].numel()  # (c_in / groups) * kh * kw weights feed each output value
        macs.append(out.numel() * k)
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        was_training = model.training
        model.eval()
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
        model.train(was_training)
    finally:
        for h in hooks: h.remove()
    return sum(macs)
