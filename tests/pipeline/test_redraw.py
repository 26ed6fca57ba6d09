"""Redraw: a G2Face draw that fails the identity or detection check is drawn again; what is kept is a real draw.

Runs the shipped model, dlib's ResNet and MTCNN on the demo portraits (CPU, a few seconds per draw)."""
import numpy as np
import pytest
import torch

from conftest import DEMO_SHARDS, job_tree
from pipeline.anonymizers import PixelateAnonymizer
from pipeline.g2face_method import G2FaceAnonymizer
from pipeline.redraw import DRAW_CHECK_OUTCOMES, DrawChecker, DrawJudgement, draw_seed, push_strength, redraw
from pipeline.shardio import read_webdataset
from pipeline.spec import JobSpecError, parse_spec, spec_fingerprint
from pipeline.stages import AlignStage, AnonymizeStage, DecodeStage, DetectStage, PasteEncodeStage, Sample
from pipeline.verify import VerifyStage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
R = 128


@pytest.fixture(scope="module")
def faces(one_torch_thread):
    """(samples, [(sample, face index, face)]) of the first demo shard, aligned for g2face."""
    samples = [Sample(r) for r in read_webdataset(str(DEMO_SHARDS[0]), None)][:4]
    for st in (DecodeStage(10**8, False), DetectStage(16, (0.6, 0.7, 0.7), 0.709, 0.8, 1280, False, R, "cpu"),
               AlignStage(R, "g2face", "pixelate", 32, 0.95, 0, "pass")):
        st.setup()
        samples = st.process(samples)
    items = [(s, i, f) for s in samples for i, f in enumerate(s.faces) if f.method == "g2face"]
    assert len(items) >= 3, len(items)
    return samples, items


@pytest.fixture(scope="module")
def model():
    m = G2FaceAnonymizer(None, R)
    m.setup(torch.device("cpu"))
    return m


def _checker(**kw) -> DrawChecker:
    c = DrawChecker(R, 0.6, **kw)
    c.setup(torch.device("cpu"))
    return c


def _inputs(items):
    x = torch.from_numpy(np.stack([f.crop for _, _, f in items])).permute(0, 3, 1, 2).float() / 255.0
    return x, [f.seed for _, _, f in items], [(s.image.rgb, f.transform, f.box) for s, _, f in items]


def test_draw_seeds_start_at_the_face_seed_and_differ():
    assert draw_seed(12345, 0) == 12345
    seeds = [draw_seed(12345, k) for k in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**64 for s in seeds)
    assert seeds == [draw_seed(12345, k) for k in range(8)]  # deterministic
    assert draw_seed(12346, 1) != seeds[1]


def test_the_check_outcome_names_what_failed_identity_first():
    t, f = True, False
    v = DrawJudgement(np.array([0.7, 0.7, 0.7, 0.3, 0.3]), np.array([t, t, t, f, f]), np.array([t, t, f, t, f]),
                      np.array([t, f, f, t, f]))
    assert list(v.outcomes()) == ["passed", "weak_detection", "not_detected", "identity_match", "identity_match"]
    assert set(v.outcomes()) < set(DRAW_CHECK_OUTCOMES) and "unchecked" in DRAW_CHECK_OUTCOMES


def test_an_unchanged_face_still_matches_and_is_found(faces):
    _, items = faces
    x, _, refs = _inputs(items)
    checker = _checker()
    verdict = checker.judge(checker.reference(refs), x, np.arange(len(items)))
    assert (verdict.distance < 0.2).all(), verdict.distance  # the original itself (resampled): the same person
    assert not verdict.anonymized.any() and not verdict.passed.any()
    assert verdict.detected.all() and verdict.confident.all()
    shuffled = checker.judge(checker.reference(refs), x.roll(1, 0), np.arange(len(items)))
    assert (shuffled.distance > verdict.distance).all()  # another portrait sits farther from each original


