"""Payload reinforcement: nudge each reversible g2face crop, by a few grey levels, until the payload extractor
reads its bits with a margin from the image as it will be written.

The generator hides the payload, but the bits then pass through the publishing channel: the 8-bit crop is
pasted into the photo through the inverse alignment (resampled and feathered), the image is encoded in the
job's format, and verification re-aligns the written pixels with the stored transform. Each step here runs
that channel for real (``align.paste_back``, the job's encoder when it is lossy, ``align.warp_to_crop``),
takes the extractor's gradient with respect to the read-back crop, carries it back through the channel's
linear part to the crop (``ChannelAdjoint``), and moves every pixel of the crop by ``step`` grey levels
against its sign (projected gradient descent). Carrying it back matters where the channel is far from the
identity: a small face is shrunk on paste, so many crop pixels share one written pixel, and where a crop
reaches past the image border verification reads a mirror of pixels the face wrote inside it. The codec is
not linearised: its response is read for real each step. The total change per pixel is capped at
``max_change`` grey levels, so the anonymized face is visibly the same; a face whose bits all read with the
margin stops changing (and is read again while a neighbour in its image still moves). Only the extractor runs
(no generator pass), batched across the images of a batch, on the anonymizer's device (the GPU model pool
when there is one); the adjoint runs on the CPU (about 10 ms per face and step at 128 px). For JPEG output only a tile around the faces, on JPEG's block grid, goes
through the codec each step, so large photos stay cheap; WebP goes through whole.

Only reversible faces are reinforced: their bits are the encrypted payload. An irreversible face hides
seeded random bits that nobody will read, so it is left as the generator made it. The bits are ciphertext
plus error correction; pushing the image towards them reveals nothing the payload does not.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import align
from .imaging import decode_image, encode_image
from .verify import crops_tensor

# ChannelAdjoint models a face's image region on a grid of at most this many crops' worth of pixels.
MAX_EXACT_REGION = 4
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # Pillow's RGB -> L (ITU-R 601-2 luma)
LOSSLESS = {("PNG", "RGB"), ("PNG", "RGBA")}  # format/mode pairs whose encoding returns the pixels unchanged


@dataclass(frozen=True)
class ReinforceSettings:
    """Args:
        steps: projected-gradient steps per face (0: off).
        max_change: the most any pixel of the anonymized crop may move, in whole grey levels (>= 1).
        step: grey levels per step.
        margin: bit-logit margin a face must reach on every bit to stop early.
    """

    steps: int = 12
    max_change: int = 6
    step: float = 1.0
    margin: float = 2.0

    def __post_init__(self):
        if self.steps < 0 or int(self.max_change) != self.max_change or self.max_change < 1 or self.step <= 0 \
                or self.margin < 0:
            raise ValueError(f"invalid payload reinforcement settings {self}")


def margin_loss(logits: torch.Tensor, bits: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over faces and bits of softplus(margin - s * logit), s = +1 for a 1 bit and -1 for a 0 bit."""
    assert logits.shape == bits.shape, (logits.shape, bits.shape)
    return F.softplus(margin - (bits * 2 - 1) * logits).sum()


