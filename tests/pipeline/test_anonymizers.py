"""Blur and pixelate baselines, the batch contract, and build_anonymizer."""
from __future__ import annotations

import pytest
import torch

from pipeline.anonymizers import (
    AnonymizerUnavailable,
    BlurAnonymizer,
    PixelateAnonymizer,
    build_anonymizer,
)

RES = 64


def _textured(n: int = 3, res: int = RES, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, res, res), generator=g)


def _binary(n: int = 2, res: int = RES, seed: int = 1) -> torch.Tensor:
    """Only exact 0s and 1s: the hardest case for staying inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 3, res, res), generator=g) > 0.5).float()


def _make(method: str, res: int = RES):
    a = build_anonymizer(method, res, blur_sigma=0.08, pixelate_blocks=8, checkpoint=None)
    a.setup(torch.device("cpu"))
    return a


@pytest.mark.parametrize("method", ["blur", "pixelate"])
@pytest.mark.parametrize("faces", [_textured(), _binary()], ids=["uniform", "binary"])
def test_shape_range_and_substantial_change(method, faces):
    a = _make(method)
    out = a.anonymize(faces.clone(), list(range(faces.shape[0])))
    assert out.shape == faces.shape
    assert out.dtype == faces.dtype
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out - faces).abs().mean() > 0.15  # a textured face is destroyed, not lightly touched


@pytest.mark.parametrize("method", ["blur", "pixelate"])
def test_deterministic_and_independent_of_seeds_and_batch(method):
    a = _make(method)
    faces = _textured(4)
    first = a.anonymize(faces.clone(), [0, 1, 2, 3])
    again = a.anonymize(faces.clone(), [0, 1, 2, 3])
    other_seeds = a.anonymize(faces.clone(), [9, 8, 7, 6])
    assert torch.equal(first, again)
    assert torch.equal(first, other_seeds)
    single = a.anonymize(faces[2:3].clone(), [2])
    torch.testing.assert_close(single[0], first[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["blur", "pixelate"])
def test_input_is_not_modified(method):
    faces = _textured(2)
    keep = faces.clone()
    _make(method).anonymize(faces, [0, 1])
    assert torch.equal(faces, keep)


def test_blur_keeps_a_constant_image_constant():
    faces = torch.full((1, 3, RES, RES), 0.3)
    out = _make("blur").anonymize(faces, [0])
    torch.testing.assert_close(out, faces, atol=1e-5, rtol=0)


def test_blur_strength_grows_with_sigma():
    faces = _textured(2)
    weak = BlurAnonymizer(RES, 0.01).anonymize(faces, [0, 1])
    strong = BlurAnonymizer(RES, 0.1).anonymize(faces, [0, 1])
    assert (strong - faces).abs().mean() > (weak - faces).abs().mean() + 0.05
    assert strong.std() < weak.std()


@pytest.mark.parametrize("blocks", [2, 8, 16, 64])
def test_pixelate_is_constant_within_each_block_and_equals_the_block_mean(blocks):
    faces = _textured(2)
    out = PixelateAnonymizer(RES, blocks).anonymize(faces, [0, 1])
    b = RES // blocks
    tiles = out.reshape(2, 3, blocks, b, blocks, b)
    spread = tiles.amax(dim=(3, 5)) - tiles.amin(dim=(3, 5))
    assert torch.all(spread == 0)
    means = faces.reshape(2, 3, blocks, b, blocks, b).mean(dim=(3, 5))
    torch.testing.assert_close(tiles[:, :, :, 0, :, 0], means, atol=1e-6, rtol=0)


def test_pixelate_with_blocks_not_dividing_the_crop_has_at_most_blocks_levels_per_line():
    faces = _textured(1)
    out = PixelateAnonymizer(RES, 7).anonymize(faces, [0])
    for row in out[0, 0]:
        assert len(torch.unique(row)) <= 7
    for col in out[0, 0].T:
        assert len(torch.unique(col)) <= 7


@pytest.mark.parametrize("method", ["blur", "pixelate"])
def test_seeds_length_must_match_the_batch(method):
    a = _make(method)
    with pytest.raises(AssertionError):
        a.anonymize(_textured(3), [0, 1])
    with pytest.raises(AssertionError):
        a.anonymize(_textured(2), [0, 1, 2])


@pytest.mark.parametrize("method", ["blur", "pixelate"])
def test_wrong_resolution_or_layout_is_rejected(method):
    a = _make(method)
    with pytest.raises(AssertionError):
        a.anonymize(_textured(1, res=32), [0])
    with pytest.raises(AssertionError):
        a.anonymize(_textured(1).permute(0, 2, 3, 1).contiguous(), [0])  # NHWC instead of NCHW


def test_build_anonymizer_returns_the_configured_baselines():
    blur = build_anonymizer("blur", 128, blur_sigma=0.1, pixelate_blocks=8, checkpoint=None)
    assert isinstance(blur, BlurAnonymizer)
    assert blur.resolution == 128 and blur.sigma == pytest.approx(12.8)
    pix = build_anonymizer("pixelate", 256, blur_sigma=0.1, pixelate_blocks=12, checkpoint=None)
    assert isinstance(pix, PixelateAnonymizer)
    assert pix.resolution == 256 and pix.blocks == 12


def test_build_g2face_without_a_checkpoint_is_the_shipped_model():
    from g2face.checkpoint import SHIPPED_SHA256

    model = build_anonymizer("g2face", 128, blur_sigma=0.08, pixelate_blocks=8, checkpoint=None)
    assert model.artifact_sha256 == SHIPPED_SHA256 and model.model_id.startswith("g2face:lite-128:")
    with pytest.raises(AnonymizerUnavailable, match="anonymizer.resolution: 128"):  # the shipped model is 128 px
        build_anonymizer("g2face", 256, blur_sigma=0.08, pixelate_blocks=8, checkpoint=None)


def test_build_g2face_raises_unavailable_naming_the_setting():
    with pytest.raises(AnonymizerUnavailable) as ei:
        build_anonymizer("g2face", 128, blur_sigma=0.08, pixelate_blocks=8, checkpoint="/nonexistent/model.pt")
    msg = str(ei.value)
    assert "anonymizer.method" in msg
    assert "blur" in msg and "pixelate" in msg  # tells the user what to use instead
    assert isinstance(ei.value, RuntimeError)


def test_build_unknown_method_is_a_value_error_naming_the_setting():
    with pytest.raises(ValueError, match="anonymizer.method"):
        build_anonymizer("mosaic", 128, blur_sigma=0.08, pixelate_blocks=8, checkpoint=None)


def test_model_ids_differ_by_parameters():
    ids = [
        BlurAnonymizer(128, 0.08).model_id,
        BlurAnonymizer(128, 0.1).model_id,
        BlurAnonymizer(64, 0.08).model_id,
        BlurAnonymizer(256, 0.08).model_id,
        PixelateAnonymizer(128, 8).model_id,
        PixelateAnonymizer(128, 16).model_id,
        PixelateAnonymizer(64, 8).model_id,
    ]
    assert len(set(ids)) == len(ids), ids
    assert BlurAnonymizer(128, 0.08).model_id == BlurAnonymizer(128, 0.08).model_id
    assert ids[0].startswith("blur-") and ids[4].startswith("pixelate-")
    assert "128" in ids[0] and "0.08" in ids[0]
    assert "16" in ids[5]
