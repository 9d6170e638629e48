"""normnets: one tiny CIFAR-10 network, and the normalizations it is built with.

The network is  C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP C10
(C: 3x3 conv, c: 1x1 conv, P: 2x2 max-pool, GAP: global average pool,
C10: 1x1 conv to the 10 logits), with two skip connections that add one layer's
output to a later one's, as in ResNet-9:

    C3 -> C4 -> C5 (+ C3)       at 16x16
    C7 -> C8 -> C9 (+ C7)       at 8x8

or, with `skips='layer'`, one around each of C4, C5, C8 and C9 (x + C4(x), then + C5 of that).

`NORMS` is the registry of normalizations: a new one is one `register_norm` call, and every list of norms in
the project (the study, its CLI, plots, report and tests) comes from it. `normnet(norm)` builds the network
with that norm after every convolution but the last. Everything here is plain PyTorch; the fastai side
(the recipes, the Learner) lives in `normnets_recipes.py` and `normnets_learner.py`, the data in
`normnets_data.py`.
"""
import copy, hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['PARAM_LIMIT', 'MAX_EPOCHS', 'PASS_ACCURACY', 'WIDTHS', 'GN_GROUPS', 'SKIPS', 'ACTIVATIONS',
           'Norm', 'NORMS', 'register_norm', 'norm_name', 'FloatGroupNorm', 'LayerNorm2d', 'WSConv2d',
           'ConvNormAct', 'NormNet', 'normnet', 'fuse', 'unfuse', 'init_whitening', 'architecture_id',
           'count_params', 'count_macs', 'fold_batchnorm']

# The exercise's rules.
PARAM_LIMIT = 50_000   # every variant has fewer parameters
MAX_EPOCHS = 20        # of one-cycle training at most
PASS_ACCURACY = 0.70   # every variant's test accuracy must pass it; the epoch it first does is reported

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

# Where the skips join, per stage of C3/C7 and its two layers after it: 'branch' adds the stage's first output
# to the output of the two layers after it (ResNet-9); 'layer' adds around each of the two, so every layer
# has an identity path beside it. Neither costs a parameter.
SKIPS = ('branch', 'layer')

# The activation after each norm (or before it, with `norm_after_relu`), by name. ReLU is the exercise's;
# GELU, smooth around 0, is airbench's.
ACTIVATIONS = {'relu': lambda: nn.ReLU(inplace=True), 'gelu': nn.GELU}


class FloatGroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 and returned in the input's type. Under bfloat16 mixed precision this is
    what CUDA's autocast does for group norm anyway, and on a CPU it is faster than PyTorch's bfloat16 group
    norm (benchmarks/speed.py measures both). In float32 it is plain GroupNorm."""
    def forward(self, x): return super().forward(x.float()).to(x.dtype)


class LayerNorm2d(FloatGroupNorm):
    """Layer norm over all of (C, H, W) per sample, with a per-channel affine: GroupNorm with one group, or
    one a copy in a fused network of several (`copies`, each of num_channels / copies channels)."""
    def __init__(self, num_channels: int, copies: int = 1, eps: float = 1e-5):
        super().__init__(copies, num_channels, eps=eps)


class WSConv2d(nn.Conv2d):
    """A convolution with weight standardization (Qiao et al. 2019): each output filter is standardized to
    zero mean and unit variance before it is applied, with no extra parameters. Batch norm's normalization
    over the batch smooths the loss landscape; standardizing the weights brings some of that to per-sample
    norms."""
    def forward(self, x):
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
        return self._conv_forward(x, (w - mean) * torch.rsqrt(var + 1e-5), self.bias)


# ---------------------------------------------------------------- the registry of normalizations

@dataclass(frozen=True)
class Norm:
    """A normalization of the study: its canonical name, a short alias, its layer, what it normalizes over,
    the convolution it follows, and for an extra beyond the exercise's three, the exercise norm it changes."""
    name: str
    alias: str
    # layer(channels, groups, copies) -> the norm of `copies` networks' `channels` each, side by side (the
    # channels of copy k are the k-th block); `groups` is group norm's group count
    layer: Callable[..., nn.Module]
    over: str
    conv: type[nn.Conv2d] = nn.Conv2d
    base: str | None = None

    @property
    def exercise(self) -> bool: return self.base is None


