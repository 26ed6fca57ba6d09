"""The assembled G2Face: config, inference API (ranges, determinism, batching), gradients, paper-256 forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from g2face.config import LITE_128, PAPER_256, PRESETS, G2FaceConfig, preset
from g2face.encoder import payload_planes
from g2face.model import G2Face, push_from_original
from g2face.stylegan2 import Discriminator


def _inputs(cfg: G2FaceConfig, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = cfg.resolution
    return (torch.rand(batch, 3, r, r, generator=g), torch.randn(batch, cfg.identity_dim, generator=g),
            torch.randn(batch, cfg.geometry_dim, generator=g),
            torch.randint(0, 2, (batch, cfg.payload_bits), generator=g).float())


def _perturbed(cfg: G2FaceConfig) -> G2Face:
    """A lite model whose zero-initialised parts (hiding gains, noise strengths) are non-zero, in eval."""
    torch.manual_seed(0)
    model = G2Face(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gain", "noise.weight")):
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def lite():
    return _perturbed(LITE_128)


# ---- config ------------------------------------------------------------------------------------------

def test_config_round_trip_and_validation():
    for cfg in PRESETS.values():
        assert G2FaceConfig.from_dict(cfg.to_dict()) == cfg
    assert preset("lite-128") is LITE_128
    with pytest.raises(ValueError, match="unknown G2Face preset"):
        preset("huge")
    with pytest.raises(ValueError, match="style_split"):
        LITE_128.replace(style_split=(6, 6, 2))
    with pytest.raises(ValueError, match="channels needs 6 entries"):
        LITE_128.replace(channels=(8,) * 7)
    with pytest.raises(ValueError, match="hiding_resolutions"):
        LITE_128.replace(hiding_resolutions=(4, 256))
    with pytest.raises(ValueError, match="unknown fields \\['extra'\\]"):
        G2FaceConfig.from_dict({**LITE_128.to_dict(), "extra": 1})
    for r in (64, 128, 256):  # every resolution builds
        G2Face(LITE_128.replace(resolution=r, channels=(8,) * (r.bit_length() - 2),
                                discriminator_channels=(8,) * (r.bit_length() - 2),
                                style_split=(2, 2, r.bit_length() * 2 - 8),
                                hiding_resolutions=(8, 16)))


def test_lite_fits_the_shipping_budget():
    model = G2Face(LITE_128)
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert n * 2 <= 30e6  # fp16 bytes of the shipped weights


def test_payload_layout_is_row_major_per_plane():
    bits = torch.arange(20.0)[None]
    planes = payload_planes(bits, 4)
    assert planes.shape == (1, 2, 4, 4)
    assert planes[0, 1, 0, 2] == 18 and planes[0, 1, 1, 0] == 0  # bit 18 -> plane 1, row 0, col 2; zero padding


# ---- inference API -------------------------------------------------------------------------------------

def test_api_shapes_ranges_and_modes(lite):
    faces, ident, geo, bits = _inputs(LITE_128, 2)
    lite.train()
    anon = lite.anonymize(faces, ident, geo, bits, [5, 6])
    assert lite.training and lite.extractor.training  # the API restores the caller's modes
    lite.eval()
    assert anon.shape == faces.shape and anon.dtype == faces.dtype
    assert anon.min() >= 0 and anon.max() <= 1 and not torch.allclose(anon, faces)
    logits = lite.extract(anon)
    assert logits.shape == (2, LITE_128.payload_bits) and logits.dtype == torch.float32
    rec = lite.recover(anon, ident, geo)
    assert rec.shape == faces.shape and torch.isfinite(rec).all()
    # the payload reaches the image (hiding gains are non-zero here)
    assert not torch.equal(anon, lite.anonymize(faces, ident, geo, 1 - bits, [5, 6]))


def test_api_rejects_bad_inputs(lite):
    faces, ident, geo, bits = _inputs(LITE_128, 2)
    with pytest.raises(ValueError, match="one seed per face"):
        lite.anonymize(faces, ident, geo, bits, [1])
    with pytest.raises(ValueError, match="faces must be a float tensor"):
        lite.anonymize(faces[:, :, :64], ident, geo, bits, [1, 2])
    with pytest.raises(ValueError, match="only 0 and 1"):
        lite.anonymize(faces, ident, geo, bits * 2, [1, 2])
    with pytest.raises(ValueError, match="geometry must be"):
        lite.anonymize(faces, ident, geo[:, :5], bits, [1, 2])
    with pytest.raises(ValueError, match="seeds must be integers"):
        lite.anonymize(faces, ident, geo, bits, [1, -2])


def test_same_seeds_bit_identical_different_seeds_differ(lite):
    faces, ident, geo, bits = _inputs(LITE_128, 2)
    a = lite.anonymize(faces, ident, geo, bits, [11, 12])
    assert torch.equal(a, lite.anonymize(faces, ident, geo, bits, [11, 12]))
    c = lite.anonymize(faces, ident, geo, bits, [11, 99])
    assert torch.equal(a[0], c[0]) and not torch.allclose(a[1], c[1])
    d1, d2 = lite.dummy_identities([11, 12, 13]), lite.dummy_identities([11, 99, 13])
    assert torch.equal(d1[0], d2[0]) and torch.equal(d1[2], d2[2])
    assert F.cosine_similarity(d1[1], d2[1], dim=0) < 0.99
    assert torch.equal(lite.recover(a[:1], ident[:1], geo[:1], [4]), lite.recover(a[:1], ident[:1], geo[:1], [4]))


def test_outputs_do_not_depend_on_batch_mates(lite):
    faces, ident, geo, bits = _inputs(LITE_128, 2)
    together = lite.anonymize(faces, ident, geo, bits, [1, 2])
    alone = lite.anonymize(faces[1:], ident[1:], geo[1:], bits[1:], [2])
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(lite.extract(together)[1:], lite.extract(together[1:]), atol=1e-4, rtol=0)


def test_dummy_identities_keep_away_from_the_original(lite):
    seeds = list(range(16))
    free = lite.dummy_identities(seeds)
    # make the original identity equal to each free dummy: the guard must pick another candidate
    guarded = lite.dummy_identities(seeds, free, max_cosine=0.5)
    cos = F.cosine_similarity(guarded, free, dim=1)
    assert (cos <= 0.5).all()
    # an unreachable bound falls back to the least similar candidate
    best = F.cosine_similarity(lite.dummy_identities(seeds, free, max_cosine=-2.0), free, dim=1)
    assert (best <= cos).all() and (best < 0.5).all()
    same = lite.dummy_identities(seeds, -free, max_cosine=0.0)  # already far: first candidate is kept
    assert torch.equal(same, free)


def test_identity_push_moves_only_the_pushed_faces_style_code_away_from_the_original(lite):
    faces, ident, geo, bits = _inputs(LITE_128, 3)
    plain = lite.anonymize(faces, ident, geo, bits, [5, 6, 7])
    # strength 0 is the paper's draw, bit for bit, whatever the batch mates get
    assert torch.equal(lite.anonymize(faces, ident, geo, bits, [5, 6, 7], identity_push=[0.0, 0.0, 0.0]), plain)
    pushed = lite.anonymize(faces, ident, geo, bits, [5, 6, 7], identity_push=[0.0, 1.0, 0.0])
    assert torch.equal(pushed[0], plain[0]) and torch.equal(pushed[2], plain[2])
    assert (pushed[1] - plain[1]).abs().mean() > 1e-3
    # the math: past the dummy's code, along dummy - original, by the strength
    w_d, w_o = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    out = push_from_original(w_d, w_o, torch.tensor([0.0, 0.5]))
    assert torch.equal(out[0], w_d[0])
    torch.testing.assert_close(out[1], 1.5 * w_d[1] - 0.5 * w_o[1])
    assert (out[1] - w_o[1]).norm() > (w_d[1] - w_o[1]).norm()
    with pytest.raises(ValueError, match="identity embeddings"):
        lite.anonymize(faces, None, geo, bits, [5, 6, 7], identity_push=[0.0, 1.0, 0.0])
    for bad in ([1.0, 1.0], [1.0, -1.0, 0.0], [float("nan"), 0.0, 0.0]):
        with pytest.raises(ValueError, match="3 finite strengths"):
            lite.anonymize(faces, ident, geo, bits, [5, 6, 7], identity_push=bad)


def test_float64_and_bf16_autocast_agree_with_fp32(lite):
    faces, ident, geo, bits = _inputs(LITE_128, 1)
    ref = lite.anonymize(faces, ident, geo, bits, [3])
    model64 = _perturbed(LITE_128).double()
    torch.testing.assert_close(model64.anonymize(faces.double(), ident, geo, bits, [3]).float(), ref,
                               atol=1e-4, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lite.anonymize(faces, ident, geo, bits, [3])
    assert low.dtype == torch.float32 and (low - ref).abs().mean() < 0.05


# ---- training hooks ------------------------------------------------------------------------------------

def test_every_parameter_gets_a_finite_gradient_and_hiding_wakes_up():
    torch.manual_seed(0)
    cfg = LITE_128
    model, disc = G2Face(cfg).train(), Discriminator(cfg.resolution, cfg.discriminator_channels)
    faces, ident, geo, bits = _inputs(cfg, 1)
    x = faces * 2 - 1

    def anonymisation_loss():
        dummy = model.dummy(torch.randn(1, cfg.dummy_noise_dim))
        anon = model.generate(x, model.styles(dummy, geo), bits)
        bce = F.binary_cross_entropy_with_logits(model.extract_logits(anon), bits)
        return anon, anon.square().mean() + bce + dummy.square().mean()

    anon, loss = anonymisation_loss()
    rec = model.generate(anon, model.styles(ident, geo), bits)
    (loss + rec.square().mean() + F.softplus(-disc(anon)).mean()).backward()
    zero = []
    for name, p in list(model.named_parameters()) + list(disc.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if p.grad.abs().sum() == 0:
            zero.append(name)
    # only the hiding projections behind their zero-initialised gains see no gradient yet
    assert zero and all(n.startswith("hiding.") and not n.endswith("gain") for n in zero), zero
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
    opt.step()
    opt.zero_grad()
    anonymisation_loss()[1].backward()
    still_zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not still_zero, still_zero


# ---- paper-256 --------------------------------------------------------------------------------------------

def test_paper_256_forward_batch_1():
    torch.manual_seed(0)
    model = G2Face(PAPER_256).eval()
    assert model.synthesis.n_latent == 14 and model.mapper.n_latent == 14
    faces, ident, geo, bits = _inputs(PAPER_256, 1)
    anon = model.anonymize(faces, ident, geo, bits, [7])
    assert anon.shape == (1, 3, 256, 256) and torch.isfinite(anon).all()
    assert model.extract(anon).shape == (1, 512 * 32)


def test_face_payload_layout_keeps_every_bit_inside_the_paste_region():
    """lite-128 hides its payload only on extractor cells the pipeline pastes back (>= 75% generated)."""
    import math

    import torch.nn.functional as F

    from g2face import payload_layout
    from pipeline import align

    mask = torch.from_numpy(align.paste_mask(128).copy())
    assert torch.equal(mask, torch.from_numpy(payload_layout.face_mask(128).copy()))  # one mask, shared
    cells = F.avg_pool2d(mask[None, None], 2).flatten()  # the extractor's 64 x 64 cells
    grid_bits, positions = payload_layout.grid_layout(128, LITE_128.payload_bits, "face")
    per_plane = int((cells >= payload_layout.FACE_CELL_THRESHOLD).sum())
    assert grid_bits == math.ceil(LITE_128.payload_bits / per_plane) * 64 * 64 == LITE_128.payload_grid_bits
    assert positions.numel() == positions.unique().numel() == LITE_128.payload_bits
    assert bool((cells[positions % (64 * 64)] >= payload_layout.FACE_CELL_THRESHOLD).all())
    # the official layout is the identity
    assert torch.equal(payload_layout.grid_layout(256, 16384, "full")[1], torch.arange(16384))
    # the model reads exactly those positions of its extractor's grid, and writes the bits there
    model = G2Face(LITE_128).eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.extract_logits(x), model.extractor(x)[:, positions])
    bits = torch.randint(0, 2, (2, LITE_128.payload_bits)).float()
    grid = payload_layout.to_grid(bits, grid_bits, positions)
    assert grid.shape == (2, grid_bits) and torch.equal(payload_layout.from_grid(grid, positions), bits)
    assert grid.sum() == bits.sum()
    with pytest.raises(ValueError, match="payload_region"):
        LITE_128.replace(payload_region="ellipse")
