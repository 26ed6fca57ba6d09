"""StyleGAN2 synthesis network and discriminator in pure PyTorch.

Parameter and buffer names follow the widely used rosinality layout, so a ``g_ema`` state dict loads
into ``SynthesisNetwork`` unchanged (minus its mapping network and noise buffers). Everything is plain
``torch.nn.functional``: no compiled ops, double backward works (R1 penalty), and any device or dtype.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SQRT2 = math.sqrt(2.0)

# ---------------------------------------------------------------------------------------------
# Plain functions


def make_fir_kernel(taps: Sequence[int], gain: float = 1.0) -> Tensor:
    """2-D separable FIR kernel from 1-D taps, normalised to sum ``gain``."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum() * gain


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by zero insertion, pad (negative crops), FIR-filter, then keep every ``down``-th pixel.

    ``pad = (before, after)`` applies to both axes. The kernel is flipped, so this is a true convolution.
    """
    b, c, h, w = x.shape
    if up > 1:
        # Each pixel followed by up-1 zeros along both axes.
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)
    p0, p1 = pad
    x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    if p0 < 0 or p1 < 0:
        hh, ww = x.shape[-2:]
        x = x[:, :, max(-p0, 0):hh - max(-p1, 0), max(-p0, 0):ww - max(-p1, 0)]
    kh, kw = kernel.shape
    weight = torch.flip(kernel, (0, 1)).to(x.dtype).reshape(1, 1, kh, kw)
    # One filter shared by all channels: fold channels into the batch instead of a grouped conv.
    hh, ww = x.shape[-2:]
    out = F.conv2d(x.reshape(b * c, 1, hh, ww), weight)
    out = out.reshape(b, c, hh - kh + 1, ww - kw + 1)
    if down > 1:
        out = out[:, :, ::down, ::down]
    return out


def fused_leaky_relu(x: Tensor, bias: Tensor, negative_slope: float = 0.2, scale: float = SQRT2) -> Tensor:
    """StyleGAN2's activation: add a per-channel bias, leaky ReLU, multiply by sqrt(2)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.reshape(shape), negative_slope) * scale


def modulated_conv2d(x: Tensor, weight: Tensor, style: Tensor, demodulate: bool, upsample: bool,
                     padding: int) -> Tensor:
    """Modulated convolution with a shared weight.

    Scaling the input channels by the style and the output channels by the demodulation factor equals
    convolving with per-sample modulated weights (the two are linear and commute with the conv), and
    keeps one ordinary batched conv. x: (B, in, H, W); weight: (out, in, k, k), already equal-lr scaled;
    style: (B, in). With ``upsample`` the result still needs the blur filter applied by the caller.
    """
    b = x.shape[0]
    assert style.shape == (b, weight.shape[1]), (style.shape, weight.shape)
    x = x * style.reshape(b, -1, 1, 1).to(x.dtype)
    if upsample:
        out = F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2)
    else:
        out = F.conv2d(x, weight.to(x.dtype), padding=padding)
    if demodulate:
        # sum over in,k,k of (w * s)^2 = (s^2) @ (sum_k w^2)^T, kept in fp32 even under autocast.
        with torch.autocast(x.device.type, enabled=False):
            acc = torch.promote_types(weight.dtype, torch.float32)
            energy = style.to(acc).square() @ weight.to(acc).square().sum((2, 3)).transpose(0, 1)
        out = out * torch.rsqrt(energy + 1e-8).reshape(b, -1, 1, 1).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Parameter holders


