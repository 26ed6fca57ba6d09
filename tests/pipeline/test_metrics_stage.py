"""The metrics stage: measured on the written bytes, monotone in how much a face changes, in the manifests."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import DEMO_SHARDS, job_tree
from pipeline import align
from pipeline.anonymizers import BlurAnonymizer, PixelateAnonymizer
from pipeline.imaging import decode_image
from pipeline.manifest import METRICS_TYPE, PUBLIC_SCHEMA
from pipeline.metrics_stage import (
    FIELDS,
    FaceMeasurer,
    MetricsStage,
    aligned_reference_box,
    best_match,
    box_distance,
    box_in_crop,
    metric_model_hashes,
)
from pipeline.models import WeightsError
from pipeline.runner import run_job
from pipeline.shardio import RawSample, read_webdataset
from pipeline.spec import JobSpecError, parse_spec
from pipeline.stages import AlignStage, AnonymizeStage, DecodeStage, DetectStage, PasteEncodeStage, Sample, StageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def measurer(one_torch_thread) -> FaceMeasurer:
    m = FaceMeasurer()
    m.setup()
    return m


def _anonymized_samples(sigma: float, shard=DEMO_SHARDS[0]) -> list[Sample]:
    """The demo portraits through the real stages up to the encoded output (blur of the given strength)."""
    samples = [Sample(r) for r in read_webdataset(str(shard), None)]
    stages = [
        DecodeStage(10**8, False),
        DetectStage(16, (0.6, 0.7, 0.7), 0.709, 0.8, 1280, False, 128, "cpu"),
        AlignStage(128, "blur", "pixelate", 32, 0.95, 0, "pass"),
        AnonymizeStage({"blur": BlurAnonymizer(128, sigma), "pixelate": PixelateAnonymizer(128, 8)}, 16, "cpu"),
        PasteEncodeStage("png", 95, "pass"),
    ]
    for st in stages:
        st.setup()
        samples = st.process(samples)
    assert all(s.out_bytes for s in samples)
    return samples


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _values(samples, key):
    return np.array([np.nan if f.metrics[key] is None else float(f.metrics[key]) for s in samples for f in s.faces])


def test_box_helpers():
    assert box_distance([0, 0, 10, 10], [3, 4, 10, 10])[0] == pytest.approx(2.5)  # corners 5 and 0 px apart
    boxes = np.array([[0, 0, 10, 10], [50, 50, 100, 100], [55, 50, 100, 100]])
    assert best_match(boxes, np.array([54, 50, 100, 100]), 0.5) == 2
    assert best_match(boxes, np.array([200, 200, 250, 250]), 0.1) is None
    assert best_match(np.zeros((0, 4)), np.array([0, 0, 1, 1]), 0.1) is None
    rot90 = np.array([[0.0, -1.0, 100.0], [1.0, 0.0, 0.0]])  # (x, y) -> (100 - y, x)
    np.testing.assert_allclose(box_in_crop([10, 20, 30, 60], rot90), [40, 10, 80, 30])


def test_unchanged_output_measures_as_identical(measurer):
    samples = _anonymized_samples(0.08)
    for s in samples:
        s.out_bytes = _png(s.image.rgb)  # as if the anonymizer had changed nothing
    MetricsStage(measurer, 128, False, 10**8).process(samples)
    for s in samples:
        assert s.metrics_error is None
        for f in s.faces:
            m = f.metrics
            assert set(m) == set(FIELDS) and m["resolution"] == 256
            assert m["identity_distance"] == pytest.approx(0, abs=1e-5)
            assert m["mtcnn_original"] and m["mtcnn_redetected"] and m["hog_original"] and m["hog_redetected"]
            assert m["mtcnn_box_iou"] == pytest.approx(1, abs=1e-5) and m["hog_box_iou"] == pytest.approx(1, abs=1e-5)
            for k in (
                "mtcnn_box_distance",
                "mtcnn_landmark_distance",
                "hog_box_distance",
                "landmark68_distance",
                "shape_distance",
                "expression_distance",
                "pose_distance",
            ):
                assert m[k] == pytest.approx(0, abs=1e-3), k
            assert m["recognizer_cosine"] is None


def test_stronger_anonymization_moves_every_metric(measurer):
    mild, heavy = _anonymized_samples(0.01), _anonymized_samples(0.08)
    for batch in (mild, heavy):
        MetricsStage(measurer, 128, False, 10**8).process(batch)
    # Mild blur keeps identity and detectability; the default blur loses both (measured: 0.28-0.36 vs 0.66-0.81).
    assert np.all(_values(mild, "identity_distance") < 0.6)
    assert np.all(_values(heavy, "identity_distance") > 0.6)
    assert _values(mild, "mtcnn_redetected").mean() == 1 and _values(mild, "hog_redetected").mean() == 1
    assert _values(heavy, "mtcnn_redetected").mean() < 0.5 and _values(heavy, "hog_redetected").mean() < 0.5
    for key in ("landmark68_distance", "pose_distance", "expression_distance"):
        assert np.mean(_values(heavy, key)) > 2 * np.mean(_values(mild, key)), key
    assert np.all(np.isnan(_values(heavy, "mtcnn_box_distance")) == ~_values(heavy, "mtcnn_redetected").astype(bool))


def test_faces_are_batched_across_images_without_changing_results(measurer):
    samples = _anonymized_samples(0.02)
    crops, anon, refs = [], [], []
    for s in samples:
        written = decode_image(s.out_bytes, 10**8).rgb
        for f in s.faces:
            m = f.transform * 2.0  # 128 -> 256 px crops
            crops.append(align.warp_to_crop(s.image.rgb, m, 256))
            anon.append(align.warp_to_crop(written, m, 256))
            refs.append(box_in_crop(f.box, m))
    crops, anon, refs = np.stack(crops), np.stack(anon), np.stack(refs)
    together = measurer.measure(crops, anon, refs)
    one_by_one = [measurer.measure(crops[i : i + 1], anon[i : i + 1], refs[i : i + 1])[0] for i in range(len(crops))]
    for a, b in zip(together, one_by_one):
        for k in FIELDS:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], abs=2e-3), k
            else:
                assert a[k] == b[k], k


def test_aligned_corpus_uses_the_template_reference_box(measurer):
    samples = _anonymized_samples(0.01)
    # An FFHQ-style aligned corpus: the demo faces warped to the template, each image one face.
    aligned_pngs = [_png(align.warp_to_crop(s.image.rgb, s.faces[0].transform * 2.0, 256)) for s in samples]
    batch = [Sample(RawSample(i, f"a{i}", {"png": p}, "png")) for i, p in enumerate(aligned_pngs)]
    stages = [
        DecodeStage(10**8, False),
        DetectStage(16, (0.6, 0.7, 0.7), 0.709, 0.8, 1280, True, 128, "cpu"),
        AlignStage(128, "blur", "pixelate", 32, 0.95, 0, "pass"),
        AnonymizeStage({"blur": BlurAnonymizer(128, 0.01)}, 16, "cpu"),
        PasteEncodeStage("png", 95, "pass"),
        MetricsStage(measurer, 128, True, 10**8),
    ]
    for st in stages:
        batch = st.process(batch)
    assert all(f.metrics["mtcnn_original"] and f.metrics["hog_original"] for s in batch for f in s.faces)
    assert _values(batch, "mtcnn_redetected").mean() == 1
    ref = aligned_reference_box(256)
    assert ref[0] < 128 < ref[2] and ref[1] < 128 < ref[3]


def test_unreadable_output_is_recorded_and_the_image_stays_published(measurer):
    samples = _anonymized_samples(0.08)[:2]
    samples[0].out_bytes = b"not an image"
    MetricsStage(measurer, 128, False, 10**8).process(samples)
    assert "cannot re-read the written image" in samples[0].metrics_error
    assert samples[0].status == "ok" and samples[0].out_bytes == b"not an image"
    assert all(f.metrics is None for f in samples[0].faces)
    assert samples[1].metrics_error is None and samples[1].faces[0].metrics is not None
    samples[0].metrics_error = None
    with pytest.raises(StageError, match="cannot re-read"):
        MetricsStage(measurer, 128, False, 10**8, fail_fast=True).process(samples[:1])


def test_job_writes_metrics_into_the_public_manifest_and_the_switch_turns_them_off(tmp_path):
    on = run_job(parse_spec(job_tree(tmp_path / "on", DEMO_SHARDS[0])), echo=lambda *_: None)
    rows = pq.read_table(tmp_path / "on" / "manifests" / f"{DEMO_SHARDS[0].name}.parquet").to_pylist()
    faces = [f for r in rows for f in r["faces"]]
    assert len(faces) == 6 and all(set(f["metrics"]) == {n for n in METRICS_TYPE.names} for f in faces)
    assert all(f["metrics"]["identity_distance"] > 0.6 for f in faces)  # the default blur
    assert set(FIELDS) == set(METRICS_TYPE.names)
    assert {"dlib/dlib_face_recognition_resnet_model_v1.dat", "dlib/shape_predictor_68_face_landmarks.dat"} <= set(
        on["metric_model_hashes"]
    )
    assert (
        pq.read_schema(tmp_path / "on" / "manifests" / f"{DEMO_SHARDS[0].name}.parquet").field("faces").type
        == PUBLIC_SCHEMA.field("faces").type
    )

    off = run_job(
        parse_spec(job_tree(tmp_path / "off", DEMO_SHARDS[0], metrics={"enabled": False})), echo=lambda *_: None
    )
    rows = pq.read_table(tmp_path / "off" / "manifests" / f"{DEMO_SHARDS[0].name}.parquet").to_pylist()
    assert all(f["metrics"] is None for r in rows for f in r["faces"]) and off["metric_model_hashes"] == {}
    assert on["fingerprint"] != off["fingerprint"], "a resumed run must not mix measured and unmeasured shards"
    # The switch never changes the published bytes.
    assert (tmp_path / "on" / "shards" / DEMO_SHARDS[0].name).read_bytes() == (
        tmp_path / "off" / "shards" / DEMO_SHARDS[0].name
    ).read_bytes()


def test_optional_recognizer_is_hash_checked_and_strictly_loaded(tmp_path, measurer):
    from g2face.arcface import IResNet
    from g2face.dlib_format import file_sha256

    torch.manual_seed(0)
    path = tmp_path / "arcface.pt"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in IResNet("iresnet50").state_dict().items()}, path
    )
    sha = file_sha256(path)
    assert f"recognizer/{path.name}" in metric_model_hashes((str(path), "iresnet50", sha))
    with pytest.raises(WeightsError, match="recognizer_sha256"):
        metric_model_hashes((str(path), "iresnet50", "0" * 64))
    with pytest.raises(JobSpecError, match="recognizer_sha256"):
        parse_spec(job_tree(tmp_path / "o", DEMO_SHARDS[0], metrics={"recognizer_checkpoint": str(path)}))

    with_rec = FaceMeasurer(recognizer=(str(path), "iresnet50", sha), batch_size=4)
    samples = _anonymized_samples(0.08)[:2]
    crops = np.stack([align.warp_to_crop(s.image.rgb, s.faces[0].transform * 2.0, 256) for s in samples])
    refs = np.stack([box_in_crop(s.faces[0].box, s.faces[0].transform * 2.0) for s in samples])
    same = with_rec.measure(crops, crops, refs)
    assert all(m["recognizer_cosine"] == pytest.approx(1.0, abs=1e-4) for m in same)
    swapped = with_rec.measure(crops, crops[::-1].copy(), refs)
    assert all(-1 <= m["recognizer_cosine"] < 0.9999 for m in swapped)