NORMS: dict[str, Norm] = {}


def register_norm(name: str, alias: str, layer: Callable[..., nn.Module], over: str,
                  conv: type[nn.Conv2d] = nn.Conv2d, base: str | None = None) -> Norm:
    """Add a normalization to the registry; from then on the study, the CLI, plots and report know it. `base`:
    the exercise norm that an extra one changes, which the report measures it against."""
    taken = {n for norm in NORMS.values() for n in (norm.name, norm.alias)}
    if {name, alias} & taken: raise ValueError(f"norm name {name!r} or alias {alias!r} is already registered")
    if base is not None and not (base in NORMS and NORMS[base].exercise):
        raise ValueError(f"base {base!r} of norm {name!r}: not a registered exercise norm")
    NORMS[name] = Norm(name, alias, layer, over, conv, base)
    return NORMS[name]


# Each norm keeps the copies of a fused network apart: batch norm's statistics are per channel anyway, group
# norm's groups never straddle two copies' channels, and layer norm takes one group a copy.
register_norm('batch', 'bn', lambda c, groups, copies: nn.BatchNorm2d(c * copies),
              'each channel over the batch and the image (N, H, W)')
register_norm('group', 'gn', lambda c, groups, copies: FloatGroupNorm(groups * copies, c * copies),
              'each sample over groups of channels and the image (C/G, H, W)')
register_norm('layer', 'ln', lambda c, groups, copies: LayerNorm2d(c * copies, copies),
              'each sample over all channels and the image (C, H, W)')
# Beyond the exercise: the per-sample norms after weight-standardized convolutions.
for plain in ('group', 'layer'):
    register_norm(f'ws-{plain}', f'ws{NORMS[plain].alias}', NORMS[plain].layer,
                  f'as {plain} norm, after weight-standardized convolutions', conv=WSConv2d, base=plain)


def norm_name(norm: str) -> str:
    """The canonical name of `norm`, which may be its alias (bn, gn, ln); a clear error for a name no entry
    holds."""
    key = str(norm).strip().lower()
    for entry in NORMS.values():
        if key in (entry.name, entry.alias): return entry.name
    valid = ', '.join(f"'{n}'" for e in NORMS.values() for n in (e.name, e.alias))
    raise ValueError(f"unknown norm {norm!r}: expected one of {valid}")


# ---------------------------------------------------------------- the network

class ConvNormAct(nn.Sequential):
    """Conv (no bias: the norm's shift replaces it), then an optional max-pool, then norm and activation
    (`act`, ReLU by default), or with `norm_after_relu` activation and norm, the order of the exercise's
    published solutions. With `copies` > 1, that many side by side: a grouped conv and a norm per copy."""
    def __init__(self, c_in: int, c_out: int, norm: str, kernel_size: int = 3, pool: bool = False,
                 gn_groups: int = GN_GROUPS, norm_after_relu: bool = False, act: str = 'relu',
                 copies: int = 1):
        entry = NORMS[norm]
        layers = [entry.conv(c_in * copies, c_out * copies, kernel_size, padding=kernel_size // 2, bias=False,
                             groups=copies)]
        # Pooling before the norm, as in ResNet-9: max-pool commutes with ReLU,
        # and the norm then runs on a quarter of the values.
        if pool: layers.append(nn.MaxPool2d(2))
        norm_act = [entry.layer(c_out, gn_groups, copies), ACTIVATIONS[act]()]
        super().__init__(*layers, *(norm_act[::-1] if norm_after_relu else norm_act))
        self.norm_after_relu = norm_after_relu

    @property
    def norm(self) -> nn.Module: return self[-1] if self.norm_after_relu else self[-2]


