"""Payload reinforcement (pipeline.payload_reinforce): the shipped model's payloads read back with a margin after
the real publishing channel, the crops move by at most the cap, and only reversible g2face faces change."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DEMO_SHARDS, job_tree
from hiding_model import aligned_demo_faces

from pipeline.imaging import DecodedImage
from pipeline import align
from pipeline.payload_reinforce import ChannelAdjoint, PayloadReinforcer, ReinforceSettings, published_crops
from pipeline.shardio import RawSample
from pipeline.stages import Face, Sample

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]
MARGIN = 2.0


@pytest.fixture(scope="module")
def portraits():
    return aligned_demo_faces(128)


@pytest.fixture(scope="module")
def shipped():
    from pipeline.g2face_method import G2FaceAnonymizer

    an = G2FaceAnonymizer(None, 128)
    an.setup(torch.device("cpu"))
    return an


def _samples(portraits, shipped, n: int, modes: list[str], image_mode: str = "RGB"):
    """n demo portraits, each with its largest face anonymized by the shipped model hiding random bits."""
    keys, photos, transforms, crops = portraits
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2, (n, shipped.payload_bits)).astype(np.float32)
    x = torch.from_numpy(crops[:n]).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        y = shipped.anonymize(x, list(range(n)), payload_bits=torch.from_numpy(bits))
    generated = y.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    samples = []
    for i in range(n):
        s = Sample(RawSample(i, keys[i], {}, "jpg"))
        photo = photos[i] if image_mode == "RGB" else np.repeat(photos[i].mean(axis=2, keepdims=True), 3, 2).astype(np.uint8)
        s.image = DecodedImage(photo, None, image_mode, "JPEG", None, None)
        s.faces = [Face(np.zeros(4), 1.0, np.zeros((5, 2)), method="g2face", transform=transforms[i],
                        crop=np.ascontiguousarray(generated[i]), payload_mode=modes[i], payload_sent=bits[i])]
        samples.append(s)
    return samples, bits


def _margins(shipped, samples, bits, fmt: str, quality: int = 90) -> np.ndarray:
    """Signed bit logits (N, bits) read from each face as it would be written in ``fmt``."""
    keys = [(i, 0) for i in range(len(samples))]
    read = published_crops(samples, {k: samples[k[0]].faces[0].crop for k in keys}, dict.fromkeys(range(len(samples)), fmt),
                           quality)
    x = torch.from_numpy(np.stack([read[k] for k in keys])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logits = shipped.extract(x).numpy()
    return (bits * 2 - 1) * logits


@pytest.mark.parametrize("fmt,image_mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "L")])
def test_reinforcement_strengthens_reversible_payloads_within_the_cap(portraits, shipped, fmt, image_mode):
    n = 6
    modes = ["reversible"] * (n - 1) + ["irreversible"]
    samples, bits = _samples(portraits, shipped, n, modes, image_mode)
    before_crops = [s.faces[0].crop.copy() for s in samples]
    before = _margins(shipped, samples, bits, fmt)
    settings = ReinforceSettings()
    changed = PayloadReinforcer(shipped, settings, 4).reinforce(samples, dict.fromkeys(range(n), fmt), 90)
    after = _margins(shipped, samples, bits, fmt)
    rev = slice(0, n - 1)
    assert changed == n - 1
    weak_before, weak_after = (before[rev] < MARGIN).sum(), (after[rev] < MARGIN).sum()
    wrong_before, wrong_after = (before[rev] <= 0).sum(), (after[rev] <= 0).sum()
    assert weak_after < 0.5 * weak_before, (weak_before, weak_after)
    assert wrong_after <= wrong_before and (wrong_before == 0 or wrong_after < wrong_before), (wrong_before, wrong_after)
    for s, b in zip(samples[rev], before_crops[rev]):
        d = np.abs(s.faces[0].crop.astype(int) - b.astype(int))
        assert 0 < d.max() <= settings.max_change
    # the irreversible face hides random bits nobody reads: it stays as the generator made it
    assert np.array_equal(samples[-1].faces[0].crop, before_crops[-1])
    np.testing.assert_array_equal(after[-1], before[-1])


def test_reinforcement_leaves_other_methods_and_settings_alone(portraits, shipped):
    samples, bits = _samples(portraits, shipped, 2, ["reversible", "reversible"])
    samples[1].faces[0].method = "pixelate"  # e.g. the identity guard's fallback
    crops = [s.faces[0].crop.copy() for s in samples]
    assert PayloadReinforcer(shipped, ReinforceSettings(steps=0), 4).reinforce(samples, {0: "PNG", 1: "PNG"}, 90) == 0
    assert np.array_equal(samples[0].faces[0].crop, crops[0])
    assert PayloadReinforcer(shipped, ReinforceSettings(), 4).reinforce(samples, {0: "PNG", 1: "PNG"}, 90) == 1
    assert np.array_equal(samples[1].faces[0].crop, crops[1])
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="max_change"):
            ReinforceSettings(max_change=bad)


def _side_by_side(samples):
    """One photo holding the first two samples' photos side by side, with both faces (transforms shifted)."""
    a, b = samples[0], samples[1]
    ha, wa = a.image.rgb.shape[:2]
    hb, wb = b.image.rgb.shape[:2]
    photo = np.zeros((max(ha, hb), wa + wb, 3), np.uint8)
    photo[:ha, :wa], photo[:hb, wa:] = a.image.rgb, b.image.rgb
    fb = b.faces[0]
    m = fb.transform.copy()
    m[:, 2] -= m[:, :2] @ np.array([wa, 0.0])  # crop = M @ (x - wa, y)
    fb.transform = m
    a.image = DecodedImage(photo, None, "RGB", "JPEG", None, None)
    a.faces = [a.faces[0], fb]
    return a


