"""Differentiable degradations: JPEG vs Pillow, resampling and paste-back vs the pipeline's OpenCV code."""
from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import DEMO_SHARDS
from helpers import decode, read_tar
from PIL import Image

from g2face import degrade
from pipeline import align


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [decode(files["jpg"]) for shard in DEMO_SHARDS for _, files in sorted(read_tar(shard).items())]


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x[0].detach().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).numpy().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse) if mse > 0 else math.inf


def pil_jpeg(rgb: np.ndarray, quality: int, **kw) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, **kw)
    return np.asarray(Image.open(buf).convert("RGB"))


def face_crop(photo: np.ndarray, side: int = 128) -> np.ndarray:
    """A central square of a portrait resized to ``side`` (real image content, no detector needed)."""
    h, w = photo.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return cv2.resize(photo[y0:y0 + s, x0:x0 + s], (side, side), interpolation=cv2.INTER_AREA)


# ---- quantisation ---------------------------------------------------------------------------------


def test_quantize_8bit_rounds_like_uint8_and_passes_gradients_inside_the_range():
    x = torch.linspace(-1.2, 1.2, 1001, requires_grad=True)
    y = degrade.quantize_8bit(x)
    expected = np.clip(np.rint((x.detach().numpy().clip(-1, 1) + 1) * 127.5), 0, 255) / 127.5 - 1
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-6)
    assert len(np.unique(np.round(y.detach().numpy(), 6))) == 256
    y.sum().backward()
    inside = (x.detach().abs() < 1).numpy()
    assert np.all(x.grad.numpy()[inside] == 1) and np.all(x.grad.numpy()[~inside] == 0)


# ---- JPEG -----------------------------------------------------------------------------------------


def test_jpeg_tables_follow_ijg_quality_scaling():
    t50 = degrade.quantization_table(50, chroma=False)[0]
    assert t50[0, 0] == 16 and t50[7, 7] == 99  # quality 50 is the standard table itself
    t90 = degrade.quantization_table(90, chroma=False)[0]
    assert t90[0, 0] == 3 and t90[0, 1] == 2 and t90[7, 7] == 20  # floor((q * 20 + 50) / 100)
    assert degrade.quantization_table(100, chroma=True).max() == 1
    d = degrade.dct_matrix()
    torch.testing.assert_close(d @ d.T, torch.eye(8, dtype=torch.float64))


@pytest.mark.parametrize("quality", [90, 95])
def test_jpeg_approx_is_close_to_pillow(photos, quality):
    crops = [face_crop(p) for p in photos[:6]]
    for crop in crops:
        real = pil_jpeg(crop, quality)  # Pillow's default: 4:2:0 chroma subsampling
        approx = to_uint8(degrade.jpeg_approx(to_tensor(crop), quality))
        # The approximation is far closer to real JPEG than JPEG is to the original image.
        assert psnr(approx, real) > 44, psnr(approx, real)
        assert psnr(approx, real) > psnr(real, crop) + 6
    crop = crops[0]
    real444 = pil_jpeg(crop, quality, subsampling=0)
    approx444 = to_uint8(degrade.jpeg_approx(to_tensor(crop), quality, subsample=False))
    assert psnr(approx444, real444) > 47
    # Odd sizes are padded to whole blocks like libjpeg does.
    odd = photos[1][:101, :77]
    assert psnr(to_uint8(degrade.jpeg_approx(to_tensor(odd), quality)), pil_jpeg(odd, quality)) > 40


def test_jpeg_approx_passes_gradients_and_takes_per_sample_quality(photos):
    x = torch.cat([to_tensor(face_crop(photos[0], 64))] * 2).requires_grad_(True)
    out = degrade.jpeg_approx(x, torch.tensor([90.0, 10.0]))
    assert out.shape == x.shape
    # the same face at quality 10 loses much more than at 90, and matches Pillow at each quality
    err = (out - x).detach().abs().flatten(1).mean(1)
    assert err[1] > 2 * err[0], err
    for i, q in enumerate((90, 10)):
        assert psnr(to_uint8(out[i:i + 1]), pil_jpeg(to_uint8(x[i:i + 1]), q)) > 38
    target = torch.randn_like(x)
    (out * target).sum().backward()
    g = x.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # Straight-through rounding: the gradient is the linear codec's (identity on luma, low-pass on
    # the subsampled chroma), so it follows the upstream gradient closely.
    cos = torch.nn.functional.cosine_similarity(g.flatten(1), target.flatten(1), dim=1)
    assert torch.all(cos > 0.5), cos


# ---- resampling and paste-back --------------------------------------------------------------------


