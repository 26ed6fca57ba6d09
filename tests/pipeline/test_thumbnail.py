"""The face thumbnails of payload versions 4 (kind 1) and 5 (kind 2) (pipeline/thumbnail.py): their bytes follow
the documented recipes, and applying one gives a recovered face the original's low frequencies, inside the face
region only."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import decode, read_tar

from pipeline import align
from pipeline import thumbnail as thumbnail_module
from pipeline.thumbnail import THUMBNAIL_BYTES, apply_thumbnails, decode_thumbnail, encode_thumbnails, face_region

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "nasa-000000.tar"


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """Four demo portraits, centre-cropped and resized to 128 px: (4, 3, 128, 128) in [0, 1]."""
    out = []
    for members in list(read_tar(DEMO).values())[:4]:
        rgb = decode(members["jpg"])
        h, w = rgb.shape[:2]
        s = min(h, w)
        sq = rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        out.append(cv2.resize(sq, (128, 128), interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def _spec_planes(crop: np.ndarray):
    """Y, Cb, Cr of the face region of a uint8 crop, from the module docstring / schemas/payload.md alone."""
    mask = align.paste_mask(crop.shape[0])
    ys, xs = np.nonzero(mask > 0)
    region = crop[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float64) / 255
    r, g, b = region[..., 0], region[..., 1], region[..., 2]
    return (0.299 * r + 0.587 * g + 0.114 * b, 0.5 - 0.168736 * r - 0.331264 * g + 0.5 * b,
            0.5 + 0.5 * r - 0.418688 * g - 0.081312 * b)


def _grid(plane, k):  # adaptive average pooling bins: [floor(i H / k), ceil((i + 1) H / k))
    h, w = plane.shape
    return np.array([[plane[i * h // k : -(-(i + 1) * h // k), j * w // k : -(-(j + 1) * w // k)].mean()
                      for j in range(k)] for i in range(k)])


def _chroma_bits(cb, cr) -> list[int]:
    qc = np.concatenate([np.clip(np.round(30 * (_grid(c, 4) - 0.5)) + 8, 0, 15).astype(int).ravel() for c in (cb, cr)])
    return [int(v) >> s & 1 for v in qc for s in range(3, -1, -1)]


def _spec_thumbnail(crop: np.ndarray) -> bytes:
    """One crop's kind 1 thumbnail rebuilt from the module docstring / schemas/payload.md alone (numpy, float64)."""
    y, cb, cr = _spec_planes(crop)
    qy = np.clip(np.round(31 * _grid(y, 10)), 0, 31).astype(int).ravel()  # np.round: ties to even, as documented
    bits = [int(v) >> s & 1 for v in qy for s in range(4, -1, -1)] + _chroma_bits(cb, cr)
    bits += [0] * (-len(bits) % 8)
    return np.packbits(np.array(bits, np.uint8)).tobytes()


def _spec_kind2(crop: np.ndarray) -> bytes:
    """One crop's kind 2 thumbnail from the docstring / schemas/payload.md and schemas/thumbnail_kind2.json alone."""
    doc = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "thumbnail_kind2.json").read_text())
    bits_table, mean, step = np.array(doc["bits"]), np.array(doc["mean"]), np.array(doc["step"])
    y, cb, cr = _spec_planes(crop)
    n = np.arange(20)
    d = np.array([np.cos(np.pi * (2 * n + 1) * k / 40) * np.sqrt((1 if k == 0 else 2) / 20) for k in range(20)])
    coef = d @ _grid(y, 20) @ d.T
    bits = []
    for u in range(20):
        for v in range(20):
            b = int(bits_table[u, v])
            if b:
                q = int(min(max(np.floor((coef[u, v] - mean[u, v]) / step[u, v] + 2**b / 2), 0), 2**b - 1))
                bits += [q >> s & 1 for s in range(b - 1, -1, -1)]
    bits += _chroma_bits(cb, cr)
    assert len(bits) == 1144
    return np.packbits(np.array(bits, np.uint8)).tobytes()