def test_kept_face_is_the_best_real_draw_when_none_passes(faces, model):
    _, items = faces
    x, seeds, refs = _inputs(items)
    checker = _checker(identity_margin=1.5)  # nothing reaches distance 2.1: every face uses all its draws
    reference = checker.reference(refs)
    with torch.inference_mode():
        draws = [model.anonymize(x, [draw_seed(s, k) for s in seeds]) for k in range(3)]
        y, kept, verdict, pushed = redraw(model.anonymize, checker, reference, x, draws[0], seeds, 3)
    assert not pushed.any()  # push off by default: every draw is the paper's
    judged = [checker.judge(reference, d, np.arange(len(items))) for d in draws]
    ranks = np.stack([j.rank() for j in judged])
    assert (kept == ranks.argmax(0)).all(), (kept, ranks)
    # the verdicts returned are those of the kept draws (the identity guard reads them), not draw 0's
    assert (kept > 0).any(), kept
    for field in ("distance", "anonymized", "detected", "confident"):
        assert np.array_equal(getattr(verdict, field), [getattr(judged[k], field)[i] for i, k in enumerate(kept)])
    for i, k in enumerate(kept):
        assert torch.equal(y[i], draws[k][i])  # bit-identical to that draw: redraw never edits pixels
    # The draws differ: otherwise the test above would hold vacuously.
    assert all((draws[0] - draws[k]).abs().mean() > 0.01 for k in (1, 2))


def test_reversible_inputs_follow_their_faces_into_each_draw(faces, model):
    """Payload bits and identity are sliced with the faces still being drawn: each kept face is exactly the draw
    of its own bits and identity."""
    _, items = faces
    x, seeds, refs = _inputs(items)
    bits = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (len(items), model.payload_bits))).float()
    checker = _checker(identity_margin=1.5)
    with torch.inference_mode():
        identity = model.identity_embeddings(x)
        draws = [model.anonymize(x, [draw_seed(s, k) for s in seeds], payload_bits=bits, identity=identity)
                 for k in range(3)]
        y, kept, _, _ = redraw(model.anonymize, checker, checker.reference(refs), x, draws[0], seeds, 3,
                            payload_bits=bits, identity=identity)
        swapped = model.anonymize(x, [draw_seed(s, 1) for s in seeds], payload_bits=bits.roll(1, 0),
                                  identity=identity)
    assert (kept > 0).any()
    for i, k in enumerate(kept):
        assert torch.equal(y[i], draws[k][i])
    assert not torch.equal(swapped, draws[1])  # the bits matter, so slicing them wrongly would show


def test_faces_passing_their_first_draw_keep_it(faces, model):
    _, items = faces
    x, seeds, refs = _inputs(items)
    checker = _checker(identity_margin=-0.6, detection_score=0.0)  # any draw MTCNN finds passes
    reference = checker.reference(refs)
    with torch.inference_mode():
        y0 = model.anonymize(x, seeds)
        y, kept, verdict, _ = redraw(model.anonymize, checker, reference, x, y0, seeds, 4, push=0.5, push_after=1)
    passed = checker.judge(reference, y0, np.arange(len(items))).passed
    assert passed.any()
    assert (kept[passed] == 0).all() and torch.equal(y[passed], y0[passed])
    assert verdict.anonymized[passed].all()


def test_push_strength_starts_after_the_plain_draws_and_rises():
    assert [push_strength(k, 16, 0.5, 8) for k in (0, 7)] == [0.0, 0.0]
    assert push_strength(8, 16, 0.5, 8) == 0.5 and push_strength(12, 16, 0.5, 8) == 0.75
    assert 0.9 < push_strength(15, 16, 0.5, 8) < 1.0
    assert push_strength(15, 16, 0.0, 8) == 0.0 and push_strength(3, 4, 0.5, 1) == 0.5 * (1 + 2 / 3)


def _recording(model):
    calls = []

    def anonymize(x, seeds, **kw):
        push = kw.get("identity_push")
        calls.append(None if push is None else push.tolist())
        return model.anonymize(x, seeds, **kw)
    return anonymize, calls