def test_affine_resample_matches_cv2_warp_affine(photos):
    img = photos[0][:200, :180]
    m = cv2.getRotationMatrix2D((90.3, 99.7), 13.0, 1.37)  # src -> dst
    ours = degrade.affine_resample(to_tensor(img), torch.from_numpy(cv2.invertAffineTransform(m)), (160, 150))
    ref = cv2.warpAffine(img.astype(np.float32), m, (150, 160), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    diff = np.abs((ours[0].permute(1, 2, 0).numpy() + 1) * 127.5 - ref)
    assert diff.mean() < 0.1 and diff.max() < 2.0, (diff.mean(), diff.max())  # cv2 snaps coordinates to 1/32 px


def test_gaussian_blur_matches_cv2(photos):
    img = photos[2][:120, :100].astype(np.float32)
    ours = degrade.gaussian_blur(to_tensor(img.astype(np.uint8)), 1.3)
    ref = cv2.GaussianBlur(img, (0, 0), 1.3, borderType=cv2.BORDER_REFLECT101)
    diff = np.abs((ours[0].permute(1, 2, 0).numpy() + 1) * 127.5 - ref)
    assert diff[4:-4, 4:-4].max() < 0.6, diff.max()  # cv2 truncates float kernels at 4 sigma, ours at 3


def test_elliptical_mask_equals_the_pipeline_paste_mask():
    for r in (64, 128, 256):
        ours = degrade.elliptical_mask(r, align._MASK_CENTER, align._MASK_AXES, align._MASK_FEATHER)
        np.testing.assert_allclose(ours.numpy(), align.paste_mask(r), atol=1e-6)


@pytest.mark.parametrize("photo_scale, angle_deg", [(1.6, 7.0), (2.6, -12.0)])
def test_paste_and_realign_matches_the_pipeline(photos, photo_scale, angle_deg):
    """Inside the paste mask, the torch model of paste-back + PNG + re-alignment agrees with the
    pipeline's OpenCV code run on a real photo with the same transform."""
    r = 128
    photo = photos[3]
    h, w = photo.shape[:2]
    # crop -> photo similarity placing the crop centre near the photo centre, at a sub-pixel offset
    a = math.radians(angle_deg)
    rot = photo_scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c_photo = np.array([w / 2 + 0.37, h / 2 - 0.21])
    c_crop = np.full(2, (r - 1) / 2)
    crop_to_photo = np.hstack([rot, (c_photo - rot @ c_crop)[:, None]])
    m = cv2.invertAffineTransform(crop_to_photo)  # the pipeline's image -> crop transform
    original = align.warp_to_crop(photo, m, r)
    # an "anonymised" face: the crop with a visible pattern, so errors in placement would show
    yy, xx = np.mgrid[0:r, 0:r]
    pattern = (40 * np.sin(xx / 3.0) * np.cos(yy / 5.0))[..., None]
    anon = np.clip(original.astype(np.float64) + pattern, 0, 255).astype(np.uint8)
    pasted = photo.copy()
    align.paste_back(pasted, anon, m)
    reread = align.warp_to_crop(pasted, m, r)  # PNG is lossless: the uint8 photo is what is read

    # The torch photo frame has its own size; the crop centre lands at frame centre + shift. Choose
    # the shift so the frame's pixel lattice has the same sub-pixel phase as the real photo's.
    side = degrade.photo_frame_side(r, photo_scale, abs(math.cos(a)) + abs(math.sin(a)))
    frac = c_photo - np.floor(c_photo)
    centre = (side - 1) / 2
    shift = torch.tensor(frac - (centre - math.floor(centre)))[None]
    out = degrade.paste_and_realign(to_tensor(anon), to_tensor(original), torch.from_numpy(align.paste_mask(r).copy()),
                                    photo_scale, torch.tensor([a]), shift)
    ours = to_uint8(out).astype(np.float64)
    # Where the mask is ~1 both read the pasted face; in the feathered rim the pipeline blends with the
    # real photo while the model blends with the (resampled) original crop.
    inside = align.paste_mask(r) > 0.95
    diff = np.abs(ours - reread.astype(np.float64))[inside]
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2, (diff.mean(), np.percentile(diff, 99))
    # ... and the pasted pattern really is what was read back (not the original).
    assert np.abs(ours - original)[inside].mean() > 10


def test_random_paste_is_reproducible_and_differentiable(photos):
    faces = torch.cat([to_tensor(face_crop(p)) for p in photos[:2]])
    mask = torch.from_numpy(align.paste_mask(128).copy())
    cfg = degrade.PasteBackConfig(jpeg_probability=1.0, noise_std=0.01)
    x = faces.clone().requires_grad_(True)
    a = degrade.random_paste_and_realign(x, faces, mask, cfg, torch.Generator().manual_seed(3))
    b = degrade.random_paste_and_realign(x, faces, mask, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    (a * mask).sum().backward()
    g = x.grad.abs().sum((0, 1))
    assert torch.isfinite(x.grad).all()
    # gradient reaches the generated face only where it is pasted
    assert g[mask > 0.5].mean() > 0.1 and g[mask == 0].max() < 1e-3 * g.max()


def test_identity_perturbations_are_mild_random_and_differentiable(photos):
    faces = torch.cat([to_tensor(face_crop(p)) for p in photos[:4]])
    cfg = degrade.IdentityPerturbConfig(jpeg_probability=1.0)
    x = faces.clone().requires_grad_(True)
    out = degrade.perturb_for_identity(x, cfg, torch.Generator().manual_seed(0))
    again = degrade.perturb_for_identity(x, cfg, torch.Generator().manual_seed(0))
    other = degrade.perturb_for_identity(x, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    diff = (out - faces).detach().abs().flatten(1).mean(1)
    assert torch.all(diff > 0.005) and torch.all(diff < 0.3), diff  # a few pixels of shift on detailed photos
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