def margin_gradient(bit_logits, crops: np.ndarray, bits: np.ndarray, margin: float,
                    device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(gradient of ``margin_loss`` w.r.t. uint8 read-back crops (N, R, R, 3), float32 per unit of [0, 1];
    the smallest signed bit margin of each face (N,)). ``bit_logits``: differentiable logits of crops in [0, 1]."""
    x = crops_tensor(crops, device).requires_grad_(True)
    b = torch.from_numpy(np.asarray(bits, np.float32)).to(device)
    with torch.enable_grad():
        logits = bit_logits(x).float()
        (g,) = torch.autograd.grad(margin_loss(logits, b, margin), x)
    worst = ((b * 2 - 1) * logits.detach()).min(dim=1).values
    return g.permute(0, 2, 3, 1).cpu().numpy(), worst.cpu().numpy()


def published_crops(samples: list, crops: dict, fmt_of: dict, jpeg_quality: int, read: list | None = None,
                    check_resolution: int | None = None) -> dict:
    """Read-back crops ((sample index, face index) -> uint8 crop) of the faces in ``read`` (default: every key
    of ``crops``): each of their samples with every face pasted (``crops`` where given, else ``face.crop``),
    through the output encoding when it is lossy, and those faces re-aligned with their stored transforms, as
    verification will; with ``check_resolution``, cut at that side as the metrics stage cuts them instead."""
    from .metrics_stage import face_crops

    out = {}
    by_sample: dict[int, list[int]] = {}
    for si, fi in (crops if read is None else read):
        by_sample.setdefault(si, []).append(fi)
    for si, face_ids in by_sample.items():
        s = samples[si]
        img = s.image
        rgb = img.rgb.copy()
        boxes = {}
        for fi, f in enumerate(s.faces):
            boxes[fi] = align.paste_back(rgb, crops.get((si, fi), f.crop), f.transform)
            if boxes[fi] is None:
                raise ValueError(f"face {fi} lies outside the image after alignment")
        fmt = fmt_of[si]
        if (fmt, img.mode) not in LOSSLESS:
            rgb = _through_codec(rgb, img, fmt, jpeg_quality, [boxes[fi] for fi in face_ids])
        res = s.faces[face_ids[0]].crop.shape[0]
        for fi in face_ids:
            m = s.faces[fi].transform
            out[(si, fi)] = (align.warp_to_crop(rgb, m, res) if check_resolution is None
                             else face_crops(rgb, m, res, check_resolution))
    return out


def _through_codec(rgb: np.ndarray, img, fmt: str, quality: int, boxes: list) -> np.ndarray:
    """``rgb`` as the output encoder and a decoder will see it, where the faces in ``boxes`` are read.

    JPEG codes 16 x 16 blocks on a grid anchored at the image origin, each independently of pixels beyond its
    neighbours, so a tile that starts on that grid and reaches a block past every box decodes to the same pixels
    there as the whole image does: only that tile goes through the codec (large photos stay cheap); so does
    PNG, whose only loss here is the pixel-wise conversion of grey images. WebP predicts across the whole frame
    and goes through whole."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = 0, 0, w, h
    if fmt in ("JPEG", "PNG"):  # PNG here: a grey or LA image, converted pixel by pixel
        grid = 16
        x0 = max((min(b[0] for b in boxes) // grid - 1) * grid, 0)
        y0 = max((min(b[1] for b in boxes) // grid - 1) * grid, 0)
        x1 = min((-(-max(b[2] for b in boxes) // grid) + 1) * grid, w)
        y1 = min((-(-max(b[3] for b in boxes) // grid) + 1) * grid, h)
    tile = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    alpha = None if img.alpha is None else np.ascontiguousarray(img.alpha[y0:y1, x0:x1])
    data = encode_image(tile, alpha, img.mode, fmt, quality, img.icc_profile, None)
    out = rgb.copy()
    out[y0:y1, x0:x1] = decode_image(data, tile.shape[0] * tile.shape[1]).rgb
    return out


def _to_grid(coords: np.ndarray, size: int) -> np.ndarray:
    """Pixel-centre coordinates -> ``grid_sample``'s [-1, 1] (align_corners=True: -1 and 1 are the centres of
    the first and last pixel, cv2's convention)."""
    return coords * (2.0 / max(size - 1, 1)) - 1.0


def _reflect101(x: np.ndarray, last: float) -> np.ndarray:
    """cv2's BORDER_REFLECT101 on continuous coordinates whose edge pixel centres are 0 and ``last``: mirror
    about them (bilinear sampling commutes with it, so reflecting the sample point equals reflecting each tap)."""
    if last <= 0:
        return np.zeros_like(x)
    x = np.mod(x, 2.0 * last)
    return np.where(x > last, 2.0 * last - x, x)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur's kernel for 8-bit images at ``sigma`` (size round(6 sigma + 1), odd), normalised."""
    size = int(round(sigma * 6 + 1)) | 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return torch.from_numpy((k / k.sum()).astype(np.float32))


class ChannelAdjoint:
    """The publishing channel of one face, linearised, run backwards: turns a gradient with respect to the crop
    verification reads into a gradient with respect to the crop the face pastes.

    The channel is ``align.paste_back`` (bilinear warp of the crop into the image through the inverse transform,
    weighted by the warped feathered mask) followed by ``align.warp_to_crop`` (a Gaussian pre-blur when it
    shrinks by more than 2x, then a bilinear warp with reflect-101 borders); both are linear in the crop, so
    autograd through a ``grid_sample`` copy of them, restricted to the region the crop touches, gives the
    adjoint up to the 8-bit rounding. A region larger than ``MAX_EXACT_REGION`` crops (a big face in a big
    photo: megapixels) is modelled on a coarser image grid of that many crops' pixels, still finer than the
    crop's own pitch, where the pre-blur shrinks in proportion. Pixels outside the region are the photo's own and
    do not depend on the crop; neither do the other faces of the image (their overlaps are read for real each
    step).

    Args:
        m: the face's 2x3 image -> crop transform.
        resolution: crop side in pixels.
        width, height: the image's size.
        grey: the image is written grey (mode L or LA): each written pixel is the luma of the three channels.
    """

    def __init__(self, m: np.ndarray, resolution: int, width: int, height: int, grey: bool = False):
        scale = align.transform_scale(m)
        box = align.paste_region(m, resolution, width, height)
        area = 1 if box is None else (box[2] - box[0]) * (box[3] - box[1])
        pitch = min(1.0, np.sqrt(MAX_EXACT_REGION * resolution ** 2 / area))  # model pixels per image pixel
        m = np.array(m, dtype=np.float64)
        m[:, :2] /= pitch
        last_x, last_y = (width - 1) * pitch, (height - 1) * pitch  # the edge pixel centres on that grid
        box = align.paste_region(m, resolution, int(np.ceil(last_x)) + 1, int(np.ceil(last_y)) + 1)
        if box is None:
            raise ValueError("the face lies outside the image after alignment")
        x0, y0, x1, y1 = box
        self.resolution = resolution
        self.grey = grey
        self.region = (y1 - y0, x1 - x0)
        # sides of the region on the image border (left, right, top, bottom): the pre-blur mirrors there
        self.on_border = (x0 == 0, x1 >= int(np.ceil(last_x)) + 1, y0 == 0, y1 >= int(np.ceil(last_y)) + 1)
        # paste: each pixel of the region samples the crop at its crop coordinates (BORDER_REPLICATE)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        c = align.apply_transform(m, np.stack([xs.ravel(), ys.ravel()], 1))
        self.paste_grid = self._grid(c[:, 0], c[:, 1], resolution, resolution, self.region)
        inv = cv2.invertAffineTransform(m)
        self.alpha = torch.from_numpy(align.paste_alpha(m, resolution, (x0, y0, x1, y1)))[None, None]
        # warp_to_crop's pre-blur (sigma 0.25 / scale image pixels), on this grid
        self.blur = _gaussian_kernel(0.5 / scale * 0.5 * pitch) if scale < 0.5 else None
        # read: each crop pixel samples the image at its image coordinates, mirrored at the image border
        vs, us = np.mgrid[0:resolution, 0:resolution].astype(np.float64)
        p = align.apply_transform(inv, np.stack([us.ravel(), vs.ravel()], 1))
        px, py = _reflect101(p[:, 0], last_x) - x0, _reflect101(p[:, 1], last_y) - y0
        self.read_grid = self._grid(px, py, x1 - x0, y1 - y0, (resolution, resolution))

    @staticmethod
    def _grid(x: np.ndarray, y: np.ndarray, w: int, h: int, shape: tuple[int, int]) -> torch.Tensor:
        g = np.stack([_to_grid(x, w), _to_grid(y, h)], -1).reshape(1, *shape, 2)
        return torch.from_numpy(g.astype(np.float32))

    def _forward(self, crop: torch.Tensor) -> torch.Tensor:
        """(1, 3, R, R) crop -> (1, 3, R, R) its contribution to the read-back crop."""
        pasted = F.grid_sample(crop, self.paste_grid, mode="bilinear", padding_mode="border", align_corners=True)
        region = pasted * self.alpha
        if self.blur is not None:
            # Beyond the region the image is the photo's own (zero here); at an image border it is the mirror of
            # the region (reflect-101, as cv2.GaussianBlur pads), unless the region is too thin to mirror.
            k = self.blur.numel()
            h, w = self.region
            pads = [k // 2 if side and size > k // 2 else 0 for side, size in zip(self.on_border, (w, w, h, h))]
            region = F.pad(F.pad(region, pads, mode="reflect"), [k // 2 - p for p in pads])
            region = F.conv2d(region, self.blur.view(1, 1, 1, k).expand(3, 1, 1, k), groups=3)
            region = F.conv2d(region, self.blur.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)
        # outside the region the image does not depend on the crop: zero there
        return F.grid_sample(region, self.read_grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def __call__(self, read_gradient: np.ndarray) -> np.ndarray:
        """(R, R, 3) gradient w.r.t. the read-back crop -> (R, R, 3) gradient w.r.t. the pasted crop."""
        r = self.resolution
        assert read_gradient.shape == (r, r, 3), read_gradient.shape
        crop = torch.zeros(1, 3, r, r, requires_grad=True)
        g = torch.from_numpy(np.ascontiguousarray(read_gradient, np.float32)).permute(2, 0, 1)[None]
        if self.grey:  # every channel reads the luma: a change of channel c moves all three by its weight
            g = g.sum(dim=1, keepdim=True) * torch.from_numpy(GREY_WEIGHTS).view(1, 3, 1, 1)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad((self._forward(crop) * g).sum(), crop)
        return grad[0].permute(1, 2, 0).numpy()


class PayloadReinforcer:
    """Reinforce the payloads of a batch's reversible g2face faces (see the module docstring).

    Args:
        model: the g2face anonymizer, set up on its device, local or in the GPU model pool
            (``payload_margin_gradient(crops, bits, margin) -> (gradient, smallest margin per face)``).
        settings: ``ReinforceSettings``.
        batch_size: crops per extractor pass.
        detection: a ``pipeline.redraw.DrawChecker`` (the job's MTCNN and metrics settings) to keep every face
            that MTCNN finds unreinforced found once reinforced (``keep_detection``); None: no such check.
    """

    def __init__(self, model, settings: ReinforceSettings, batch_size: int, detection=None):
        self.model = model
        self.settings = settings
        self.batch_size = batch_size
        self.detection = detection

    def setup(self, device: torch.device) -> None:
        if self.detection is not None:
            self.detection.setup(device)

    def reinforce(self, samples: list, fmt_of: dict, jpeg_quality: int) -> int:
        """Update ``face.crop`` in place for every live sample's reversible g2face faces; ``fmt_of``: sample
        index -> PIL format it will be written in. Returns how many faces changed."""
        st = self.settings
        start: dict[tuple[int, int], np.ndarray] = {}
        bits: dict[tuple[int, int], np.ndarray] = {}
        for si, s in enumerate(samples):
            if si in fmt_of and s.live:
                for fi, f in enumerate(s.faces):
                    if f.method == "g2face" and f.payload_mode == "reversible" and f.payload_sent is not None:
                        start[(si, fi)], bits[(si, fi)] = f.crop, np.asarray(f.payload_sent, np.float32)
        if not start or st.steps == 0:
            return 0
        keys = list(start)
        row = {k: j for j, k in enumerate(keys)}
        base = np.stack([start[k] for k in keys]).astype(np.float32)
        current = base.copy()
        lo, hi = np.maximum(base - st.max_change, 0), np.minimum(base + st.max_change, 255)
        inside = (align.paste_mask(base.shape[1]) > 0)[None, :, :, None]  # where the paste shows the crop
        adjoint = [ChannelAdjoint(samples[si].faces[fi].transform, base.shape[1], samples[si].image.rgb.shape[1],
                                  samples[si].image.rgb.shape[0], grey=samples[si].image.mode in ("L", "LA"))
                   for si, fi in keys]
        target = np.stack([bits[k] for k in keys])
        pending = set(range(len(keys)))  # faces below the margin at their last reading
        for _ in range(st.steps):
            # Read every reinforced face of each image that still has one below the margin: all faces of an
            # image are pasted with their current crops, so a face that stopped is checked again next to the
            # neighbours that still move (overlapping pastes, shared JPEG blocks).
            images = {keys[j][0] for j in pending}
            idx = np.array([j for j, k in enumerate(keys) if k[0] in images])
            crops = {k: _as_uint8(current[j]) for j, k in enumerate(keys)}
            read = published_crops(samples, crops, fmt_of, jpeg_quality, [keys[j] for j in idx])
            grad, worst = self._gradient(np.stack([read[keys[j]] for j in idx]), target[idx])
            move = idx[worst < st.margin]
            pending = {int(j) for j in move}
            if not pending:
                break
            step = np.sign(np.stack([adjoint[j](grad[i]) for i, j in enumerate(idx) if worst[i] < st.margin])) * inside
            current[move] = np.clip(current[move] - st.step * step, lo[move], hi[move])
        if self.detection is not None:
            share = self.keep_detection(samples, keys, base, current, fmt_of, jpeg_quality)
            current = np.stack([_blended(base[j], current[j], share[j]) for j in range(len(keys))]).astype(np.float32)
            for j, k in enumerate(keys):
                samples[k[0]].faces[k[1]].reinforce_share = float(share[j])
        changed = 0
        for k in keys:
            crop = _as_uint8(current[row[k]])
            if not np.array_equal(crop, start[k]):
                samples[k[0]].faces[k[1]].crop = crop
                changed += 1
        return changed

    def keep_detection(self, samples: list, keys: list, base: np.ndarray, reinforced: np.ndarray, fmt_of: dict,
                       jpeg_quality: int) -> np.ndarray:
        """The share of its reinforcement each face keeps (N,): 1, or less where MTCNN finds the face
        unreinforced but not reinforced (manifest ``reinforce_share``).

        Reinforcement adds a few grey levels of high-frequency pattern after the redraw check, and on faces that
        MTCNN finds only narrowly that was enough to lose them (val shard 0, 1000 images: 23 of the 1011 faces,
        every one found at the check, none lost without reinforcement). Each face is judged as the metrics
        stage will judge it: every face of its image pasted, through the output codec, cut at the metrics
        resolution, MTCNN matched against the original's detection (``DrawChecker.found``). A face found
        unreinforced and lost reinforced keeps half, then a quarter of its change, else none: the largest share
        MTCNN still finds. The faces of an image are then judged together at their final shares; if one that
        MTCNN found unreinforced is lost there (a neighbour's change reaching it), none of that image's faces
        keeps any. A scaled face's payload reads back with less margin; verification decides, as for any face."""
        checker = self.detection
        if checker.mtcnn is None:
            raise RuntimeError("payload reinforcement's detection check is not set up (PayloadReinforcer.setup)")
        n = len(keys)
        share = np.ones(n)
        unmoved = np.array([np.array_equal(_as_uint8(reinforced[j]), _as_uint8(base[j])) for j in range(n)], bool)
        moved = {keys[j][0] for j in np.flatnonzero(~unmoved)}
        judged = [j for j in range(n) if keys[j][0] in moved]  # every face of an image where one moved
        if not judged:
            return share
        refs = dict(zip(judged, checker.reference_boxes(
            [(samples[si].image.rgb, samples[si].faces[fi].transform, samples[si].faces[fi].box)
             for si, fi in (keys[j] for j in judged)])))

        def found(at: np.ndarray, rows: list[int]) -> np.ndarray:
            if not rows:
                return np.zeros(0, bool)
            crops = {k: _as_uint8(_blended(base[j], reinforced[j], at[j])) for j, k in enumerate(keys)}
            seen = published_crops(samples, crops, fmt_of, jpeg_quality, [keys[j] for j in rows],
                                   check_resolution=checker.check_resolution)
            return checker.found(np.stack([seen[keys[j]] for j in rows]), [refs[j] for j in rows])

        def found_unreinforced(rows: list[int]) -> list[int]:
            return [j for j, ok in zip(rows, found(np.zeros(n), rows)) if ok]

        # only faces MTCNN finds unreinforced can gain from less reinforcement
        lost = found_unreinforced([j for j, ok in zip(judged, found(share, judged)) if not ok])
        for part in (0.5, 0.25):
            if not lost:
                break
            share[lost] = part
            lost = [j for j, ok in zip(lost, found(share, lost)) if not ok]
        share[lost] = 0.0  # found unreinforced, lost with any share of it
        per_image = Counter(k[0] for k in keys)
        crowded = {keys[j][0] for j in judged if share[j] < 1 and per_image[keys[j][0]] > 1}
        rows = [j for j in judged if keys[j][0] in crowded]
        lost = found_unreinforced([j for j, ok in zip(rows, found(share, rows)) if not ok])
        for si in {keys[j][0] for j in lost}:  # judged found with every face of the image unreinforced
            share[[j for j in range(n) if keys[j][0] == si]] = 0.0
        share[unmoved] = 1.0  # nothing of theirs to scale back: their share stays 1
        return share

    def _gradient(self, crops: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grads, worst = [], []
        for s in range(0, len(crops), self.batch_size):
            g, w = self.model.payload_margin_gradient(crops[s:s + self.batch_size], bits[s:s + self.batch_size],
                                                      self.settings.margin)
            grads.append(np.asarray(g, np.float32))
            worst.append(np.asarray(w, np.float32))
        return np.concatenate(grads), np.concatenate(worst)


def _blended(base: np.ndarray, reinforced: np.ndarray, share: float) -> np.ndarray:
    """A crop keeping ``share`` of its reinforcement (float; ``_as_uint8`` rounds it as it is written)."""
    return base + share * (reinforced - base)


def _as_uint8(crop: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(crop), 0, 255).astype(np.uint8))