def test_thumbnail_bytes_follow_the_documented_recipe(crops):
    thumbs = encode_thumbnails(crops, 1)
    assert [len(t) for t in thumbs] == [THUMBNAIL_BYTES] * 4 and len(set(thumbs)) == 4
    for crop, t in zip(crops, thumbs):
        u8 = (crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert t == _spec_thumbnail(u8)
    y, c = decode_thumbnail(thumbs[0], 1)
    assert y.shape == (10, 10) and c.shape == (2, 4, 4) and 0 <= y.min() and y.max() <= 1
    assert 0.5 - 8 / 30 - 1e-12 <= c.min() <= c.max() <= 0.5 + 7 / 30 + 1e-12
    assert face_region(128) == (12, 124, 17, 111)
    with pytest.raises(ValueError, match="kind 1 thumbnail has 79 bytes, got 78"):
        decode_thumbnail(thumbs[0][:78], 1)
    with pytest.raises(ValueError, match="thumbnail kind must be one of"):
        encode_thumbnails(crops, 3)


def test_kind_2_bytes_follow_the_documented_recipe_and_tables(crops):
    thumbs = encode_thumbnails(crops, 2)
    assert [len(t) for t in thumbs] == [143] * 4 and len(set(thumbs)) == 4
    for crop, t in zip(crops, thumbs):
        assert t == _spec_kind2((crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    y, c = decode_thumbnail(thumbs[0], 2)
    assert y.shape == (20, 20) and c.shape == (2, 4, 4) and 0 <= y.min() and y.max() <= 1
    assert decode_thumbnail(encode_thumbnails(crops, 1)[0], 1)[1].tolist() == c.tolist()  # chroma as kind 1
    with pytest.raises(ValueError, match="kind 2 thumbnail has 143 bytes, got 79"):
        decode_thumbnail(thumbs[0][:79], 2)


def test_changed_kind_2_tables_stop_encoding_and_decoding(tmp_path, monkeypatch):
    changed = tmp_path / "thumbnail_kind2.json"
    changed.write_text(thumbnail_module.KIND2_TABLES.read_text().replace('"luma_bits": 1016', '"luma_bits":  1016'))
    monkeypatch.setattr(thumbnail_module, "KIND2_TABLES", changed)
    thumbnail_module.kind2_tables.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="thumbnail_kind2.json has sha256 .* part of payload format 5"):
            encode_thumbnails(torch.zeros(1, 3, 128, 128), 2)
    finally:
        thumbnail_module.kind2_tables.cache_clear()


def test_kind_2_restores_finer_detail_than_kind_1(crops):
    """A recovery that has the right colouring but lost the detail (blurred): the finer luma of kind 2 brings
    more of the original back."""
    y0, y1, x0, x1 = face_region(128)
    inside = (..., slice(y0, y1), slice(x0, x1))
    blurred = torch.from_numpy(np.stack([cv2.GaussianBlur(c.permute(1, 2, 0).numpy(), (0, 0), 3.0) for c in crops]))
    blurred = blurred.permute(0, 3, 1, 2).contiguous()
    kind1 = apply_thumbnails(blurred, encode_thumbnails(crops, 1), 1)
    kind2 = apply_thumbnails(blurred, encode_thumbnails(crops, 2), 2)
    assert _psnr(kind2[inside], crops[inside]) > _psnr(kind1[inside], crops[inside]) + 0.5  # measured +0.8 dB
    assert _psnr(kind1[inside], crops[inside]) > _psnr(blurred[inside], crops[inside])


def test_grey_is_a_chroma_level_so_black_and_white_faces_come_back_untinted():
    for level in (0, 37, 128, 200, 255):
        grey = torch.full((1, 3, 128, 128), level / 255)
        (t,) = encode_thumbnails(grey, 1)
        assert t == _spec_thumbnail(np.full((128, 128, 3), level, np.uint8))
        _, c = decode_thumbnail(t, 1)
        assert np.all(c == 0.5)  # Cb = Cr = 0.5 exactly: no tint
        (t2,) = encode_thumbnails(grey, 2)
        y2, c2 = decode_thumbnail(t2, 2)
        assert np.all(c2 == 0.5)
        # kind 2's brightness is coded over its whole range: the darkest and brightest faces keep theirs (mean
        # within 0.01; each cell within 0.06: a flat crop is no face, and the tables' levels are centred on faces)
        assert abs(y2.mean() - level / 255) < 0.01 and np.abs(y2 - level / 255).max() < 0.06
        assert float((apply_thumbnails(grey, [t2], 2).max(dim=1).values - apply_thumbnails(grey, [t2], 2).min(dim=1).values).max()) < 1e-5
        out = apply_thumbnails(grey, [t], 1)
        # the result is grey (the channels agree) and off by at most Y's half quantization step
        assert float((out.max(dim=1).values - out.min(dim=1).values).max()) < 1e-5
        assert float((out - grey).abs().max()) <= 0.5 / 31 + 1e-5


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_applying_the_thumbnail_restores_the_originals_colouring_inside_the_face_region_only(crops):
    thumbs = encode_thumbnails(crops, 1)
    y0, y1, x0, x1 = face_region(128)
    inside = (..., slice(y0, y1), slice(x0, x1))
    # a recovery with the right detail but the wrong colouring and lighting, as the shipped model's often is
    cast = (crops * 0.7 + torch.tensor([0.2, 0.08, 0.0])[:, None, None]).clamp(0, 1)
    fixed = apply_thumbnails(cast, thumbs, 1)
    assert _psnr(fixed[inside], crops[inside]) > _psnr(cast[inside], crops[inside]) + 6
    outside = torch.ones(128, 128, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.equal(fixed[..., outside], cast[..., outside])
    # another face's thumbnail moves the crop away from its original: the bytes carry the person's colouring
    swapped = apply_thumbnails(cast, thumbs[1:] + thumbs[:1], 1)
    assert _psnr(swapped[inside], crops[inside]) < _psnr(fixed[inside], crops[inside]) - 3
    # a face's own thumbnail barely changes it (quantisation only)
    assert _psnr(apply_thumbnails(crops, thumbs, 1)[inside], crops[inside]) > 33
    # kind 2 likewise: the cast is corrected, another face's thumbnail is worse
    thumbs2 = encode_thumbnails(crops, 2)
    fixed2 = apply_thumbnails(cast, thumbs2, 2)
    assert _psnr(fixed2[inside], crops[inside]) > _psnr(cast[inside], crops[inside]) + 6
    assert torch.equal(fixed2[..., outside], cast[..., outside])
    assert _psnr(apply_thumbnails(cast, thumbs2[1:] + thumbs2[:1], 2)[inside], crops[inside]) < _psnr(fixed2[inside], crops[inside]) - 3