def test_faces_no_draw_anonymized_are_pushed_and_the_kept_push_reproduces_them(faces, model):
    _, items = faces
    x, seeds, refs = _inputs(items)
    n = len(items)
    # No draw is ever anonymized, so every face is pushed from draw 1; and none is ever found (IoU above 1), so
    # the kept draw is the farthest one: judged as published, MTCNN misses most pushed draws of these portraits.
    checker = _checker(identity_margin=1.5, match_iou=1.01)
    reference = checker.reference(refs)
    anonymize, calls = _recording(model)
    with torch.inference_mode():
        y0 = model.anonymize(x, seeds)
        y, kept, verdict, pushed = redraw(anonymize, checker, reference, x, y0, seeds, 3, push=0.5, push_after=1)
        strengths = {k: push_strength(k, 3, 0.5, 1) for k in (1, 2)}
        plain = {k: model.anonymize(x, [draw_seed(s, k) for s in seeds]) for k in (1, 2)}
        pushed_draws = {k: model.anonymize(x, [draw_seed(s, k) for s in seeds], identity_push=[strengths[k]] * n)
                        for k in (1, 2)}
    assert calls == [[0.5] * n, [0.75] * n]
    assert (kept > 0).any()
    for i, k in enumerate(kept):
        assert pushed[i] == (strengths[k] if k else 0.0)
        assert torch.equal(y[i], (pushed_draws[k] if k else y0)[i])  # the recorded (draw, push) is what was kept
    # the push changes the draws (what it buys on faces the plain draws leave matching: bench/redraw.py --push)
    assert all((pushed_draws[k] - plain[k]).abs().mean() > 0.01 for k in (1, 2))


def test_faces_that_only_failed_detection_are_never_pushed(faces, model):
    _, items = faces
    x, seeds, refs = _inputs(items)
    checker = _checker(identity_margin=-0.6, detection_score=1.01)  # every draw anonymized, none confident
    anonymize, calls = _recording(model)
    with torch.inference_mode():
        y0 = model.anonymize(x, seeds)
        _, kept, verdict, pushed = redraw(anonymize, checker, checker.reference(refs), x, y0, seeds, 3,
                                          push=0.5, push_after=1)
    assert calls == [None, None] and not pushed.any() and verdict.anonymized.all()


def test_stage_records_the_kept_draw_reproduces_it_and_verifies_its_bits(faces, model):
    samples, _ = faces

    def run(draws, push=0.0):
        copies = [Sample(s.raw, image=s.image, faces=[type(f)(**{**f.__dict__}) for f in s.faces]) for s in samples]
        stages = [AnonymizeStage({"g2face": model, "pixelate": PixelateAnonymizer(R, 8)}, 8, "cpu",
                                 payload_mode="irreversible", draws=draws,
                                 # none found (IoU above 1): the farthest draw is kept (see above)
                                 draw_checker=_checker(identity_margin=0.3, match_iou=1.01) if draws > 1 else None,
                                 identity_push=push, identity_push_after=1),
                  PasteEncodeStage("png", 95, "pass"), VerifyStage(model, R, "irreversible", 10**8, 8, "cpu")]
        for st in stages:
            st.setup()
            copies = st.process(copies)
        return [f for s in copies for f in s.faces if f.method == "g2face"]

    first, redrawn, pushed = run(1), run(3), run(3, push=0.5)
    originals = [f for s in samples for f in s.faces if f.method == "g2face"]
    assert [f.draw for f in first] == [0] * len(first)
    assert [f.draw_check for f in first] == [None] * len(first)  # one draw: nothing checked
    # no detection reaches IoU 1.01: every kept draw is recorded as missed by MTCNN, or as still the person
    assert {f.draw_check for f in redrawn} <= {"not_detected", "identity_match"}, [f.draw_check for f in redrawn]
    assert any(f.draw_check == "not_detected" for f in redrawn + pushed)
    # the verdict recorded is the one on the kept draw: judging each published crop again gives it
    checker = _checker(identity_margin=0.3, match_iou=1.01)
    _, _, refs = _inputs(faces[1])
    for kept in (redrawn, pushed):
        crops = torch.from_numpy(np.stack([f.crop for f in kept])).permute(0, 3, 1, 2).float() / 255.0
        again = checker.judge(checker.reference(refs), crops, np.arange(len(kept)))
        assert [f.draw_check for f in kept] == list(again.outcomes())
    assert [f.identity_push for f in first + redrawn] == [0.0] * (len(first) + len(redrawn))
    assert any(f.identity_push for f in pushed)  # margin 0.3: some face no draw anonymized gets pushed draws
    for o, p in zip(originals, pushed):
        assert p.identity_push == (push_strength(p.draw, 3, 0.5, 1) if p.identity_push else 0.0)
        x = torch.from_numpy(o.crop).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            y = model.anonymize(x, [draw_seed(o.seed, p.draw)], identity_push=[p.identity_push])
        again = y[0].mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.abs(again.astype(int) - p.crop).max() <= 1  # the recorded (draw, push) reproduces the face
    assert {f.draw for f in redrawn} <= {0, 1, 2} and any(f.draw for f in redrawn)  # nothing passes: redraws
    # verification reads each face's bits against the seed of the draw it kept (random bits: 0.5 if not)
    assert max(f.payload_ber for f in first + redrawn) < 0.1, [f.payload_ber for f in first + redrawn]
    for o, a, b in zip(originals, first, redrawn):
        if b.draw == 0:
            assert np.array_equal(a.crop, b.crop)
            continue
        x = torch.from_numpy(o.crop).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            y = model.anonymize(x, [draw_seed(o.seed, b.draw)])
        again = y[0].mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        # the recorded draw reproduces the published crop (up to batch-size rounding)
        assert np.abs(again.astype(int) - b.crop).max() <= 1 and not np.array_equal(a.crop, b.crop)