class NormNet(nn.Module):
    """C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP C10, skips C3->C5 and C7->C9 (or around each layer: `SKIPS`).

    With `copies` K > 1 it is K networks side by side, trained as one (horizontal fusion, as HFTA: Wang et
    al., MLSys 2021): every convolution grouped (`groups=K`), every norm per copy, input (B, K*3, H, W) with
    copy k's images in channels 3k to 3k+2, output (B, K, 10). One small network leaves most of a GPU idle,
    waiting for its many small kernels to launch; K copies launch the same kernels, each K times larger.
    `fuse` and `unfuse` go between K plain networks and one fused."""
    def __init__(self, norm: str = 'batch', c1=12, c2=24, c3=16, c4=24, c6=32, c7=32,
                 gn_groups: int = GN_GROUPS, norm_after_relu: bool = False, zero_init_residual: bool = False,
                 skips: str = 'branch', act: str = 'relu', n_classes: int = 10, copies: int = 1):
        super().__init__()
        if skips not in SKIPS: raise ValueError(f"skips {skips!r}: expected one of {', '.join(SKIPS)}")
        if act not in ACTIVATIONS: raise ValueError(f"act {act!r}: expected one of {', '.join(ACTIVATIONS)}")
        if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
            raise ValueError(f"copies {copies!r}: a whole number of networks, at least 1")
        self.norm = norm = norm_name(norm)
        self.skips, self.copies = skips, copies
        # what builds one copy: `unfuse` builds the plain network from it
        self.options = dict(c1=c1, c2=c2, c3=c3, c4=c4, c6=c6, c7=c7, gn_groups=gn_groups,
                            norm_after_relu=norm_after_relu, zero_init_residual=zero_init_residual,
                            skips=skips, act=act, n_classes=n_classes)
        def unit(c_in, c_out, **kw):
            return ConvNormAct(c_in, c_out, norm, gn_groups=gn_groups, norm_after_relu=norm_after_relu,
                               act=act, copies=copies, **kw)
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
        self.C10 = nn.Conv2d(c7 * copies, n_classes * copies, 1, groups=copies)
        # Each residual branch (C4 C5, C8 C9; or each of those layers) starts as nothing: its last norm scale
        # at 0, so that at first the network is the shallow path through the skips, and the branches grow in.
        if zero_init_residual:
            ends = (self.C5, self.C9) if skips == 'branch' else (self.C4, self.C5, self.C8, self.C9)
            for branch_end in ends: nn.init.zeros_(branch_end.norm.weight)

    def residual(self, x, first: nn.Module, second: nn.Module):
        "`x` added to the output of `first` then `second`, or around each of them (`skips='layer'`)."
        if self.skips == 'layer':
            x = x + first(x)
            return x + second(x)
        return x + second(first(x))

    def forward(self, x):
        x = self.c3(self.C2(self.C1(x)))
        x = self.residual(self.C3(x), self.C4, self.C5)   # skip 1: C3 added to C5 (by default)
        x = self.residual(self.C7(self.c6(x)), self.C8, self.C9)   # skip 2: C7 added to C9 (by default)
        x = self.C10(self.gap(x)).flatten(1)
        return x if self.copies == 1 else x.unflatten(1, (self.copies, -1))   # (B, K, 10)

    def extra_repr(self) -> str:
        # Only a changed placement shows, so the default network keeps the fingerprint (`architecture_id`)
        # of the runs trained before the option existed.
        return '' if self.skips == 'branch' else f"skips='{self.skips}'"


def normnet(norm: str = 'batch', **kwargs) -> NormNet:
    """The network with `norm` (a name or alias in `NORMS`); `kwargs` override `WIDTHS`, `gn_groups`,
    `norm_after_relu`, `zero_init_residual`, `skips` or `act`, and `copies` fuses that many."""
    return NormNet(norm, **{**WIDTHS, **kwargs})


