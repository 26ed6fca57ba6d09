"""Image decode/encode with the metadata rules of the job (EXIF orientation applied, EXIF stripped).

Decoding gives an RGB uint8 array plus what is needed to write the image back in its own mode
(grey stays grey, alpha is re-attached). Nothing from the input's metadata is carried into the
output except the ICC colour profile, and EXIF only when the job explicitly keeps it (never the
embedded thumbnail, which is an unanonymized copy of the photo).
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Formats we read, by PIL name, and the file extension each is written with.
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
EXT_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

_EXIF_THUMBNAIL_TAGS = (0x0201, 0x0202)  # JPEGInterchangeFormat / ...Length: the IFD1 thumbnail
_EXIF_MAKERNOTE = 0x927C


class DecodeError(ValueError):
    pass


@dataclass
class DecodedImage:
    rgb: np.ndarray  # HxWx3 uint8, EXIF orientation applied
    alpha: np.ndarray | None  # HxW uint8 when the input had transparency
    mode: str  # "RGB" | "L" | "RGBA" | "LA": how to write it back
    format: str  # PIL format name of the input
    icc_profile: bytes | None
    exif: bytes | None  # only kept when the job asks for it; thumbnail and orientation removed


def decode_image(data: bytes, max_pixels: int, keep_exif: bool = False) -> DecodedImage:
    if not data:
        raise DecodeError("empty image (0 bytes)")
    # The job's own pixel cap replaces Pillow's global one (checked below, before any pixel is decoded).
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(
                    f"image of {w}x{h} pixels exceeds input.max_pixels={max_pixels}; raise it if the image is genuine"
                )
            if fmt == "MPO":  # multi-picture JPEG from phones: the first frame is the photo
                fmt = "JPEG"
            if fmt not in FORMAT_EXT:
                raise DecodeError(f"unsupported image format {fmt}; supported: JPEG, PNG, WebP")
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format != "MPO":  # publishing frame 1 alone would drop the others unseen
                raise DecodeError(f"animated {fmt} with {frames} frames; only still images are anonymized: store "
                                  "each frame as a sample of its own")
            img.load()
            icc = img.info.get("icc_profile")
            img = ImageOps.exif_transpose(img)
        except DecodeError:
            raise
        except Image.DecompressionBombError as e:  # Pillow's own cap (2x its limit) struck before ours
            raise DecodeError(f"image exceeds input.max_pixels={max_pixels} ({_public_message(e)}); raise "
                              "input.max_pixels if the image is genuine") from None
        except Exception as e:  # corrupt files raise all sorts (struct.error, TypeError, ...): all are per-sample
            raise DecodeError(f"cannot decode image: {type(e).__name__}: {_public_message(e)}") from None
    exif = None
    if keep_exif:
        try:
            exif = _kept_exif(img)
        except Exception as e:
            raise DecodeError(f"cannot read EXIF (output.metadata.exif is 'keep'): {type(e).__name__}") from None
    alpha = None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba)[:, :, 3].copy()
        out_mode = "LA" if img.mode == "LA" else "RGBA"
        rgb = np.ascontiguousarray(np.asarray(rgba)[:, :, :3])
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits (Pillow's convert("L") would clip everything above 255 to white).
        wide = np.asarray(img).astype(np.int64)
        shift = 8 if img.mode.startswith("I;16") or wide.max(initial=0) > 255 else 0
        grey = np.clip(wide >> shift, 0, 255).astype(np.uint8)
        out_mode = "L"
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    elif img.mode in ("L", "1"):
        out_mode = "L"
        rgb = np.asarray(img.convert("L").convert("RGB"))
    else:
        out_mode = "RGB"
        rgb = np.asarray(img.convert("RGB"))
    return DecodedImage(np.ascontiguousarray(rgb), alpha, out_mode, fmt, icc, exif)


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _public_message(e: Exception) -> str:
    """Exception text safe for the public manifest: no object addresses (they break byte-identical reruns)."""
    return _ADDRESS.sub("<stream>", str(e))[:200]


def _kept_exif(img: Image.Image) -> bytes | None:
    ex = img.getexif()
    for tag in _EXIF_THUMBNAIL_TAGS + (_EXIF_MAKERNOTE, 0x0112):  # orientation is applied to the pixels
        ex.pop(tag, None)
    sub = ex.get_ifd(0x8769)  # Exif sub-IFD: maker notes often embed a full preview JPEG
    sub.pop(_EXIF_MAKERNOTE, None)
    # Pillow writes IFD0 and its sub-IFDs only, never IFD1 (the thumbnail), so the thumbnail cannot survive.
    return ex.tobytes() if len(ex) else None


def encode_image(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    mode: str,
    fmt: str,
    jpeg_quality: int,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> bytes:
    """Encode deterministically; nothing but ICC (and EXIF when given) is written as metadata. The image is
    written in grey where ``writes_grey`` says so."""
    img = Image.fromarray(rgb, "RGB")
    if mode == "L":
        img = img.convert("L")
    elif mode in ("RGBA", "LA") and alpha is not None and fmt != "JPEG":
        img.putalpha(Image.fromarray(alpha, "L"))
        if mode == "LA":
            img = img.convert("LA")
    kwargs: dict = {}
    if icc_profile and _icc_colour_space(icc_profile) == ("GRAY" if img.mode in ("L", "LA") else "RGB"):
        # a CMYK (or grey) profile on RGB pixels would misdescribe them: such a profile is dropped
        kwargs["icc_profile"] = icc_profile
    if exif:
        kwargs["exif"] = exif
    if fmt == "JPEG":
        kwargs.update(quality=jpeg_quality, optimize=False, progressive=False)
    elif fmt == "PNG":
        kwargs.update(compress_level=6)
    elif fmt == "WEBP":
        kwargs.update(quality=jpeg_quality, method=4)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _icc_colour_space(profile: bytes) -> str | None:
    """The data colour space an ICC profile describes ('RGB', 'GRAY', 'CMYK', ...; header bytes 16-19)."""
    return profile[16:20].decode("ascii", "replace").strip() if len(profile) >= 128 else None


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """RGB uint8 through Pillow JPEG at ``quality`` (its default 4:2:0 chroma subsampling) and back: the JPEG
    copy the evaluation reads payloads from, and the channel extractor tuning trains on."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def output_format(input_format: str, image_format: str) -> str:
    """PIL format to write: the input's ('keep') or the job's."""
    if image_format == "keep":
        return input_format
    return {"png": "PNG", "jpeg": "JPEG"}[image_format]


def writes_grey(mode: str, alpha: np.ndarray | None, fmt: str) -> bool:
    """``encode_image`` writes an image of this decoded ``mode`` in grey (L, or LA where the alpha is kept)."""
    return mode == "L" or (mode == "LA" and alpha is not None and fmt != "JPEG")


def as_written_grey(rgb: np.ndarray) -> np.ndarray:
    """RGB pixels (H, W, 3) uint8 as a grey image written by ``encode_image`` decodes: Pillow's luma,
    repeated in all three channels."""
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"))
    return np.repeat(grey[..., None], 3, axis=2)


def crops_uint8(y) -> np.ndarray:
    """Model outputs (B, 3, R, R) in [0, 1], a torch tensor on any device, as the 8-bit crops (B, R, R, 3) that
    are pasted into the photos. Every place that turns a model output into pixels uses this, so that the redraw
    check judges exactly the pixels the anonymize stage publishes."""
    return y.detach().mul(255.0).round_().clamp_(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