def test_draws_are_validated_and_shape_only_g2face_fingerprints(tmp_path):
    for bad in (0, 65, "many"):
        with pytest.raises(JobSpecError, match="anonymizer.draws"):
            parse_spec(job_tree(tmp_path, DEMO_SHARDS[0], anonymizer={"draws": bad}))
    blur = [parse_spec(job_tree(tmp_path, DEMO_SHARDS[0], anonymizer={"method": "blur", "draws": d})) for d in (1, 8)]
    assert spec_fingerprint(blur[0]) == spec_fingerprint(blur[1])
    g2 = [parse_spec(job_tree(tmp_path, DEMO_SHARDS[0], anonymizer={"method": "g2face", "draws": d})) for d in (1, 8)]
    assert spec_fingerprint(g2[0]) != spec_fingerprint(g2[1])


def test_the_push_shapes_fingerprints_only_where_a_draw_can_be_pushed(tmp_path):
    def fp(**an):
        return spec_fingerprint(parse_spec(job_tree(tmp_path, DEMO_SHARDS[0], anonymizer={"method": "g2face", **an})))

    pushing = fp(draws=16)
    assert pushing != fp(draws=16, identity_push=0) and pushing != fp(draws=16, identity_push=1.0)
    assert pushing != fp(draws=16, identity_push_after=4)
    # no draw is ever pushed: the fingerprint of before the fields, whatever they say
    assert fp(draws=16, identity_push=0) == fp(draws=16, identity_push=0, identity_push_after=3)
    assert fp(draws=8) == fp(draws=8, identity_push=1.5)
    # holding a push changes the bytes of pushing jobs only; without it a job keeps its fingerprint of before
    assert pushing != fp(draws=16, identity_push_hold=False)
    # this job's fingerprint before the field (and before payload_reinforce_keep_detection, which changes its bytes)
    assert fp(draws=16, identity_push_hold=False, payload_reinforce_keep_detection=False) == "0c9958c5e83c5a9b"
    assert fp(draws=16, identity_push=0) == fp(draws=16, identity_push=0, identity_push_hold=False)
    assert fp(draws=8) == fp(draws=8, identity_push_hold=False)
    for bad in ({"identity_push": -0.1}, {"identity_push": 3}, {"identity_push_after": 0}):
        with pytest.raises(JobSpecError, match="anonymizer.identity_push"):
            parse_spec(job_tree(tmp_path, DEMO_SHARDS[0], anonymizer=bad))


