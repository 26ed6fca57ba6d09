"""What happens to a face between the generator and the payload extractor, as differentiable torch ops.

The pipeline pastes each anonymised crop back into its photo through a feathered mask, rounds to 8 bits,
encodes PNG or JPEG, and to read the payload re-aligns the face with the stored transform (bilinear
resampling out and back). The hiding loss must see all of that, so every step here is differentiable or
straight-through (exact forward, identity backward):

- ``affine_resample``: bilinear resampling under a pixel-space affine map (cv2's pixel-centre convention);
- ``paste_and_realign``: mask composite with the original, similarity warp into a photo frame, 8-bit
  quantisation and optional JPEG there, anti-aliased warp back to the crop, 8-bit again;
- ``quantize_8bit``: rounding to 256 levels, straight-through;
- ``jpeg_approx``: JPEG as libjpeg does it (YCbCr, 4:2:0 chroma subsampling, 8x8 DCT, IJG quantisation
  tables scaled by quality, rounding) with straight-through rounding;
- ``perturb_for_identity``: random shift/scale, blur and JPEG-like artefacts, so identity losses cannot
  be satisfied by an imperceptible pattern aimed at one recogniser.

Images are (B, 3, H, W) in **[-1, 1]** (the training hooks' range) unless a function says otherwise.
Random parameters come from a caller-supplied ``torch.Generator`` (CPU), so runs resume exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Straight-through rounding and 8-bit quantisation


def round_st(x: Tensor) -> Tensor:
    """Round to the nearest integer in the forward pass; identity gradient."""
    return x + (torch.round(x) - x).detach()


def quantize_8bit(x: Tensor) -> Tensor:
    """What saving as 8-bit PNG does to an image in [-1, 1]: clamp, round to 256 levels.

    The clamp keeps its true gradient (zero outside the range); the rounding is straight-through.
    """
    pixels = (x.clamp(-1, 1) + 1) * 127.5
    return round_st(pixels) / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# Resampling


def _homogeneous(m: Tensor) -> Tensor:
    """(..., 2, 3) -> (..., 3, 3)."""
    last = torch.zeros(m.shape[:-2] + (1, 3), dtype=m.dtype, device=m.device)
    last[..., 0, 2] = 1
    return torch.cat([m, last], -2)


def affine_resample(image: Tensor, dst_to_src: Tensor, out_size: tuple[int, int],
                    padding_mode: str = "border") -> Tensor:
    """Bilinear resampling: output pixel (x, y) reads the input at ``dst_to_src @ (x, y, 1)``.

    Args:
        image: (B, C, H, W).
        dst_to_src: (B, 2, 3) or (2, 3) affine map from output to input pixel coordinates, pixel i
            centred at coordinate i (the convention of cv2.warpAffine with WARP_INVERSE_MAP).
        out_size: (height, width) of the output.
        padding_mode: grid_sample's rule outside the input ("border" repeats the edge, as cv2's
            BORDER_REPLICATE does).
    """
    b, _, h, w = image.shape
    oh, ow = out_size
    m = dst_to_src.to(torch.float64).cpu()
    if m.ndim == 2:
        m = m.expand(b, 2, 3)
    assert m.shape == (b, 2, 3), m.shape

    def norm(width: int, height: int) -> Tensor:  # pixel -> normalised, separate sizes per axis
        n = torch.eye(3, dtype=torch.float64)
        n[0, 0], n[0, 2] = 2.0 / width, 1.0 / width - 1.0
        n[1, 1], n[1, 2] = 2.0 / height, 1.0 / height - 1.0
        return n

    theta = norm(w, h) @ _homogeneous(m) @ torch.linalg.inv(norm(ow, oh))
    theta = theta[:, :2].to(device=image.device, dtype=image.dtype)
    grid = F.affine_grid(theta, [b, image.shape[1], oh, ow], align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def gaussian_kernel1d(sigma: Tensor, radius: int) -> Tensor:
    """(B,) sigmas -> (B, 2*radius+1) normalised Gaussian taps (a sigma of 0 gives a delta)."""
    x = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    s = sigma.clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(image: Tensor, sigma: Tensor | float) -> Tensor:
    """Separable Gaussian blur with one sigma per sample (reflect padding, as cv2's BORDER_REFLECT101).

    Args:
        image: (B, C, H, W).
        sigma: a float or (B,) sigmas in pixels; 0 leaves a sample unchanged.
    """
    b, c, h, w = image.shape
    sigma = torch.as_tensor(sigma, dtype=image.dtype, device=image.device).expand(b)
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    radius = min(radius, h - 1, w - 1)
    taps = gaussian_kernel1d(sigma, radius).to(image.dtype)  # (B, K)
    weight = taps.repeat_interleave(c, 0)  # one filter per (sample, channel)
    x = image.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), weight[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), weight[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def similarity_matrices(scale: Tensor, angle: Tensor, shift: Tensor, center_src: float,
                        center_dst: float) -> Tensor:
    """(B, 2, 3) maps p -> scale * R(angle) (p - center_src) + center_dst + shift (pixel coordinates)."""
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    m = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2).to(torch.float64)
    t = center_dst + shift.to(torch.float64) - m @ torch.full((2,), float(center_src), dtype=torch.float64)
    return torch.cat([m, t[..., None]], -1)


def _invert(m: Tensor) -> Tensor:
    return torch.linalg.inv(_homogeneous(m))[..., :2, :]


# ---------------------------------------------------------------------------------------------
# JPEG

# The example quantisation tables of the JPEG standard (Annex K), row-major over (v, u).
_LUMA_TABLE = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]
_CHROMA_TABLE = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
] + [99] * 32


def quantization_table(quality: Tensor | float, chroma: bool) -> Tensor:
    """IJG (libjpeg, Pillow) quality scaling of the standard table: (B,) qualities -> (B, 8, 8)."""
    q = torch.as_tensor(quality, dtype=torch.float64).reshape(-1).clamp(1, 100)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    base = torch.tensor(_CHROMA_TABLE if chroma else _LUMA_TABLE, dtype=torch.float64).reshape(1, 8, 8)
    return torch.floor((base * scale[:, None, None] + 50) / 100).clamp(1, 255)


def dct_matrix(n: int = 8) -> Tensor:
    """Orthonormal DCT-II matrix D (coefficients = D @ block @ D.T)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def rgb_to_ycbcr(rgb: Tensor) -> Tensor:
    """JFIF full-range conversion on the 0..255 scale, (B, 3, H, W)."""
    r, g, b = rgb.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return torch.stack([y, cb, cr], 1)


def ycbcr_to_rgb(ycc: Tensor) -> Tensor:
    y, cb, cr = ycc[:, 0], ycc[:, 1] - 128, ycc[:, 2] - 128
    return torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)


