"""dlib face-recognition ResNet port: file reader, parity with dlib C++, the aligned-crop -> chip warp, gradients.

Parity uses dlib's own pipeline (HOG detector, 5-point shape predictor, get_face_chip 150/0.25) on the
committed NASA portraits.
"""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch

from g2face import dlib_format
from g2face.dlib_format import MODEL_SHA256, DlibFormatError, default_model_path, read_dlib_network
from g2face.identity import (
    add_zero_padded,
    aligned_to_chip,
    crop_to_chip_matrix,
    identity_cosine,
    identity_distance,
    load_dlib_face_resnet,
    same_person,
)
from conftest import DEMO_SHARDS
from helpers import decode, encode, read_tar

dlib = pytest.importorskip("dlib")


def to_tensor(images: list[np.ndarray], dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(dtype) / 255.0


@pytest.fixture(scope="module")
def portraits() -> list[tuple[str, np.ndarray]]:
    return [(k, decode(v["jpg"])) for p in DEMO_SHARDS for k, v in sorted(read_tar(p).items())]


@pytest.fixture(scope="module")
def dlib_reference(portraits):
    """dlib's chips and descriptors of every portrait: (keys, chips, descriptors (N,128))."""
    models = default_model_path().parent
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    recognizer = dlib.face_recognition_model_v1(str(default_model_path()))
    keys, chips = [], []
    for key, img in portraits:
        dets = detector(img, 1)
        assert len(dets) >= 1, f"dlib finds no face in {key}"
        box = max(dets, key=lambda r: r.area())
        chips.append(dlib.get_face_chip(img, predictor(img, box), size=150, padding=0.25))
        keys.append(key)
    descriptors = np.array([np.array(d) for d in recognizer.compute_face_descriptor(chips)])
    return keys, chips, descriptors


@pytest.fixture(scope="module")
def port():
    return load_dlib_face_resnet()


def test_reader_checks_the_architecture():
    net = read_dlib_network()
    assert len(net.layers) == 108
    assert net.num_params == 5_614_592
    assert net.input_size == (150, 150)
    assert np.allclose(net.channel_means, (122.782, 117.001, 104.298), atol=1e-3)
    assert abs(net.loss["distance_threshold"] - 0.6) < 1e-6
    assert [len(net.by_kind(k)) for k in ("con", "affine", "relu", "add_prev", "avg_pool")] == [29, 29, 29, 14, 5]


def test_parity_with_dlib_on_dlib_chips(dlib_reference, port):
    keys, chips, ref = dlib_reference
    with torch.no_grad():
        out = port(to_tensor(chips)).double().numpy()
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    diff = np.abs(out - ref).max()
    print(f"\nport vs dlib on {len(keys)} NASA chips: min cosine {cos.min():.9f}, max abs diff {diff:.2e}")
    assert cos.min() > 0.99999
    assert diff < 1e-4


def test_batched_float64_and_value_range(dlib_reference, port):
    _, chips, ref = dlib_reference
    x = to_tensor(chips[:3])
    with torch.no_grad():
        batch = port(x)
        single = torch.cat([port(x[i : i + 1]) for i in range(3)])
        as64 = load_dlib_face_resnet(dtype=torch.float64)(x.double())
        signed = load_dlib_face_resnet(value_range=(-1.0, 1.0))(x * 2 - 1)
    assert as64.dtype == torch.float64
    assert torch.allclose(batch, single, atol=1e-5)
    assert torch.allclose(as64.float(), batch, atol=1e-5)
    assert torch.allclose(signed, batch, atol=1e-5)
    assert np.abs(as64.numpy() - ref[:3]).max() < 1e-4
    with pytest.raises(ValueError, match=r"\(N, 3, 150, 150\)"):
        port(torch.zeros(1, 3, 128, 128))


def test_same_person_decisions_match_dlib(dlib_reference, port):
    keys, chips, ref = dlib_reference
    with torch.no_grad():
        d = port(to_tensor(chips))
    ref = torch.from_numpy(ref).float()
    ours = same_person(d[:, None], d[None])
    theirs = identity_distance(ref[:, None], ref[None]) < 0.6
    assert torch.equal(ours, theirs)
    assert bool(ours.diagonal().all())
    # Twelve astronauts; under dlib's 0.6 rule only the identical twins Mark and Scott Kelly may match.
    matched = {tuple(sorted((keys[i], keys[j]))) for i, j in zip(*np.nonzero(ours.numpy())) if i != j}
    assert matched <= {("nasa_Mark_Kelly", "nasa_Scott_Kelly")}, matched
    assert torch.allclose(identity_cosine(d, d), torch.ones(len(d)))


def test_add_zero_padded_pads_at_the_end():
    a = torch.ones(2, 4, 3, 3)
    b = torch.full((2, 2, 4, 4), 2.0)
    s = add_zero_padded(a, b)
    assert s.shape == (2, 4, 4, 4)
    assert torch.all(s[:, :2, :3, :3] == 3) and torch.all(s[:, 2:, :3, :3] == 1)
    assert torch.all(s[:, :2, 3, :] == 2) and torch.all(s[:, 2:, 3, :] == 0)


@pytest.fixture(scope="module")
def mtcnn_faces(portraits):
    """The pipeline's MTCNN detection on every portrait; alignment runs per test at its resolution."""
    from pipeline.shardio import RawSample
    from pipeline.spec import DetectionSpec
    from pipeline.stages import DetectStage, Sample
    from pipeline.imaging import decode_image

    spec = DetectionSpec()
    stage = DetectStage(spec.min_face_size, spec.stage_thresholds, spec.scale_factor, spec.low_score_threshold,
                        spec.max_side, False, 128, "cpu")
    stage.setup()
    samples = []
    for i, (key, img) in enumerate(portraits):
        s = Sample(RawSample(i, key, {"png": b""}, "png"))
        s.image = decode_image(encode(img, "PNG"), 10**8, False)
        samples.append(s)
    stage.process(samples)
    for s in samples:
        assert s.faces, f"MTCNN finds no face in {s.raw.key}"
        s.faces = [max(s.faces, key=lambda f: f.box[2] - f.box[0])]
    return samples


@pytest.mark.parametrize("resolution, min_cos", [(128, 0.98), (256, 0.99)])
def test_warp_from_pipeline_aligned_face(mtcnn_faces, dlib_reference, port, resolution, min_cos):
    import copy

    from pipeline import align
    from pipeline.stages import AlignStage

    samples = copy.deepcopy(mtcnn_faces)
    AlignStage(resolution, "blur", "pixelate", 0, 0.0, 0, "pass").process(samples)
    crops = to_tensor([s.faces[0].crop for s in samples])
    assert crops.shape[-1] == resolution
    with torch.no_grad():
        out = port(aligned_to_chip(crops, align.template(resolution)))
    _, _, ref = dlib_reference
    ref = torch.from_numpy(ref).float()
    cos = identity_cosine(out, ref)
    dist = identity_distance(out, ref)
    print(f"\nwarp R={resolution}: cosine to dlib mean {cos.mean():.4f} min {cos.min():.4f}; "
          f"distance mean {dist.mean():.3f} max {dist.max():.3f}")
    assert cos.mean() > 0.99
    assert cos.min() > min_cos
    assert bool((dist < 0.6).all())  # the warped face still matches its own dlib descriptor


def test_warp_matches_opencv_geometry():
    """aligned_to_chip samples where crop_to_chip_matrix says (checked against cv2.warpAffine)."""
    from pipeline import align

    ys, xs = np.mgrid[0:128, 0:128].astype(np.float64)
    smooth = np.stack([127 + 100 * np.sin(xs / 9.0), 127 + 100 * np.cos(ys / 7.0), (xs + ys) * 0.9], -1)
    crop = np.clip(smooth, 0, 255).astype(np.float32)
    ours = aligned_to_chip(torch.from_numpy(crop).permute(2, 0, 1)[None], align.template(128))[0].permute(1, 2, 0)
    m = crop_to_chip_matrix(align.template(128))
    theirs = cv2.warpAffine(crop, m, (150, 150), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(ours.numpy() - theirs)[2:-2, 2:-2].max() < 0.1

    # A 512 px crop of the same pattern (pooled before sampling) lands on the same chip.
    ys5, xs5 = np.mgrid[0:512, 0:512].astype(np.float64) / 4  # template(512) = 4 * template(128)
    big = np.stack([127 + 100 * np.sin(xs5 / 9.0), 127 + 100 * np.cos(ys5 / 7.0), (xs5 + ys5) * 0.9], -1)
    big_t = torch.from_numpy(np.clip(big, 0, 255).astype(np.float32)).permute(2, 0, 1)[None]
    from_big = aligned_to_chip(big_t, align.template(512))[0].permute(1, 2, 0)
    assert np.abs(from_big.numpy() - ours.numpy())[2:-2, 2:-2].mean() < 0.25


def test_chip_pixel_centres_follow_dlib(portraits):
    """dlib's chip pixel (u, v) sits at template coordinate (u + .5, v + .5): the offset chip_template_points uses."""
    from g2face.identity import similarity_fit

    models = default_model_path().parent
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    # dlib's 5-point chip template (get_face_chip_details), as fractions of the unpadded face box.
    five = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                     [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                     [0.4901123135679, 0.6277975316475]])
    template = (0.25 + five) / 1.5 * 150
    for _, img in portraits[:3]:
        shape = predictor(img, max(detector(img, 1), key=lambda r: r.area()))
        pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        chip = dlib.get_face_chip(img, shape, size=150, padding=0.25).astype(np.float32)
        errors = {}
        for offset in (0.0, -0.5):
            m = similarity_fit(pts, template + offset)
            ours = cv2.warpAffine(img, m, (150, 150), flags=cv2.INTER_LINEAR).astype(np.float32)
            errors[offset] = np.abs(ours - chip)[8:-8, 8:-8].mean()
        assert errors[-0.5] < 1.5 and errors[0.0] > 2 * errors[-0.5], errors


def test_gradients_reach_the_input(dlib_reference):
    """Autograd through warp + network agrees with a finite difference (float64)."""
    from pipeline import align

    _, chips, _ = dlib_reference
    model = load_dlib_face_resnet(dtype=torch.float64)
    crop = cv2.resize(chips[0], (128, 128), interpolation=cv2.INTER_AREA)
    gen = torch.Generator().manual_seed(0)
    # A little noise breaks max-pool ties on flat regions, where the gradient is not unique.
    x = (to_tensor([crop], torch.float64) + 0.01 * torch.rand(1, 3, 128, 128, generator=gen, dtype=torch.float64))
    x.requires_grad_(True)
    target = torch.randn(1, 128, generator=gen, dtype=torch.float64)

    def loss(inp):
        return (model(aligned_to_chip(inp, align.template(128))) * target).sum()

    loss(x).backward()
    g = x.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert (g.abs().sum(dim=1) > 0).float().mean() > 0.3  # most pixels feed the chip
    direction = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    direction /= direction.norm()
    # ReLU and max-pool kinks are dense in input space: keep the step tiny (float64 has room for it).
    eps = 1e-6
    with torch.no_grad():
        numeric = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
    analytic = (g * direction).sum()
    assert abs(float(numeric - analytic)) <= 1e-4 * abs(float(analytic)) + 1e-8


def test_pinned_hash_and_wrong_file_refused(tmp_path):
    path = default_model_path()
    assert dlib_format.file_sha256(path) == MODEL_SHA256
    bad = tmp_path / path.name
    shutil.copy(path, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a weight
    bad.write_bytes(bytes(data))
    with pytest.raises(DlibFormatError) as err:
        load_dlib_face_resnet(bad)
    assert str(bad) in str(err.value) and MODEL_SHA256 in str(err.value)


def test_structure_checked_without_hash(tmp_path):
    data = default_model_path().read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DlibFormatError, match="truncated"):
        read_dlib_network(truncated, expected_sha256=None)

    renamed = tmp_path / "renamed.dat"
    renamed.write_bytes(data.replace(b"con_4", b"con_5", 1))
    with pytest.raises(DlibFormatError, match=r"renamed\.dat.*expected layer record 'con_4', found 'con_5'"):
        read_dlib_network(renamed, expected_sha256=None)

    # Flip the stem's stride from 2 to 1: the reader checks settings against the architecture.
    stream = dlib_format._Stream(data, renamed)
    stream.pos = data.index(b"con_4") - 2  # the length "01 05" precedes it
    stream.string()
    stream.tensor()
    for _ in range(3):  # filters, kernel rows, kernel columns
        stream.integer()
    assert data[stream.pos : stream.pos + 2] == bytes([0x01, 0x02])
    restrided = tmp_path / "restrided.dat"
    restrided.write_bytes(data[: stream.pos + 1] + bytes([0x01]) + data[stream.pos + 2 :])
    with pytest.raises(DlibFormatError, match="con_4 stride_y: expected 2, found 1"):
        read_dlib_network(restrided, expected_sha256=None)


def test_compact_fp16_copy_agrees_with_dlib_and_is_checked(tmp_path, dlib_reference):
    """The fp16 copy a GPU lease carries (half the .dat's size) gives dlib's decisions, and an edited copy or one
    made from another file is refused."""
    from g2face.identity import save_compact_dlib_weights

    compact = tmp_path / "dlib_resnet_fp16.pt"
    save_compact_dlib_weights(compact)
    assert compact.stat().st_size < 0.55 * default_model_path().stat().st_size
    keys, chips, ref = dlib_reference
    with torch.no_grad():
        out = load_dlib_face_resnet(compact)(to_tensor(chips)).double().numpy()
    assert np.abs(out - ref).max() < 5e-3  # fp16 weights: a small error next to the 0.6 threshold
    d_ref = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
    d_out = np.linalg.norm(out[:, None] - out[None], axis=-1)
    assert ((d_ref < 0.6) == (d_out < 0.6)).all()
    blob = torch.load(compact, weights_only=True)
    blob["state_dict"]["fc.weight"][0, 0] += 1
    torch.save(blob, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="do not match their stored digest"):
        load_dlib_face_resnet(tmp_path / "edited.pt")
    blob = torch.load(compact, weights_only=True)
    blob["source_sha256"] = "0" * 64
    torch.save(blob, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not the expected"):
        load_dlib_face_resnet(tmp_path / "other.pt")