def test_a_failing_redraw_keeps_the_first_draws_and_says_so(faces, model):
    samples, _ = faces

    def run(fail_fast):
        copies = [Sample(s.raw, image=s.image, faces=[type(f)(**{**f.__dict__}) for f in s.faces]) for s in samples]
        wrong = DrawChecker(64, 0.6)  # judges 64 px crops: every judgement of these 128 px draws fails
        stage = AnonymizeStage({"g2face": model, "pixelate": PixelateAnonymizer(R, 8)}, 8, "cpu", fail_fast,
                               payload_mode="irreversible", draws=3, draw_checker=wrong)
        stage.setup()
        return stage.process(copies)

    out = run(False)
    for s, before in zip(out, samples):
        assert s.live and s.status == "ok"
        g2 = [f for f in s.faces if f.method == "g2face"]
        assert all(f.draw == 0 and f.draw_check == "unchecked" for f in g2)
        if g2:
            assert len(s.warnings) == 1 and s.warnings[0].startswith("redraw failed, first draws kept: AssertionError")
        else:
            assert s.warnings == []
    assert any(s.warnings for s in out)
    with pytest.raises(AssertionError):
        run(True)


def test_the_guard_falls_back_on_kept_draws_the_checker_judged_still_matching_as_published(faces, model):
    """The guard's own check on the bare crop passes these draws; the checker, judging each as the published
    image will show it (pasted into its photo, at the metrics' resolution), does not: with redraws,
    either verdict sends the face to the fallback. Withheld with fallback 'withhold'."""
    from pipeline.identity_guard import IdentityGuard

    samples, items = faces
    guard = IdentityGuard(R, 0.6, "fallback")
    guard.setup(torch.device("cpu"))

    def run(margin, fallback="pixelate"):
        copies = [Sample(s.raw, image=s.image, faces=[type(f)(**{**f.__dict__}) for f in s.faces]) for s in samples]
        stage = AnonymizeStage({"g2face": model, "pixelate": PixelateAnonymizer(R, 8)}, 8, "cpu",
                               payload_mode="irreversible", identity_guard=guard, fallback=fallback, draws=2,
                               draw_checker=_checker(identity_margin=margin))
        stage.setup()
        return stage.process(copies)

    def g2face_faces(out):
        return [f for s in out for f in s.faces if f.seed in {g.seed for _, _, g in items}]

    lenient = g2face_faces(run(-0.6))  # every draw passes the checker: the bare-crop guard alone decides
    assert all(f.method == "g2face" for f in lenient), [f.fallback_reason for f in lenient]
    assert {f.draw_check for f in lenient} <= {"passed", "weak_detection", "not_detected"}
    strict = g2face_faces(run(1.5))  # no draw reaches distance 2.1: every kept draw judged still matching
    assert [(f.method, f.fallback_reason, f.draw, f.payload_sent, f.draw_check) for f in strict] == \
        [("pixelate", "identity_match", None, None, None)] * len(strict)
    withheld = [s for s in run(1.5, fallback="withhold") if any(f.method == "g2face" for f in s.faces)]
    assert withheld and all(s.status == "withheld" and "margin of it as published" in s.error for s in withheld)


def test_a_failing_redraw_with_the_guard_on_gives_its_faces_the_fallback(faces, model):
    """Nothing judged how the first draws look as published: the guard does not publish them as anonymized."""
    from pipeline.identity_guard import IdentityGuard

    samples, items = faces
    guard = IdentityGuard(R, 0.6, "fallback")
    copies = [Sample(s.raw, image=s.image, faces=[type(f)(**{**f.__dict__}) for f in s.faces]) for s in samples]
    stage = AnonymizeStage({"g2face": model, "pixelate": PixelateAnonymizer(R, 8)}, 8, "cpu",
                           payload_mode="irreversible", identity_guard=guard, draws=3,
                           draw_checker=DrawChecker(64, 0.6))  # judges 64 px crops: fails on these 128 px draws
    stage.setup()
    out = stage.process(copies)
    seeds = {f.seed for _, _, f in items}
    guarded = [f for s in out for f in s.faces if f.seed in seeds]
    assert [(f.method, f.fallback_reason) for f in guarded] == [("pixelate", "identity_unchecked")] * len(items)
    assert all(s.status == "ok" and s.warnings[0].startswith("redraw failed") for s in out
               if any(f.seed in seeds for f in s.faces))


