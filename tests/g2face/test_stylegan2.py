"""StyleGAN2 building blocks, synthesis network, discriminator and the rosinality g_ema loader."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from g2face.checkpoint import CheckpointError, load_stylegan2_g_ema
from g2face.config import PAPER_256
from g2face.stylegan2 import (Discriminator, ModulatedConv2d, SynthesisNetwork, make_fir_kernel,
                              minibatch_stddev, upfirdn2d)

FIXTURES = Path(__file__).parent / "fixtures"
# Key/shape listing of a rosinality StyleGAN2 256 px g_ema (copied from shared/reference).
G_EMA_SHAPES = json.loads((FIXTURES / "stylegan2_g_ema_256_shapes.json").read_text())["g_ema"]
SMALL_CHANNELS = (32, 32, 16, 8)  # 4..32 px


def _upfirdn_reference(x: np.ndarray, k: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> np.ndarray:
    """Direct definition on one channel: zero-insert, pad/crop, true convolution, decimate."""
    h, w = x.shape
    u = np.zeros((h * up, w * up))
    u[::up, ::up] = x
    p0, p1 = pad
    u = np.pad(u, ((max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0))))
    u = u[max(-p0, 0):u.shape[0] - max(-p1, 0), max(-p0, 0):u.shape[1] - max(-p1, 0)]
    kh, kw = k.shape
    out = np.zeros((u.shape[0] - kh + 1, u.shape[1] - kw + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = (u[i:i + kh, j:j + kw] * k[::-1, ::-1]).sum()
    return out[::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (1, 1)), (2, 1, (-1, 0))])
def test_upfirdn2d_matches_direct_definition(up, down, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    k = torch.rand(4, 4, generator=g, dtype=torch.float64)  # asymmetric: catches a missing flip
    got = upfirdn2d(x, k, up=up, down=down, pad=pad)
    for b in range(2):
        for c in range(3):
            want = _upfirdn_reference(x[b, c].numpy(), k.numpy(), up, down, pad)
            np.testing.assert_allclose(got[b, c].numpy(), want, rtol=1e-12, atol=1e-12)


def test_fir_kernel_gain_keeps_constant_images_constant():
    x = torch.ones(1, 1, 8, 8)
    up = upfirdn2d(x, make_fir_kernel((1, 3, 3, 1), 4.0), up=2, pad=(2, 1))
    assert up.shape[-1] == 16 and torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1), atol=1e-6)


@pytest.mark.parametrize("upsample", [False, True])
def test_modulated_conv_equals_per_sample_weight_modulation(upsample):
    """Our shared-weight form equals the textbook one: per-sample modulated, demodulated weights."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, style_dim=7, upsample=upsample).double()
    x, w = torch.randn(3, 6, 8, 8, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    got = conv(x, w)
    outs = []
    for b in range(3):
        s = conv.modulation(w[b:b + 1])[0]
        weight = conv.weight[0] * conv.scale * s[None, :, None, None]
        weight = weight * torch.rsqrt(weight.square().sum((1, 2, 3)) + 1e-8)[:, None, None, None]
        if upsample:
            o = F.conv_transpose2d(x[b:b + 1], weight.transpose(0, 1), stride=2)
            outs.append(conv.blur(o))
        else:
            outs.append(F.conv2d(x[b:b + 1], weight, padding=1))
    assert got.shape == (3, 5, 16 if upsample else 8, 16 if upsample else 8)
    torch.testing.assert_close(got, torch.cat(outs), rtol=1e-10, atol=1e-10)


def test_synthesis_fuse_hook_noise_and_shapes():
    torch.manual_seed(0)
    syn = SynthesisNetwork(32, SMALL_CHANNELS, style_dim=16)
    assert syn.n_latent == 8 and syn.noise_sizes == (4, 8, 8, 16, 16, 32, 32)
    w = torch.randn(2, 8, 16)
    noise = [torch.randn(2, 1, s, s) for s in syn.noise_sizes]
    seen = []

    def fuse(side, feats):
        seen.append((side, tuple(feats.shape)))
        return feats

    a = syn(w, noise, fuse)
    assert a.shape == (2, 3, 32, 32)
    assert seen == [(4, (2, 32, 4, 4)), (8, (2, 32, 8, 8)), (16, (2, 16, 16, 16)), (32, (2, 8, 32, 32))]
    assert torch.equal(a, syn(w, noise))  # identity fuse changes nothing; fixed noise is deterministic
    with torch.no_grad():
        for conv in syn.convs:
            conv.noise.weight.fill_(0.5)
    assert not torch.allclose(syn(w, noise), syn(w, [n.flip(-1) for n in noise]))
    # the fuse hook really replaces features
    assert not torch.allclose(a, syn(w, noise, lambda side, f: f * 0.5))


def test_discriminator_r1_double_backward_and_odd_batches():
    torch.manual_seed(0)
    disc = Discriminator(32, SMALL_CHANNELS)
    real = torch.randn(6, 3, 32, 32, requires_grad=True)  # 6 is not a multiple of the stddev group 4
    logits = disc(real)
    assert logits.shape == (6, 1)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    r1 = grad.square().flatten(1).sum(1).mean()
    (F.softplus(-logits).mean() + 5 * r1).backward()
    for name, p in disc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert disc.final_linear[1].weight.grad.abs().sum() > 0


def test_minibatch_stddev_groups_samples_like_stylegan2():
    x = torch.randn(8, 4, 2, 2)
    out = minibatch_stddev(x)
    assert out.shape == (8, 5, 2, 2)
    # samples n and n + 2 (group 4, 2 slots) share a statistic: std over samples {j, j+2, j+4, j+6}
    want = torch.sqrt(x[0::2].var(0, unbiased=False) + 1e-8).mean()
    assert torch.allclose(out[0, 4], want.expand(2, 2)) and torch.allclose(out[6, 4], want.expand(2, 2))


# ---- rosinality g_ema -----------------------------------------------------------------------------

def _synthetic_g_ema(own: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Constant tensors (value = key index + 1), with the true FIR kernels, shaped as listed."""
    out = {}
    for i, (k, shape) in enumerate(shapes.items()):
        out[k] = own[k].clone() if k.endswith("kernel") else torch.full(shape, float(i + 1))
    return out


@pytest.fixture(scope="module")
def paper_synthesis():
    c = PAPER_256
    return SynthesisNetwork(c.resolution, c.channels, c.style_dim, c.blur_kernel)


def test_paper_synthesis_loads_g_ema_and_matches_official_counts(paper_synthesis):
    own = paper_synthesis.state_dict()
    g_ema = _synthetic_g_ema(own, G_EMA_SHAPES)
    load_stylegan2_g_ema(paper_synthesis, {"g_ema": g_ema, "d": {}, "g": {}})
    kept = [k for k in G_EMA_SHAPES if not k.startswith(("style.", "noises."))]
    assert sorted(kept) == sorted(own)  # everything but mapping net and noise buffers is used
    after = paper_synthesis.state_dict()
    for k in kept:
        assert torch.equal(after[k], g_ema[k]), k
    # parameters (buffers excluded) equal the official synthesis net's
    buffers = {k for k, _ in paper_synthesis.named_buffers()}
    official = sum(int(np.prod(s)) for k, s in G_EMA_SHAPES.items()
                   if not k.startswith(("style.", "noises.")) and k not in buffers)
    assert sum(p.numel() for p in paper_synthesis.parameters()) == official == 27_933_090


def test_bad_g_ema_names_the_keys(paper_synthesis):
    g_ema = _synthetic_g_ema(paper_synthesis.state_dict(), G_EMA_SHAPES)
    del g_ema["convs.3.conv.weight"]
    g_ema["convs.12.conv.weight"] = torch.zeros(1)
    g_ema["to_rgb1.bias"] = torch.zeros(1, 3, 2, 2)
    with pytest.raises(CheckpointError) as err:
        load_stylegan2_g_ema(paper_synthesis, {"g_ema": g_ema})
    msg = str(err.value)
    assert "missing keys: convs.3.conv.weight" in msg and "unexpected keys: convs.12.conv.weight" in msg
    assert "to_rgb1.bias (file [1, 3, 2, 2], model [1, 3, 1, 1])" in msg
    with pytest.raises(CheckpointError, match="no 'g_ema' entry"):
        load_stylegan2_g_ema(paper_synthesis, {"d": {}})


def test_g_ema_file_with_args_namespace_and_wrong_kernel(tmp_path):
    """A small rosinality-style file on disk: extra pickled objects are tolerated, a bad FIR kernel is not."""
    syn = SynthesisNetwork(32, SMALL_CHANNELS, style_dim=16)
    state = {f"style.{i}.weight": torch.randn(16, 16) for i in (1, 2)}
    state.update({f"noises.noise_{i}": torch.randn(1, 1, s, s) for i, s in enumerate(syn.noise_sizes)})
    source = {k: torch.randn_like(v) if not k.endswith("kernel") else v.clone() for k, v in syn.state_dict().items()}
    state.update(source)
    path = tmp_path / "550000.pt"
    torch.save({"g_ema": state, "args": argparse.Namespace(size=32)}, path)
    load_stylegan2_g_ema(syn, path)
    assert torch.equal(syn.convs[2].conv.weight, source["convs.2.conv.weight"])
    state["convs.0.conv.blur.kernel"] = torch.ones(4, 4)
    torch.save({"g_ema": state}, path)
    with pytest.raises(CheckpointError, match="convs.0.conv.blur.kernel"):
        load_stylegan2_g_ema(syn, path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_stylegan2_g_ema(syn, tmp_path / "absent.pt")