@pytest.mark.parametrize("second_mode", ["reversible", "irreversible"])
def test_faces_sharing_an_image_are_reinforced_together(portraits, shipped, second_mode):
    samples, bits = _samples(portraits, shipped, 2, ["reversible", second_mode])
    s = _side_by_side(samples)
    start = [f.crop.copy() for f in s.faces]

    def weak():
        read = published_crops([s], {}, {0: "JPEG"}, 90, [(0, 0), (0, 1)])
        x = torch.from_numpy(np.stack([read[(0, 0)], read[(0, 1)]])).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return ((bits * 2 - 1) * shipped.extract(x).numpy() < MARGIN).sum(axis=1)

    before = weak()
    changed = PayloadReinforcer(shipped, ReinforceSettings(), 4).reinforce([s], {0: "JPEG"}, 90)
    after = weak()  # both faces as they will be written together
    assert after[0] < 0.5 * before[0], (before, after)
    if second_mode == "reversible":
        assert changed == 2 and after[1] < 0.5 * before[1], (before, after)
    else:
        assert changed == 1 and np.array_equal(s.faces[1].crop, start[1])


def test_jpeg_tile_reads_like_the_whole_image(portraits):
    from pipeline import align
    from pipeline.imaging import decode_image, encode_image
    from pipeline.payload_reinforce import _through_codec

    _, photos, transforms, crops = portraits
    photo = np.ascontiguousarray(np.tile(photos[0], (3, 3, 1)))  # a large photo, the face in its first copy
    img = DecodedImage(photo, None, "RGB", "JPEG", None, None)
    pasted = photo.copy()
    box = align.paste_back(pasted, np.ascontiguousarray(255 - crops[0]), transforms[0])
    whole = decode_image(encode_image(pasted, None, "RGB", "JPEG", 90), photo.size).rgb
    tiled = _through_codec(pasted, img, "JPEG", 90, [box])
    x0, y0, x1, y1 = box
    np.testing.assert_array_equal(tiled[y0:y1, x0:x1], whole[y0:y1, x0:x1])
    assert not np.array_equal(tiled, whole)  # only the tile went through the codec


def test_reinforce_settings_are_validated_and_fingerprinted_only_where_they_apply(tmp_path):
    from pipeline.spec import JobSpecError, parse_spec, spec_fingerprint

    for field, value in (("payload_reinforce_steps", -1), ("payload_reinforce_max_change", 20),
                         ("payload_reinforce_max_change", 2.5)):
        with pytest.raises(JobSpecError, match=field):
            parse_spec(job_tree(tmp_path / "out", DEMO_SHARDS[0], anonymizer={"method": "g2face", field: value}))

    def fp(**an):
        return spec_fingerprint(parse_spec(job_tree(tmp_path / "out", DEMO_SHARDS[0], anonymizer=an)))

    # jobs whose bytes reinforcement never touches keep one fingerprint (runs made before it resume)
    assert fp(method="blur") == fp(method="blur", payload_reinforce_steps=2)
    assert fp(method="g2face", payload="irreversible") == fp(method="g2face", payload="irreversible",
                                                             payload_reinforce_max_change=2)
    assert fp(method="g2face", payload_reinforce_steps=0) == fp(method="g2face", payload_reinforce_steps=0,
                                                                payload_reinforce_max_change=2)
    assert fp(method="g2face") != fp(method="g2face", payload_reinforce_steps=3)
    # keeping detection changes the bytes only where reinforcement runs; off, they are those of before the field
    assert fp(method="g2face") != fp(method="g2face", payload_reinforce_keep_detection=False)
    assert fp(method="blur") == fp(method="blur", payload_reinforce_keep_detection=False)
    assert fp(method="g2face", payload_reinforce_steps=0) == fp(method="g2face", payload_reinforce_steps=0,
                                                                payload_reinforce_keep_detection=False)