@pytest.mark.parametrize("where", ["middle", "large", "huge", "border", "small", "centred_outside",
                                   "outside_left_of_wide_photo", "outside_bottom_right_of_wide_photo",
                                   "rotated_at_corner", "grey"])
def test_a_draw_is_judged_as_pasting_it_into_the_whole_photo_shows_it(where):
    """The checker renders a draw in its face's patch of the photo; that must give, up to rounding, what pasting
    it into the whole photo and cutting the metrics crop from that gives (including the pre-blur of a large
    face that the metrics crop shrinks, and the mirror at the photo's border). The large and huge faces sit
    well inside a bigger photo, and faces centred just outside a wide photo read it mirrored past their
    footprint, so their patches stop short of the photo's far edges and the patch's extent is what keeps the
    result right; the huge face is shrunk past 0.1x (pre-blur sigma 3 px), and its photo turns white 5 px
    outside its paste region, which the blur reaches only if the margin grows with sigma. A face at a corner
    is turned 40 degrees; a grey photo is published in grey, so its draws are judged in grey."""
    from pipeline import align
    from pipeline.imaging import decode_image, encode_image
    from pipeline.metrics_stage import face_crops, metric_transform
    from pipeline.redraw import face_patch, render_as_published

    rng = np.random.default_rng(7)
    height, width = {"large": (1500, 2000), "huge": (4000, 4000), "outside_left_of_wide_photo": (1500, 2000),
                     "outside_bottom_right_of_wide_photo": (1500, 2000)}.get(where, (600, 800))
    photo = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    photo = np.ascontiguousarray(np.repeat(np.repeat(photo, 4, 0), 4, 1))  # some structure to blur
    centre, eye_gap = {"middle": ((400, 300), 60), "large": ((1020, 760), 260), "huge": ((2000, 1900), 800),
                       "border": ((40, 30), 70), "small": ((600, 450), 12),
                       "centred_outside": ((-8, 300), 70), "outside_left_of_wide_photo": ((-8, 700), 70),
                       "grey": ((380, 290), 60),
                       "outside_bottom_right_of_wide_photo": ((2030, 1530), 70),
                       "rotated_at_corner": ((30, 560), 70)}[where]
    lm = np.array([[-0.5, -0.4], [0.5, -0.4], [0.0, 0.1], [-0.4, 0.6], [0.4, 0.6]])
    if where == "rotated_at_corner":
        turn = np.deg2rad(40)
        lm = lm @ np.array([[np.cos(turn), np.sin(turn)], [-np.sin(turn), np.cos(turn)]])
    lm = lm * eye_gap + centre
    m = align.landmark_transform(lm, R)
    if where in ("large", "huge", "outside_left_of_wide_photo", "outside_bottom_right_of_wide_photo"):
        patch = face_patch(photo, m, R, 256).pixels
        assert patch.shape[0] < height and patch.shape[1] < width  # the patch is a part of the photo
    if where == "huge":
        assert align.transform_scale(metric_transform(m, R, 256)) < 0.1
        x0, y0, x1, y1 = align.paste_region(m, R, width, height)
        inside = photo[y0 - 5:y1 + 5, x0 - 5:x1 + 5] // 4
        photo[:] = 255
        photo[y0 - 5:y1 + 5, x0 - 5:x1 + 5] = inside
    grey = where == "grey"
    if grey:  # a grey photo (decoded: three equal channels), written in grey as its input was
        photo = decode_image(encode_image(photo, None, "L", "PNG", 95), 10**8).rgb
    draws = torch.rand(2, 3, R, R, generator=torch.Generator().manual_seed(3))
    before = photo.copy()
    seen = render_as_published(draws, [face_patch(photo, m, R, 256, grey)] * 2, R, 256)
    assert np.array_equal(photo, before)  # the photo itself is never written
    for k in range(2):
        whole = photo.copy()
        crop = draws[k].mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        align.paste_back(whole, np.ascontiguousarray(crop), m)
        if grey:  # what the published file decodes to
            whole = decode_image(encode_image(whole, None, "L", "PNG", 95), 10**8).rgb
        expected = face_crops(whole, m, R, 256)
        diff = np.abs(seen[k].astype(int) - expected)
        # The patch's transform is the photo's shifted by whole pixels; OpenCV's fixed-point sampling positions
        # can round the other way on a rare pixel (which a small face then spreads over the upscaled crop).
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())
    assert not np.array_equal(seen[0], seen[1])