class FusedLeakyReLU(nn.Module):
    """Holds the per-channel bias of ``fused_leaky_relu``.

    Args:
        channels: number of channels (size of the bias).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(x, self.bias)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights stored at unit scale, scaled at run time.

    Args:
        in_dim: input features.
        out_dim: output features.
        bias_init: initial bias value.
        lr_mul: learning-rate multiplier (weights are stored divided by it).
        activate: apply ``fused_leaky_relu`` with this layer's bias.
    """

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: Tensor) -> Tensor:
        if self.activate:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    """Conv2d with equalised learning rate.

    Args:
        in_channels, out_channels, kernel_size: as for ``nn.Conv2d``.
        stride, padding: as for ``nn.Conv2d``.
        bias: whether the layer has its own bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class Blur(nn.Module):
    """FIR filter with fixed padding (the kernel is a persistent buffer, as in rosinality files).

    Args:
        taps: 1-D taps of the separable kernel.
        pad: (before, after) padding on both axes.
        gain: kernel sum (4 after a stride-2 transposed conv, to keep the signal's scale).
    """

    def __init__(self, taps: Sequence[int], pad: tuple[int, int], gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", make_fir_kernel(taps, gain))
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip path.

    Args:
        taps: 1-D taps of the separable kernel.
    """

    def __init__(self, taps: Sequence[int]):
        super().__init__()
        self.register_buffer("kernel", make_fir_kernel(taps, 4.0))
        p = len(taps) - 2
        self.pad = ((p + 1) // 2 + 1, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=2, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution.

    Args:
        in_channels, out_channels, kernel_size: convolution sizes.
        style_dim: width of the style vector that drives the per-input-channel modulation.
        demodulate: normalise each output channel by its modulated weight energy.
        upsample: 2x upsampling by a stride-2 transposed conv followed by a blur.
        blur_taps: FIR taps used when upsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, blur_taps: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.demodulate, self.upsample = demodulate, upsample
        self.padding = kernel_size // 2
        if upsample:
            p = (len(blur_taps) - 2) - (kernel_size - 1)
            self.blur = Blur(blur_taps, pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        out = modulated_conv2d(x, self.weight[0] * self.scale, self.modulation(style), self.demodulate,
                               self.upsample, self.padding)
        return self.blur(out) if self.upsample else out


class NoiseInjection(nn.Module):
    """Adds learned-strength single-channel noise; fresh Gaussian noise when none is given."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        assert noise.shape == (x.shape[0], 1, *x.shape[2:]), (noise.shape, x.shape)
        return x + self.weight * noise.to(x.dtype)


class ConstantInput(nn.Module):
    """Learned 4x4 starting feature map.

    Args:
        channels: its channels.
    """

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):
    """Modulated conv, noise injection, biased leaky ReLU. Arguments as for ``ModulatedConv2d``."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, upsample: bool = False,
                 blur_taps: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, style_dim, upsample=upsample, blur_taps=blur_taps)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: Tensor, style: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB (no demodulation) plus the upsampled skip image.

    Args:
        in_channels: feature channels.
        style_dim: style width.
        upsample: whether a skip image from the previous resolution is added (after 2x upsampling).
        blur_taps: FIR taps of that upsampling.
    """

    def __init__(self, in_channels: int, style_dim: int, upsample: bool = True,
                 blur_taps: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_taps)
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


# ---------------------------------------------------------------------------------------------
# Synthesis network

FuseFn = Callable[[int, Tensor], Tensor]


class SynthesisNetwork(nn.Module):
    """StyleGAN2 synthesis network (no mapping network): w+ rows -> image.

    Args:
        resolution: output side in pixels (a power of two >= 8).
        channels: feature channels at 4, 8, ..., resolution px.
        style_dim: style width (columns of w+).
        blur_taps: FIR taps for all up-sampling.

    ``forward(w_plus, noise, fuse)``: ``fuse(res, features)`` (optional) may replace the features of
    each resolution: at 4 px it sees the constant input, above that the output of the up-sampling conv.
    This is where G2Face's identity-aware fusion plugs in. The image has no final activation.
    """

    def __init__(self, resolution: int, channels: Sequence[int], style_dim: int,
                 blur_taps: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.resolutions = tuple(2**k for k in range(2, int(math.log2(resolution)) + 1))
        assert self.resolutions[-1] == resolution and len(channels) == len(self.resolutions), (resolution, channels)
        self.resolution, self.style_dim, self.channels = resolution, style_dim, tuple(channels)
        self.n_latent = 2 * len(self.resolutions)
        self.input = ConstantInput(channels[0])
        self.conv1 = StyledConv(channels[0], channels[0], style_dim, blur_taps=blur_taps)
        self.to_rgb1 = ToRGB(channels[0], style_dim, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.convs.append(StyledConv(c_in, c_out, style_dim, upsample=True, blur_taps=blur_taps))
            self.convs.append(StyledConv(c_out, c_out, style_dim, blur_taps=blur_taps))
            self.to_rgbs.append(ToRGB(c_out, style_dim, blur_taps=blur_taps))

    @property
    def noise_sizes(self) -> tuple[int, ...]:
        """Side of each noise map, in the order the StyledConvs use them."""
        return (4,) + tuple(r for r in self.resolutions[1:] for _ in range(2))

    def forward(self, w_plus: Tensor, noise: Sequence[Tensor] | None = None, fuse: FuseFn | None = None) -> Tensor:
        b = w_plus.shape[0]
        assert w_plus.shape[1:] == (self.n_latent, self.style_dim), (w_plus.shape, self.n_latent, self.style_dim)
        if noise is None:
            noise = [None] * len(self.noise_sizes)
        assert len(noise) == len(self.noise_sizes), (len(noise), len(self.noise_sizes))
        out = self.input(b).to(w_plus.dtype)
        if fuse is not None:
            out = fuse(4, out)
        out = self.conv1(out, w_plus[:, 0], noise[0])
        skip = self.to_rgb1(out, w_plus[:, 1])
        for k, res in enumerate(self.resolutions[1:]):
            i = 2 * k + 1
            out = self.convs[2 * k](out, w_plus[:, i], noise[i])
            if fuse is not None:
                out = fuse(res, out)
            out = self.convs[2 * k + 1](out, w_plus[:, i + 1], noise[i + 1])
            skip = self.to_rgbs[k](out, w_plus[:, i + 2], skip)
        assert skip.shape == (b, 3, self.resolution, self.resolution), skip.shape
        return skip


# ---------------------------------------------------------------------------------------------
# Discriminator


class ConvLayer(nn.Sequential):
    """[blur] -> equalised conv -> [biased leaky ReLU]; Sequential indices match rosinality files.

    Args:
        in_channels, out_channels, kernel_size: conv sizes.
        downsample: blur then stride-2 conv.
        bias: whether the layer has a bias (held by the activation when there is one).
        activate: apply the biased leaky ReLU.
        blur_taps: FIR taps for downsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool = False,
                 bias: bool = True, activate: bool = True, blur_taps: Sequence[int] = (1, 3, 3, 1)):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(blur_taps) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_taps, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channels))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Discriminator residual block that halves the resolution; output (main + skip) / sqrt 2."""

    def __init__(self, in_channels: int, out_channels: int, blur_taps: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3, blur_taps=blur_taps)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True, blur_taps=blur_taps)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, activate=False, bias=False,
                              blur_taps=blur_taps)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


def minibatch_stddev(x: Tensor, group_size: int = 4) -> Tensor:
    """Append one channel: the feature std-dev across groups of samples, averaged to one number.

    The group is the largest size <= ``group_size`` that divides the batch (rosinality fails otherwise).
    """
    b, c, h, w = x.shape
    group = next(g for g in range(min(group_size, b), 0, -1) if b % g == 0)
    y = x.reshape(group, b // group, c, h, w)
    std = torch.sqrt(y.var(0, unbiased=False) + 1e-8).mean((1, 2, 3))  # (b // group,)
    std = std.reshape(1, -1, 1, 1, 1).expand(group, -1, 1, h, w).reshape(b, 1, h, w)
    return torch.cat([x, std], 1)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator: image -> one real/fake logit per sample.

    Args:
        resolution: input side in pixels.
        channels: channels at 4, 8, ..., resolution px.
        blur_taps: FIR taps for downsampling.
    """

    def __init__(self, resolution: int, channels: Sequence[int], blur_taps: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        n = int(math.log2(resolution)) - 1
        assert 2 ** (n + 1) == resolution and len(channels) == n, (resolution, channels)
        self.resolution = resolution
        layers: list[nn.Module] = [ConvLayer(3, channels[-1], 1)]
        for c_in, c_out in zip(channels[::-1][:-1], channels[::-1][1:]):
            layers.append(ResBlock(c_in, c_out, blur_taps))
        self.convs = nn.Sequential(*layers)
        self.final_conv = ConvLayer(channels[0] + 1, channels[0], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(channels[0] * 16, channels[0], activate=True),
            EqualLinear(channels[0], 1),
        )

    def forward(self, image: Tensor) -> Tensor:
        assert image.shape[1:] == (3, self.resolution, self.resolution), image.shape
        out = minibatch_stddev(self.convs(image))
        out = self.final_conv(out)
        return self.final_linear(out.flatten(1))
