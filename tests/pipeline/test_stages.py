"""Stages without a cluster: detection scale handling, aligned corpora, seeds, size classes."""
import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_SHARDS, job_tree
from helpers import decode, read_tar
from pipeline import align
from pipeline.imaging import decode_image
from pipeline.runner import run_job
from pipeline.shardio import RawSample
from pipeline.spec import parse_spec
from pipeline.stages import AlignStage, DetectStage, Sample, face_seed, size_class


def _sample(arr: np.ndarray, key: str = "k") -> Sample:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    s = Sample(RawSample(0, key, {"png": buf.getvalue()}, "png"))
    s.image = decode_image(buf.getvalue(), 10**9)
    return s


def _detector(max_side: int) -> DetectStage:
    d = DetectStage(16, (0.6, 0.7, 0.7), 0.709, 0.8, max_side, aligned=False, resolution=128, device="cpu")
    d.setup()
    return d


def test_large_images_are_detected_on_a_downscaled_copy_in_original_coordinates():
    portrait = decode(read_tar(DEMO_SHARDS[0])["nasa_Christina_Koch"]["jpg"])
    big = np.asarray(Image.fromarray(portrait).resize((portrait.shape[1] * 3, portrait.shape[0] * 3), Image.BICUBIC))
    small_s, big_s = _sample(portrait), _sample(big)
    _detector(max_side=2000).process([small_s])
    _detector(max_side=portrait.shape[0]).process([big_s])  # forces a 3x downscale for detection
    assert len(small_s.faces) == len(big_s.faces) == 1
    np.testing.assert_allclose(big_s.faces[0].box, small_s.faces[0].box * 3, atol=12)
    np.testing.assert_allclose(big_s.faces[0].landmarks, small_s.faces[0].landmarks * 3, atol=9)


def test_equal_and_unequal_sizes_in_one_batch_match_single_image_detection():
    portraits = [decode(v["jpg"]) for v in read_tar(DEMO_SHARDS[1]).values()][:3]
    singles = [_sample(p) for p in portraits]
    det = _detector(1280)
    for s in singles:
        det.process([s])
    batched = [_sample(p) for p in portraits]
    det.process(batched)
    for a, b in zip(singles, batched):
        assert len(a.faces) == len(b.faces)
        for fa, fb in zip(a.faces, b.faces):
            np.testing.assert_allclose(fa.box, fb.box, atol=1e-3)


def test_aligned_input_skips_detection_and_uses_the_template():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    s = _sample(img)
    DetectStage(16, (0.6, 0.7, 0.7), 0.709, 0.8, 1280, aligned=True, resolution=128, device="cpu").process([s])
    (face,) = s.faces
    np.testing.assert_allclose(face.transform, [[0.5, 0, 0], [0, 0.5, 0]])
    np.testing.assert_allclose(align.apply_transform(face.transform, face.landmarks), align.template(128), atol=1e-9)
    AlignStage(128, "blur", "pixelate", 32, 0.95, 0, "pass").process([s])
    assert face.method == "blur" and face.crop.shape == (128, 128, 3)


def test_aligned_job_anonymizes_each_whole_image_as_one_face(tmp_path):
    out = tmp_path / "out"
    run = run_job(parse_spec(job_tree(out, DEMO_SHARDS[0], input={"aligned": True})), echo=lambda *_: None)
    assert run["counts"]["faces"] == run["counts"]["samples"] == 6
    assert run["model_hashes"] == {}, "no detector is loaded for aligned corpora"


def test_face_seeds_are_deterministic_and_distinct():
    assert face_seed(0, "a", 0) == face_seed(0, "a", 0)
    seeds = {face_seed(s, k, i) for s in (0, 1) for k in ("a", "b") for i in (0, 1)}
    assert len(seeds) == 8 and all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("side,name", [(0, "tiny"), (31.9, "tiny"), (32, "small"), (64, "medium"), (127.9, "medium"), (128, "large"), (5000, "large")])
def test_size_classes_follow_the_schema(side, name):
    assert size_class(side) == name


def test_face_seeds_come_from_the_published_key_never_a_pseudonymized_original(tmp_path):
    """A face's seed fixes its dummy identity and irreversible payload bits and the job seed is public: seeds
    from the original key would let anyone test a guessed name against a published face."""
    from pipeline.keys import create_master_key, load_master_key, pseudonym_key, pseudonymize
    from pipeline.stages import seed_sample_key

    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)

    def seeds(out_key):
        s = _sample(img, key="Jane_Doe")
        s.out_key = out_key
        DetectStage(16, (0.6, 0.7, 0.7), 0.709, 0.8, 1280, aligned=True, resolution=128, device="cpu").process([s])
        AlignStage(128, "g2face", "pixelate", 32, 0.95, 7, "pass").process([s])
        return [f.seed for f in s.faces]

    published = []
    for name in ("a.key", "b.key"):
        create_master_key(tmp_path / name)
        published.append(pseudonymize(pseudonym_key(load_master_key(tmp_path / name)[0], "ds"), "Jane_Doe"))
    a, b = seeds(published[0]), seeds(published[1])
    assert a == [face_seed(7, published[0], 0)] and b == [face_seed(7, published[1], 0)]
    assert a != b and face_seed(7, "Jane_Doe", 0) not in a + b
    # keys kept as they are: seeds as before this rule (the published key is the original)
    assert seeds("Jane_Doe") == [face_seed(7, "Jane_Doe", 0)]
    assert seed_sample_key(None, "Jane_Doe", 3) == "Jane_Doe" and seed_sample_key(None, None, 3) == "3"
    assert seed_sample_key("", "", 3) == "3"  # an empty key seeds from the row index, as it always did


@pytest.mark.parametrize("mode,alpha,input_format,image_format,grey", [
    ("L", False, "JPEG", "keep", True), ("L", False, "PNG", "jpeg", True), ("LA", True, "PNG", "keep", True),
    ("LA", True, "PNG", "jpeg", False), ("RGB", False, "PNG", "png", False), ("RGBA", True, "PNG", "keep", False)])
def test_the_anonymize_stage_tells_the_draw_checker_which_images_are_published_in_grey(
        mode, alpha, input_format, image_format, grey):
    """Grey images are written in grey; the redraw check judges their draws so (pipeline.redraw.FacePatch)."""
    from pipeline.imaging import DecodedImage
    from pipeline.stages import AnonymizeStage

    image = DecodedImage(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8) if alpha else None, mode,
                         input_format, None, None)
    assert AnonymizeStage({}, 8, "cpu", image_format=image_format).published_in_grey(image) == grey