def _found(checker, samples, keys, crops, fmt):
    """Whether MTCNN finds each face of ``keys`` with ``crops`` pasted, as the metrics stage will cut it."""
    refs = checker.reference_boxes([(samples[si].image.rgb, samples[si].faces[fi].transform,
                                     samples[si].faces[fi].box) for si, fi in keys])
    seen = published_crops(samples, crops, dict.fromkeys(range(len(samples)), fmt), 90, keys,
                           check_resolution=checker.check_resolution)
    return checker.found(np.stack([seen[k] for k in keys]), refs)


def test_a_face_that_reinforcement_loses_to_mtcnn_keeps_the_largest_share_still_found(portraits, shipped):
    from pipeline.redraw import DrawChecker

    samples, bits = _samples(portraits, shipped, 6, ["reversible"] * 6)
    checker = DrawChecker(128, 0.6, aligned=True)  # reference: the original's detection at the template's box
    checker.setup(torch.device("cpu"))
    keys = [(i, 0) for i in range(6)]
    found = _found(checker, samples, keys, {k: s.faces[0].crop for k, s in zip(keys, samples)}, "PNG")
    samples = [s for s, ok in zip(samples, found) if ok][:3]  # first draws MTCNN finds as published
    assert len(samples) == 3, found
    keys = keys[:3]
    base = np.stack([s.faces[0].crop for s in samples]).astype(np.float32)
    changed = base.copy()
    changed[0] = 128.0  # a change that wipes the face out: MTCNN cannot find a flat grey crop
    changed[1] += np.random.default_rng(0).choice([-1.0, 1.0], base[1].shape)  # a change MTCNN shrugs off
    reinforcer = PayloadReinforcer(shipped, ReinforceSettings(), 4, detection=checker)
    scale = reinforcer.keep_detection(samples, keys, base, changed, dict.fromkeys(range(3), "PNG"), 90)
    assert scale[1] == 1.0 and scale[2] == 1.0, scale
    assert scale[0] in (0.5, 0.25, 0.0), scale

    def at(share):
        return {k: np.clip(np.rint(base[j] + share[j] * (changed[j] - base[j])), 0, 255).astype(np.uint8)
                for j, k in enumerate(keys)}

    assert _found(checker, samples, keys, at(scale), "PNG").all()  # every face found as it will be published
    assert not _found(checker, samples, keys, at(np.ones(3)), "PNG")[0]
    if scale[0] < 0.5:  # the largest share found: twice the kept one was lost
        assert not _found(checker, samples, keys, at(np.array([2 * scale[0] or 0.25, 1, 1])), "PNG")[0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_reinforcement_keeping_detection_loses_no_face_mtcnn_found(portraits, shipped, fmt):
    from pipeline.redraw import DrawChecker

    n = 5
    samples, bits = _samples(portraits, shipped, n, ["reversible"] * n)
    checker = DrawChecker(128, 0.6, aligned=True)
    checker.setup(torch.device("cpu"))
    keys = [(i, 0) for i in range(n)]
    before = _found(checker, samples, keys, {k: s.faces[0].crop for k, s in zip(keys, samples)}, fmt)
    start = [s.faces[0].crop.copy() for s in samples]
    changed = PayloadReinforcer(shipped, ReinforceSettings(), 4, detection=checker).reinforce(
        samples, dict.fromkeys(range(n), fmt), 90)
    assert changed >= 1
    after = _found(checker, samples, keys, {k: s.faces[0].crop for k, s in zip(keys, samples)}, fmt)
    assert after[before].all(), (before, after)
    for s, b in zip(samples, start):  # still within the cap; each face says how much of it it kept
        d = np.abs(s.faces[0].crop.astype(int) - b.astype(int))
        assert d.max() <= ReinforceSettings().max_change
        assert s.faces[0].reinforce_share in (1.0, 0.5, 0.25, 0.0) and s.warnings == []
        if s.faces[0].reinforce_share == 0.0:
            assert np.array_equal(s.faces[0].crop, b)


def test_faces_sharing_an_image_are_judged_together_at_their_final_shares(portraits, shipped):
    """Two faces pasted into one photo: one change wipes its face out, the other is harmless; the wiped one
    keeps the largest share MTCNN still finds, judged with its neighbour as published, and nothing is lost."""
    from pipeline.redraw import DrawChecker

    samples, bits = _samples(portraits, shipped, 6, ["reversible"] * 6)
    checker = DrawChecker(128, 0.6, aligned=True)
    checker.setup(torch.device("cpu"))
    keys = [(i, 0) for i in range(6)]
    found = _found(checker, samples, keys, {k: s.faces[0].crop for k, s in zip(keys, samples)}, "JPEG")
    pair = [s for s, ok in zip(samples, found) if ok][:2]
    assert len(pair) == 2, found
    s = _side_by_side(pair)
    keys = [(0, 0), (0, 1)]
    base = np.stack([f.crop for f in s.faces]).astype(np.float32)
    changed = base.copy()
    changed[0] = 128.0
    changed[1] += np.random.default_rng(1).choice([-1.0, 1.0], base[1].shape)
    share = PayloadReinforcer(shipped, ReinforceSettings(), 4, detection=checker).keep_detection(
        [s], keys, base, changed, {0: "JPEG"}, 90)
    assert share[0] in (0.5, 0.25, 0.0) and share[1] in (1.0, 0.0), share
    final = {k: np.clip(np.rint(base[j] + share[j] * (changed[j] - base[j])), 0, 255).astype(np.uint8)
             for j, k in enumerate(keys)}
    assert _found(checker, [s], keys, final, "JPEG").all()


def test_run_with_reinforcement_reads_back_better_and_changes_only_the_faces(tmp_path):
    """Two real runs of the shipped model on a demo shard, reinforcement off and on (the default)."""
    from helpers import read_tar

    from pipeline.imaging import decode_image
    from pipeline.keys import create_master_key
    from pipeline.runner import run_job
    from pipeline.spec import parse_spec

    key = tmp_path / "master.key"
    create_master_key(key)
    shard = DEMO_SHARDS[0]
    rows, images = {}, {}
    on = ReinforceSettings()  # the job's defaults
    for steps in (0, on.steps):
        out = tmp_path / f"steps{steps}"
        an = {"method": "g2face", "identity_guard": "off", "payload_reinforce_steps": steps}
        run_job(parse_spec(job_tree(out, shard, anonymizer=an, keys={"master": str(key)}, metrics={"enabled": False},
                                    output={"image_format": "png"})), echo=lambda *_: None)
        rows[steps] = pq.read_table(out / "manifests" / f"{shard.name}.parquet").to_pylist()
        images[steps] = {k: decode_image(v["png"], 10**8).rgb for k, v in read_tar(out / "shards" / shard.name).items()}
    faces = {s: [f for r in rows[s] for f in r["faces"] if f["method"] == "g2face"] for s in rows}
    assert faces[0] and len(faces[0]) == len(faces[on.steps])
    assert all(f["payload_mode"] == "reversible" and f["payload_ok"] for f in faces[on.steps])
    # with reinforcement each reversible face records the share of it kept (the job keeps detection); without, none
    assert all(f["reinforce_share"] in (1.0, 0.5, 0.25, 0.0) for f in faces[on.steps])
    assert all(f["reinforce_share"] is None for f in faces[0])
    ber = {s: np.mean([f["payload_ber"] for f in faces[s]]) for s in faces}
    assert ber[on.steps] < 0.5 * ber[0] or ber[on.steps] == ber[0] == 0.0, ber
    boxes = {r["key"]: [f["paste_box"] for f in r["faces"]] for r in rows[on.steps]}
    for k, img in images[on.steps].items():
        d = np.abs(img.astype(int) - images[0][k].astype(int))
        outside = np.ones(d.shape[:2], bool)
        for x0, y0, x1, y1 in boxes[k]:
            outside[y0:y1, x0:x1] = False
        assert d[outside].max(initial=0) == 0  # nothing but the pasted faces changes
        assert d.max() <= on.max_change + 1  # the crop cap, plus one level of resampling and blending


def test_an_image_whose_reinforcement_fails_is_published_with_the_reason_and_the_rest_reinforced(portraits, shipped):
    from pipeline.stages import PasteEncodeStage

    samples, bits = _samples(portraits, shipped, 3, ["reversible"] * 3)
    samples[1].faces[0].payload_sent = bits[1][:-8]  # a payload of the wrong length cannot be reinforced
    before = [s.faces[0].crop.copy() for s in samples]
    stage = PasteEncodeStage("png", 95, "pass", reinforcer=PayloadReinforcer(shipped, ReinforceSettings(), 4))
    stage.process(samples)
    assert all(s.out_bytes is not None and s.status == "ok" for s in samples)
    assert samples[1].warnings and samples[1].warnings[0].startswith("payload reinforcement skipped: ")
    assert np.array_equal(samples[1].faces[0].crop, before[1])
    for i in (0, 2):
        assert samples[i].warnings == [] and not np.array_equal(samples[i].faces[0].crop, before[i])


def _face_transform(cx: float, cy: float, eye_distance: float, resolution: int, angle: float = 0.0) -> np.ndarray:
    """Image -> crop transform of a face centred at (cx, cy) with the given eye distance in pixels, rolled by
    ``angle`` degrees."""
    t = align.template(resolution)
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = (t - t[:3].mean(axis=0)) @ rot.T * (eye_distance / (t[1, 0] - t[0, 0])) + (cx, cy)
    return align.landmark_transform(pts, resolution)


@pytest.mark.parametrize("cx,cy,eye_distance,height,width,angle,grey", [
    (89, 110, 60, 218, 178, 0, False),    # a CelebA-sized face, shrunk a little on paste
    (25, 100, 12, 218, 178, 0, False),    # a small face: ~2.6 crop pixels per written pixel
    (60, 8, 30, 218, 178, 0, False),      # cut by the top border: verification reads a mirror of what it wrote
    (90, 200, 55, 218, 178, 0, False),    # cut by the bottom border
    (89, 110, 200, 218, 178, 0, False),   # larger than the image: warp_to_crop pre-blurs before shrinking
    (89, 200, 200, 218, 178, 0, False),   # the same, cut by the bottom border: the pre-blur mirrors there
    (90, 105, 50, 218, 178, 25, False),   # rolled
    (40, 105, 50, 218, 178, 0, True),     # written grey, cut by the left border
    (300, 250, 180, 600, 500, 0, False),  # a region of many crops: modelled on a coarser grid
    (300, 40, 180, 600, 500, 0, False),   # the same, cut by the top border
    (300, 560, 180, 600, 500, 0, False),  # ... by the bottom border
    (460, 300, 150, 600, 500, 20, False),  # ... rolled and cut by the right border
])
def test_channel_adjoint_predicts_what_the_real_channel_reads(cx, cy, eye_distance, height, width, angle, grey):
    """<gradient, change read back through paste_back (+ grey conversion) + warp_to_crop> equals <adjoint(gradient),
    change of the crop> up to 8-bit rounding, for smooth and for pixel-wise signals, where taking the read-back
    gradient as the crop's (the identity) is far off."""
    from PIL import Image

    r, h, w = 128, height, width
    rng = np.random.default_rng(3)
    photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    m = _face_transform(cx, cy, eye_distance, r, angle)
    adjoint = ChannelAdjoint(m, r, w, h, grey=grey)

    def read(crop: np.ndarray) -> np.ndarray:
        img = photo.copy()
        align.paste_back(img, crop, m)
        if grey:
            img = np.repeat(np.asarray(Image.fromarray(img).convert("L"))[:, :, None], 3, axis=2)
        return align.warp_to_crop(img, m, r).astype(np.float64)

    for block, limit in ((4, 0.06), (1, 0.15)):  # smooth changes and signals, then pixel-wise ones
        crop = rng.integers(60, 196, (r, r, 3)).astype(np.uint8)
        change = np.kron(rng.normal(0, 25, (r // block, r // block, 3)), np.ones((block, block, 1)))
        moved = np.clip(crop + change, 0, 255).astype(np.uint8)
        change = moved.astype(np.float64) - crop
        read_change = read(moved) - read(crop)
        true, ours, identity = [], [], []
        for _ in range(6):
            g = np.kron(rng.normal(0, 1, (r // (2 * block), r // (2 * block), 3)),
                        np.ones((2 * block, 2 * block, 1))).astype(np.float32)
            true.append(float((read_change * g).sum()))
            ours.append(float((adjoint(g) * change).sum()))
            identity.append(float((g * change).sum()))
        true, scale = np.array(true), np.abs(true).mean()
        error = np.abs(np.array(ours) - true).mean() / scale
        identity_error = np.abs(np.array(identity) - true).mean() / scale
        assert error < limit, (block, error, true, ours)
        assert identity_error > 2 * error, (block, identity_error, error)