def fuse(models) -> NormNet:
    """Plain networks of one norm and one set of options as one fused network, copy k holding `models[k]`'s
    weights and statistics: trained on copy k's batches, copy k is `models[k]` trained on them."""
    models = list(models)
    if not models: raise ValueError("fuse: no network given")
    first = models[0]
    for m in models:
        if m.copies != 1: raise ValueError(f"fuse: a network of {m.copies} copies; fuse plain networks")
        if (m.norm, m.options) != (first.norm, first.options):
            raise ValueError(f"fuse: the networks differ ({first.norm} norm, {first.options}; {m.norm} norm, "
                             f"{m.options}): only networks of one norm and one set of options fuse")
    fused = NormNet(first.norm, **first.options, copies=len(models)).to(next(first.parameters()).device)
    states = [m.state_dict() for m in models]
    fused.load_state_dict({name: torch.cat([s[name] for s in states]) if value.dim() else value
                           for name, value in states[0].items()})   # a 0-dim value: batch norm's step count
    return fused


def unfuse(model: NormNet, k: int) -> NormNet:
    "Copy `k` of a fused network as the plain network, with its weights and statistics, in the same mode."
    if not 0 <= k < model.copies: raise IndexError(f"copy {k} of a network of {model.copies}")
    plain = NormNet(model.norm, **model.options).to(next(model.parameters()).device)
    plain.load_state_dict({name: value.chunk(model.copies)[k].clone() if value.dim() else value.clone()
                           for name, value in model.state_dict().items()})
    return plain.train(model.training)


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> nn.Conv2d:
    """Set `conv`'s filters to the leading eigenvectors of the covariance of the `images`' patches of its
    kernel size, each divided by the square root of its eigenvalue, as airbench initializes its first layer:
    its outputs start out as the patches' strongest directions, decorrelated and at unit variance, which a
    network would otherwise spend its first epochs learning. `images`: (N, C, H, W) as the network sees
    them (normalized)."""
    k, c_out = conv.kernel_size[0], conv.out_channels
    patches = F.unfold(images.float(), k).transpose(1, 2).flatten(0, 1)   # (N * positions, C * k * k)
    patches = patches - patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))   # ascending
    if c_out > len(eigenvalues):
        raise ValueError(f"{c_out} filters, but a patch has only {len(eigenvalues)} values to whiten")
    top = eigenvectors[:, -c_out:].flip(1) / torch.sqrt(eigenvalues[-c_out:].flip(0) + eps)
    conv.weight.copy_(top.T.reshape(conv.weight.shape))   # unfold's order (C, kh, kw) is the weight's
    return conv


def architecture_id(model: nn.Module) -> str:
    """A short fingerprint of the layers (types, shapes, group counts): runs with the same id trained the same
    network."""
    return hashlib.md5(repr(model).encode()).hexdigest()[:12]


def count_params(model: nn.Module) -> int:
    "Number of trainable parameters."
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def count_macs(model: nn.Module, size: int = 32) -> int:
    """Multiply-accumulates of one forward pass on one image, counted from the convolutions' real output
    shapes."""
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


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference with each batch norm folded into the convolution before it: the running
    statistics and the affine become the convolution's weight scale and bias, so inference skips the norm.
    Where a max-pool sits between them (c3, c6) the fold is exact only for channels with a positive scale (max
    commutes with an increasing map): those norms are folded when every scale is positive, kept otherwise.
    A norm after the ReLU (`norm_after_relu`) is kept. Eval mode only."""
    model = copy.deepcopy(model).eval()
    for unit in model.modules():
        if not isinstance(unit, ConvNormAct): continue
        conv, norm, pooled = unit[0], unit.norm, len(unit) == 4
        if unit.norm_after_relu or type(conv) is not nn.Conv2d or not isinstance(norm, nn.BatchNorm2d):
            continue
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        if pooled and (scale <= 0).any(): continue
        folded = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, bias=True
        )
        folded = folded.to(
            conv.weight.device,
            memory_format=torch.channels_last
            if conv.weight.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format,
        )
        folded.weight.copy_(conv.weight * scale[:, None, None, None])
        folded.bias.copy_(norm.bias - norm.running_mean * scale)
        unit[0], unit[len(unit) - 2] = folded, nn.Identity()
    return model