def test_axis_reach_spans_exactly_the_pixels_mirrored_reads_touch():
    """face_patch's span on each axis, against OpenCV's own BORDER_REFLECT101 index rule, read by read."""
    import cv2

    from pipeline.redraw import _axis_reach

    for size in range(1, 14):
        for lo in range(-3 * size, 2 * size):
            for hi in range(lo + 1, 3 * size + 1):
                if hi <= 0 or lo >= size:
                    continue  # no read on the axis: face_patch refuses such a face
                touched = [cv2.borderInterpolate(p, size, cv2.BORDER_REFLECT_101) for p in range(lo, hi)]
                assert _axis_reach(lo, hi, size) == (min(touched), max(touched) + 1), (lo, hi, size)


@pytest.mark.parametrize("hold", [True, False])
def test_a_face_only_a_push_anonymized_is_drawn_on_with_weaker_pushes(faces, model, hold):
    """With push_hold, a face whose plain draw still matched and whose first pushed draw got past the identity
    check (but was not found) is drawn on halfway between the strongest push that left it matching and the
    weakest that anonymized it; without, it goes back to plain draws."""
    _, items = faces
    x, seeds, refs = _inputs(items)
    n = len(items)
    found_by_none = _checker(match_iou=1.01)  # nothing is found: every face uses all its draws
    reference = found_by_none.reference(refs)
    with torch.inference_mode():
        y0 = model.anonymize(x, seeds)
        pushed1 = model.anonymize(x, [draw_seed(s, 1) for s in seeds], identity_push=[0.5] * n)
    d0 = found_by_none.judge(reference, y0, np.arange(n)).distance
    d1 = found_by_none.judge(reference, pushed1, np.arange(n)).distance
    i = int(np.argmax(d1 - d0))
    assert d1[i] > d0[i] + 0.02, (d0, d1)  # the push moves the draw away from the original
    # identity threshold halfway: face i's plain draw still matches, its first pushed draw is anonymized
    checker = _checker(match_iou=1.01, identity_margin=(d0[i] + d1[i]) / 2 - 0.6)
    anonymize, calls = _recording(model)
    with torch.inference_mode():
        _, kept, verdict, pushed = redraw(anonymize, checker, checker.reference(refs), x, y0, seeds, 4,
                                          push=0.5, push_after=1, push_hold=hold)
        strengths = [c if c is not None else [0.0] * n for c in calls]
        draw2 = model.anonymize(x, [draw_seed(s, 2) for s in seeds], identity_push=strengths[1])
    plain0 = checker.judge(reference, y0, np.arange(n)).anonymized
    push1 = checker.judge(reference, pushed1, np.arange(n)).anonymized
    assert not plain0[i] and push1[i]
    assert len(strengths) == 3 and strengths[0] == [0.0 if a else 0.5 for a in plain0]
    if hold:  # 0.25 (between 0 and 0.5), then 0.125 if that anonymized it, else 0.375
        third = 0.125 if checker.judge(reference, draw2[i:i + 1], np.array([i])).anonymized[0] else 0.375
        assert [strengths[1][i], strengths[2][i]] == [0.25, third], strengths
    else:
        assert [strengths[1][i], strengths[2][i]] == [0.0, 0.0], strengths
    assert verdict.anonymized[i] and kept[i] >= 1 and pushed[i] == strengths[kept[i] - 1][i]
    for j in np.flatnonzero(~plain0 & ~push1):  # no draw anonymized yet: the rising schedule either way
        assert strengths[1][j] == pytest.approx(push_strength(2, 4, 0.5, 1))