def _blockwise_quantize(plane: Tensor, table: Tensor) -> Tensor:
    """Level-shifted 8x8 DCT, divide by the table, round (straight-through), multiply back, inverse DCT.

    plane: (B, H, W) samples on 0..255 with H, W multiples of 8; table: (B, 8, 8).
    """
    b, h, w = plane.shape
    d = dct_matrix().to(plane.device, plane.dtype)
    blocks = (plane - 128).reshape(b, h // 8, 8, w // 8, 8).transpose(2, 3)  # (B, by, bx, 8, 8)
    coef = d @ blocks @ d.T
    q = table.to(plane.device, plane.dtype)[:, None, None]
    coef = round_st(coef / q) * q
    out = d.T @ coef @ d
    return out.transpose(2, 3).reshape(b, h, w) + 128


def jpeg_approx(image: Tensor, quality: Tensor | float, subsample: bool = True) -> Tensor:
    """Differentiable JPEG round trip of images in [-1, 1], close to libjpeg/Pillow at the same quality.

    Args:
        image: (B, 3, H, W) in [-1, 1].
        quality: IJG quality (1-100), one float or one per sample (B,).
        subsample: 4:2:0 chroma (Pillow's default) instead of 4:4:4.

    The encoder's and decoder's roundings (8-bit samples, DCT coefficients, output pixels) are
    straight-through; chroma is averaged over 2x2 and upsampled back with libjpeg's "fancy" triangular
    filter (bilinear with half-pixel centres). Edges are padded by replication to whole MCUs.
    """
    b, c, h, w = image.shape
    assert c == 3, image.shape
    quality = torch.as_tensor(quality, dtype=torch.float64).reshape(-1).expand(b)
    mcu = 16 if subsample else 8
    ph, pw = (-h) % mcu, (-w) % mcu
    pixels = round_st((image.clamp(-1, 1) + 1) * 127.5)
    ycc = round_st(rgb_to_ycbcr(pixels)).clamp(0, 255)
    ycc = F.pad(ycc, (0, pw, 0, ph), mode="replicate")
    luma = _blockwise_quantize(ycc[:, 0], quantization_table(quality, chroma=False))
    chroma = ycc[:, 1:]
    if subsample:
        chroma = F.avg_pool2d(chroma, 2)
    hh, ww = chroma.shape[-2:]
    table = quantization_table(quality, chroma=True)
    chroma = _blockwise_quantize(chroma.reshape(b * 2, hh, ww), table.repeat_interleave(2, 0)).reshape(b, 2, hh, ww)
    if subsample:
        chroma = F.interpolate(chroma.clamp(0, 255), scale_factor=2, mode="bilinear", align_corners=False)
    ycc = torch.cat([luma[:, None], chroma], 1)[:, :, :h, :w]
    rgb = ycbcr_to_rgb(round_st(ycc.clamp(0, 255)))
    return round_st(rgb.clamp(0, 255)) / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# Paste-back and re-alignment


def elliptical_mask(resolution: int, center: tuple[float, float], axes: tuple[float, float], feather: float) -> Tensor:
    """Feathered elliptical paste mask in crop units (smoothstep edge), (R, R) float32 in [0, 1].

    With the pipeline's constants this equals ``pipeline.align.paste_mask`` (checked in the tests); the
    training code takes the mask as an argument so this library never imports the pipeline.
    """
    ys, xs = torch.meshgrid(torch.arange(resolution, dtype=torch.float64) + 0.5,
                            torch.arange(resolution, dtype=torch.float64) + 0.5, indexing="ij")
    r = torch.sqrt(((xs - center[0] * resolution) / (axes[0] * resolution)) ** 2
                   + ((ys - center[1] * resolution) / (axes[1] * resolution)) ** 2)
    t = ((1 - r) / feather).clamp(0, 1)
    return (t * t * (3 - 2 * t)).float()


@dataclass(frozen=True)
class PasteBackConfig:
    """Random re-alignment and encoding seen by the hiding loss.

    Args:
        photo_scale: range of photo pixels per crop pixel (the face's size in the photo / the crop's).
            The demo portraits sit at 1.2-2.9; below 1 the face is smaller than the crop and detail is lost.
        max_angle_deg: largest in-plane rotation of the face in the photo.
        jpeg_probability: chance that a batch is JPEG-encoded in the photo frame instead of PNG.
        jpeg_quality: (low, high) IJG quality drawn uniformly when JPEG is used.
        noise_std: std of Gaussian noise added before extraction ([-1, 1] units; the official 0.01).
    """

    photo_scale: tuple[float, float] = (1.0, 3.0)
    max_angle_deg: float = 20.0
    jpeg_probability: float = 0.5
    jpeg_quality: tuple[float, float] = (88.0, 96.0)
    noise_std: float = 0.0


def photo_frame_side(resolution: int, photo_scale: float, spread: float) -> int:
    """Side of the square photo frame holding a crop scaled by ``photo_scale`` and rotated so that its
    bounding box grows by ``spread`` (= |cos a| + |sin a|), with a 2 px margin."""
    return int(math.ceil(resolution * photo_scale * spread)) + 4


def paste_and_realign(face: Tensor, original: Tensor, mask: Tensor, photo_scale: float, angle: Tensor,
                      shift: Tensor, jpeg_quality: Tensor | float | None = None) -> Tensor:
    """The pipeline's paste-back, encoding and re-alignment of aligned crops, differentiably.

    Args:
        face: generated crops (B, 3, R, R) in [-1, 1].
        original: the crops they replace (B, 3, R, R): what the photo shows outside the paste mask.
        mask: (R, R) paste mask in [0, 1] (``pipeline.align.paste_mask``).
        photo_scale: photo pixels per crop pixel (shared by the batch: it sets the photo frame's size).
        angle: (B,) rotation of each face in the photo, radians.
        shift: (B, 2) sub-pixel offset of each face in the photo, photo pixels.
        jpeg_quality: None for PNG, else the JPEG quality (float or (B,)).

    Steps: composite in crop space (the warp is linear, so this equals compositing in the photo) ->
    bilinear warp into the photo frame -> 8-bit rounding (and JPEG) -> Gaussian pre-blur when the
    re-alignment shrinks by more than 2x (as ``pipeline.align.warp_to_crop``) -> bilinear warp back ->
    8-bit rounding (the pipeline's re-aligned crop is uint8).
    """
    b, _, r, _ = face.shape
    assert original.shape == face.shape and mask.shape == (r, r), (face.shape, original.shape, mask.shape)
    m = mask.to(face.device, face.dtype)
    composite = m * face + (1 - m) * original
    # Photo frame just large enough for the rotated crop (the warp back never reads outside it).
    spread = float((angle.double().cos().abs() + angle.double().sin().abs()).max())
    side = photo_frame_side(r, photo_scale, spread)
    scale = torch.full((b,), float(photo_scale), dtype=torch.float64)
    crop_to_photo = similarity_matrices(scale, angle.double().cpu(), shift.double().cpu(), (r - 1) / 2, (side - 1) / 2)
    photo = affine_resample(composite, _invert(crop_to_photo), (side, side))
    photo = quantize_8bit(photo)
    if jpeg_quality is not None:
        photo = jpeg_approx(photo, jpeg_quality)
    crop_scale = 1.0 / photo_scale
    if crop_scale < 0.5:
        photo = gaussian_blur(photo, 0.5 / crop_scale * 0.5)
    back = affine_resample(photo, crop_to_photo, (r, r))
    return quantize_8bit(back)


def random_paste_and_realign(face: Tensor, original: Tensor, mask: Tensor, config: PasteBackConfig,
                             generator: torch.Generator) -> Tensor:
    """``paste_and_realign`` with parameters drawn from ``config`` (then the optional Gaussian noise)."""
    b = face.shape[0]
    u = torch.rand(4 + 2 * b + b, generator=generator, dtype=torch.float64)
    lo, hi = config.photo_scale
    photo_scale = lo + (hi - lo) * float(u[0])
    angle = (u[4:4 + b] * 2 - 1) * math.radians(config.max_angle_deg)
    shift = u[4 + b:4 + 3 * b].reshape(b, 2) - 0.5
    quality = None
    if float(u[1]) < config.jpeg_probability:
        qlo, qhi = config.jpeg_quality
        quality = qlo + (qhi - qlo) * float(u[2])
    out = paste_and_realign(face, original, mask, photo_scale, angle, shift, quality)
    if config.noise_std > 0:
        out = out + config.noise_std * torch.randn(out.shape, generator=generator).to(out.device, out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Perturbations for the identity losses


@dataclass(frozen=True)
class IdentityPerturbConfig:
    """Random perturbations applied to generated faces before the identity network.

    Args:
        max_shift: largest translation, as a fraction of the side.
        scale: (low, high) zoom factor range.
        max_angle_deg: largest rotation.
        blur_sigma: (low, high) Gaussian blur sigma range in pixels (0 = sharp).
        jpeg_quality: (low, high) quality range of the JPEG-like artefacts.
        jpeg_probability: chance per batch of applying the JPEG-like artefacts.
    """

    max_shift: float = 0.03
    scale: tuple[float, float] = (0.95, 1.05)
    max_angle_deg: float = 5.0
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    jpeg_quality: tuple[float, float] = (60.0, 95.0)
    jpeg_probability: float = 0.5


def perturb_for_identity(image: Tensor, config: IdentityPerturbConfig, generator: torch.Generator) -> Tensor:
    """Randomly shifted, scaled, rotated, blurred and JPEG-degraded copies (per-sample parameters)."""
    b, _, h, w = image.shape
    u = torch.rand(b, 6, generator=generator, dtype=torch.float64)
    slo, shi = config.scale
    scale = slo + (shi - slo) * u[:, 0]
    angle = (u[:, 1] * 2 - 1) * math.radians(config.max_angle_deg)
    shift = (u[:, 2:4] * 2 - 1) * config.max_shift * h
    m = similarity_matrices(scale, angle, shift, (h - 1) / 2, (h - 1) / 2)
    out = affine_resample(image, _invert(m), (h, w), padding_mode="reflection")
    blo, bhi = config.blur_sigma
    if bhi > 0:
        out = gaussian_blur(out, (blo + (bhi - blo) * u[:, 4]).to(out.dtype))
    if float(torch.rand(1, generator=generator)) < config.jpeg_probability:
        qlo, qhi = config.jpeg_quality
        out = jpeg_approx(out, qlo + (qhi - qlo) * u[:, 5])
    return out
