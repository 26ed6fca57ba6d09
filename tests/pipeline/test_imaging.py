"""Decode/encode: EXIF orientation, modes (grey, alpha), formats, errors, metadata stripping, determinism."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import ExifTags, Image

from helpers import encode
from pipeline.imaging import DecodeError, as_written_grey, decode_image, encode_image, output_format, writes_grey

BIG = 10**8


def _rng(seed=0):
    return np.random.default_rng(seed)


def _open(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# --- a hand-built EXIF block with GPS and an IFD1 thumbnail (PIL cannot write IFD1 itself) ---------------


def _ifd(entries, next_off: int, base: int) -> bytes:
    """One little-endian TIFF IFD at offset ``base``; values over 4 bytes are stored right after it."""
    n = len(entries)
    data_off = base + 2 + 12 * n + 4
    body, extra = b"", b""
    for tag, typ, count, val in entries:
        if isinstance(val, bytes) and len(val) > 4:
            body += struct.pack("<HHII", tag, typ, count, data_off + len(extra))
            extra += val + (b"\0" if len(val) % 2 else b"")
        elif isinstance(val, bytes):
            body += struct.pack("<HHI", tag, typ, count) + val.ljust(4, b"\0")
        else:
            body += struct.pack("<HHII", tag, typ, count, val)
    return struct.pack("<H", n) + body + struct.pack("<I", next_off) + extra


def _thumbnail_jpeg() -> bytes:
    return encode(np.full((12, 16, 3), (250, 10, 10), np.uint8), "JPEG")


def _exif_with_gps_and_thumbnail(orientation: int, thumb: bytes) -> bytes:
    def build(gps_off, ifd1_off, thumb_off):
        ifd0 = _ifd(
            [(0x010F, 2, 9, b"SpyCam42\0"), (0x0112, 3, 1, struct.pack("<H", orientation)), (0x8825, 4, 1, gps_off)],
            ifd1_off,
            8,
        )
        gps = _ifd([(0x0001, 2, 2, b"N\0"), (0x0002, 5, 3, struct.pack("<6I", 48, 1, 51, 1, 30, 1))], 0, gps_off)
        ifd1 = _ifd([(0x0103, 3, 1, struct.pack("<H", 6)), (0x0201, 4, 1, thumb_off), (0x0202, 4, 1, len(thumb))], 0, ifd1_off)
        return ifd0, gps, ifd1

    ifd0, gps, ifd1 = build(0, 0, 0)  # sizes do not depend on the offsets
    gps_off = 8 + len(ifd0)
    ifd1_off = gps_off + len(gps)
    ifd0, gps, ifd1 = build(gps_off, ifd1_off, ifd1_off + len(ifd1))
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd0 + gps + ifd1 + thumb


def _photo_with_exif(orientation: int = 6) -> tuple[bytes, bytes, np.ndarray]:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :8] = 255  # bright left columns: after orientation 6 they are the top rows
    thumb = _thumbnail_jpeg()
    data = encode(arr, "JPEG", quality=95, exif=_exif_with_gps_and_thumbnail(orientation, thumb))
    # the fixture really carries what the tests below expect to be removed
    ex = _open(data).getexif()
    assert ex[0x0112] == orientation and ex.get_ifd(ExifTags.IFD.GPSInfo)
    assert ex.get_ifd(ExifTags.IFD.IFD1)[0x0202] == len(thumb) and thumb in data
    return data, thumb, arr


# --- orientation ------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied_on_decode():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :8] = 255
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(arr, "JPEG", quality=95, exif=ex)
    assert _open(data).size == (40, 20)
    d = decode_image(data, BIG)
    assert d.rgb.shape == (40, 20, 3)  # transposed
    assert d.rgb.dtype == np.uint8 and d.rgb.flags.c_contiguous
    assert d.rgb[:6].mean() > 200 and d.rgb[10:].mean() < 30  # stored left edge is now the top
    assert d.format == "JPEG" and d.mode == "RGB" and d.alpha is None
    assert d.exif is None


def test_decoded_and_reencoded_image_is_not_rotated_twice():
    data, _, _ = _photo_with_exif(6)
    d = decode_image(data, BIG, keep_exif=True)
    out = encode_image(d.rgb, d.alpha, d.mode, d.format, 90, d.icc_profile, d.exif)
    assert 0x0112 not in _open(out).getexif()
    assert decode_image(out, BIG).rgb.shape == (40, 20, 3)


# --- modes --------------------------------------------------------------------------------------------


def test_grey_png_decodes_to_three_equal_channels_and_round_trips_as_L():
    grey = _rng(1).integers(0, 256, size=(24, 33), dtype=np.uint8)
    data = encode(grey, "PNG")
    d = decode_image(data, BIG)
    assert d.mode == "L" and d.alpha is None and d.format == "PNG"
    assert d.rgb.shape == (24, 33, 3)
    for c in range(3):
        np.testing.assert_array_equal(d.rgb[:, :, c], grey)
    out = encode_image(d.rgb, d.alpha, d.mode, "PNG", 90)
    im = _open(out)
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), grey)


def test_rgba_png_keeps_alpha_through_decode_and_encode():
    rgba = _rng(2).integers(0, 256, size=(17, 29, 4), dtype=np.uint8)
    data = encode(rgba, "PNG")
    d = decode_image(data, BIG)
    assert d.mode == "RGBA"
    np.testing.assert_array_equal(d.alpha, rgba[:, :, 3])
    np.testing.assert_array_equal(d.rgb, rgba[:, :, :3])
    out = encode_image(d.rgb, d.alpha, d.mode, "PNG", 90)
    im = _open(out)
    assert im.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(im), rgba)


def test_grey_alpha_png_round_trips_as_LA():
    la = _rng(3).integers(0, 256, size=(10, 12, 2), dtype=np.uint8)
    data = encode(la, "PNG")  # fromarray of (H, W, 2) is mode LA
    d = decode_image(data, BIG)
    assert d.mode == "LA"
    np.testing.assert_array_equal(d.alpha, la[:, :, 1])
    im = _open(encode_image(d.rgb, d.alpha, d.mode, "PNG", 90))
    assert im.mode == "LA"
    np.testing.assert_array_equal(np.asarray(im), la)


@pytest.mark.parametrize("mode,fmt,grey", [("L", "PNG", True), ("L", "JPEG", True), ("LA", "PNG", True),
                                           ("LA", "JPEG", False), ("RGB", "PNG", False), ("RGBA", "PNG", False)])
def test_writes_grey_says_what_the_encoder_writes_and_as_written_grey_is_what_decodes(mode, fmt, grey):
    """The redraw check judges draws of grey images in grey: it must know which images the encoder writes in
    grey and give exactly the pixels that decoding them gives (colour pixels, as a pasted draw leaves them)."""
    rgb = _rng(4).integers(0, 256, size=(21, 19, 3), dtype=np.uint8)
    alpha = _rng(5).integers(0, 256, size=(21, 19), dtype=np.uint8) if mode in ("LA", "RGBA") else None
    assert writes_grey(mode, alpha, fmt) == grey
    d = decode_image(encode_image(rgb, alpha, mode, fmt, 95), BIG)
    assert (d.mode in ("L", "LA")) == grey
    if grey and fmt == "PNG":
        np.testing.assert_array_equal(d.rgb, as_written_grey(rgb))
    if not grey and fmt == "PNG":
        np.testing.assert_array_equal(d.rgb, rgb)


def test_palette_png_with_transparency_gets_alpha():
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 4, 8))
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    d = decode_image(buf.getvalue(), BIG)
    assert d.mode == "RGBA"
    assert np.all(d.alpha[:, 4:] == 0) and np.all(d.alpha[:, :4] == 255)
    assert np.all(d.rgb[:, :4] == (255, 0, 0))


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    a16 = (np.arange(32 * 64).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    buf = io.BytesIO()
    Image.fromarray(a16).save(buf, "PNG")
    assert _open(buf.getvalue()).mode == "I;16"
    d = decode_image(buf.getvalue(), BIG)
    assert d.mode == "L"
    expected = (a16 >> 8).astype(np.int16)
    assert np.abs(d.rgb[:, :, 0].astype(np.int16) - expected).max() <= 1


# --- formats --------------------------------------------------------------------------------------------


def test_webp_decodes():
    arr = _rng(4).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    data = encode(arr, "WEBP", lossless=True)
    d = decode_image(data, BIG)
    assert d.format == "WEBP" and d.mode == "RGB"
    np.testing.assert_array_equal(d.rgb, arr)
    out = encode_image(d.rgb, d.alpha, d.mode, d.format, 90)
    assert _open(out).format == "WEBP"


def test_unsupported_format_is_a_decode_error():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    with pytest.raises(DecodeError, match="unsupported image format GIF"):
        decode_image(buf.getvalue(), BIG)


def test_output_format():
    assert output_format("WEBP", "keep") == "WEBP"
    assert output_format("JPEG", "png") == "PNG"
    assert output_format("PNG", "jpeg") == "JPEG"


# --- errors ---------------------------------------------------------------------------------------------


def test_empty_bytes_are_a_decode_error():
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"", BIG)


@pytest.mark.parametrize("data", [b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_bytes_are_a_decode_error(data):
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(data, BIG)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_a_decode_error(fmt):
    data = encode(_rng(5).integers(0, 256, size=(64, 64, 3), dtype=np.uint8), fmt)
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(data[: len(data) // 2], BIG)


def test_oversize_image_is_a_decode_error_naming_max_pixels():
    data = encode(np.zeros((100, 100, 3), np.uint8), "PNG")
    with pytest.raises(DecodeError) as ei:
        decode_image(data, max_pixels=9_999)
    msg = str(ei.value)
    assert "input.max_pixels=9999" in msg and "100x100" in msg
    assert decode_image(data, max_pixels=10_000).rgb.shape == (100, 100, 3)  # the limit itself is allowed


def test_decode_error_is_a_value_error():
    assert issubclass(DecodeError, ValueError)


def test_max_pixels_above_pils_own_limit_is_honoured(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # stands in for the ~89.5 MP default
    data = encode(np.zeros((40, 40, 3), np.uint8), "PNG")  # 1600 px: over PIL's limit, under the job's
    d = decode_image(data, max_pixels=10_000)
    assert d.rgb.shape == (40, 40, 3)


# --- metadata -------------------------------------------------------------------------------------------


def test_exif_with_gps_and_thumbnail_is_stripped_by_default():
    data, thumb, _ = _photo_with_exif(6)
    d = decode_image(data, BIG, keep_exif=False)
    assert d.exif is None
    out = encode_image(d.rgb, d.alpha, d.mode, d.format, 90, d.icc_profile, d.exif)
    im = _open(out)
    assert "exif" not in im.info
    assert len(im.getexif()) == 0
    assert b"Exif\0\0" not in out
    assert thumb not in out and thumb[2:64] not in out
    assert b"SpyCam42" not in out


def test_keep_exif_drops_the_thumbnail_and_orientation_but_keeps_the_rest():
    data, thumb, _ = _photo_with_exif(6)
    d = decode_image(data, BIG, keep_exif=True)
    assert d.exif is not None
    assert thumb not in d.exif and thumb[2:64] not in d.exif
    ex = Image.Exif()
    ex.load(d.exif)
    assert 0x0112 not in ex
    for tag in (0x0201, 0x0202):
        assert tag not in ex
        assert tag not in ex.get_ifd(ExifTags.IFD.IFD1)
    assert ex[0x010F] == "SpyCam42"
    assert ex.get_ifd(ExifTags.IFD.GPSInfo)[1] == "N"  # 'keep' keeps EXIF (GPS included) on purpose

    out = encode_image(d.rgb, d.alpha, d.mode, d.format, 90, d.icc_profile, d.exif)
    assert thumb not in out and thumb[2:64] not in out
    ex_out = _open(out).getexif()
    assert 0x0112 not in ex_out
    assert not ex_out.get_ifd(ExifTags.IFD.IFD1)
    assert ex_out[0x010F] == "SpyCam42"


def test_keep_exif_without_orientation_still_drops_the_thumbnail():
    data, thumb, _ = _photo_with_exif(1)
    d = decode_image(data, BIG, keep_exif=True)
    assert d.rgb.shape == (20, 40, 3)
    assert thumb not in d.exif and thumb[2:64] not in d.exif
    ex = Image.Exif()
    ex.load(d.exif)
    assert 0x0112 not in ex and not ex.get_ifd(ExifTags.IFD.IFD1)


def test_keep_exif_on_an_image_without_exif_gives_none():
    d = decode_image(encode(np.zeros((8, 8, 3), np.uint8), "JPEG"), BIG, keep_exif=True)
    assert d.exif is None


def _icc(space: bytes) -> bytes:
    """A profile header naming its data colour space (bytes 16-19); PIL stores profile bytes as given."""
    return b"\0\0\x01\0fake" + bytes(4) + b"mntr" + space + b"XYZ " + bytes(104)


def test_icc_profile_is_carried_through():
    icc = _icc(b"RGB ")
    data = encode(np.zeros((8, 8, 3), np.uint8), "PNG", icc_profile=icc)
    d = decode_image(data, BIG)
    assert d.icc_profile == icc
    out = encode_image(d.rgb, d.alpha, d.mode, d.format, 90, d.icc_profile)
    assert _open(out).info.get("icc_profile") == icc


@pytest.mark.parametrize("mode,fmt,space,kept", [
    ("RGB", "PNG", b"CMYK", False),  # a CMYK JPEG's profile on the RGB pixels written
    ("RGB", "JPEG", b"GRAY", False),
    ("L", "PNG", b"GRAY", True),
    ("LA", "PNG", b"GRAY", True),
    ("LA", "JPEG", b"GRAY", False),  # JPEG has no alpha: grey-alpha is written as RGB
    ("L", "JPEG", b"RGB ", False),
])
def test_a_profile_of_another_colour_space_than_the_output_is_dropped(mode, fmt, space, kept):
    rgb = np.full((8, 8, 3), 90, np.uint8)
    alpha = np.full((8, 8), 200, np.uint8) if mode == "LA" else None
    out = _open(encode_image(rgb, alpha, mode, fmt, 90, _icc(space)))
    assert (out.info.get("icc_profile") == _icc(space)) is kept, out.mode


def test_animated_images_are_a_decode_error_naming_the_frames():
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 120, 240)]
    for fmt in ("WEBP", "PNG"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100)
        with pytest.raises(DecodeError, match=f"animated {fmt} with 3 frames; only still images"):
            decode_image(buf.getvalue(), BIG)


def test_an_image_past_pillows_own_bomb_limit_names_max_pixels(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses at open() beyond twice this
    data = encode(np.zeros((40, 40, 3), np.uint8), "PNG")
    with pytest.raises(DecodeError, match=r"image exceeds input.max_pixels=400 \(.*\); raise input.max_pixels"):
        decode_image(data, max_pixels=400)


def test_png_text_chunks_are_not_carried_over():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "secret-location-xyz")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG", pnginfo=info)
    d = decode_image(buf.getvalue(), BIG, keep_exif=True)
    out = encode_image(d.rgb, d.alpha, d.mode, d.format, 90, d.icc_profile, d.exif)
    assert b"secret-location-xyz" not in out


# --- determinism ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,mode",
    [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("WEBP", "RGB"), ("WEBP", "RGBA")],
)
def test_encode_image_is_deterministic(fmt, mode):
    rng = _rng(6)
    rgb = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, size=(32, 48), dtype=np.uint8) if mode == "RGBA" else None
    a = encode_image(rgb, alpha, mode, fmt, 90)
    b = encode_image(rgb.copy(), None if alpha is None else alpha.copy(), mode, fmt, 90)
    assert a == b
    assert _open(a).format == fmt


def test_jpeg_quality_is_honoured():
    rgb = _rng(7).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    assert len(encode_image(rgb, None, "RGB", "JPEG", 30)) < len(encode_image(rgb, None, "RGB", "JPEG", 95))


def test_jpeg_output_drops_alpha():
    rgb = _rng(8).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    alpha = np.full((16, 16), 128, np.uint8)
    out = encode_image(rgb, alpha, "RGBA", "JPEG", 90)
    assert _open(out).mode == "RGB"
