"""MTCNN's RNet/ONet port as the detectability prior: same numbers as facenet-pytorch, real faces accepted at
the aligned-crop box, wrong files refused by name."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from facenet_pytorch.models.mtcnn import ONet as FacenetONet
from facenet_pytorch.models.mtcnn import RNet as FacenetRNet
from hiding_model import aligned_demo_faces

from g2face import mtcnn


@pytest.fixture(scope="module")
def detector():
    return mtcnn.load_face_detectability()


@pytest.fixture(scope="module")
def faces():
    crops = aligned_demo_faces(128)[3]
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_nets_give_facenet_pytorchs_probabilities(detector):
    torch.manual_seed(0)
    x48, x24 = torch.randn(4, 3, 48, 48), torch.randn(4, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(detector.onet(x48).softmax(1), FacenetONet()(x48)[2], atol=1e-6)
        assert torch.allclose(detector.rnet(x24).softmax(1), FacenetRNet()(x24)[1], atol=1e-6)


def test_aligned_faces_pass_both_nets_and_noise_does_not(detector, faces):
    with torch.no_grad():
        z_r, z_o = detector(faces)
        assert (z_r.sigmoid() >= 0.7).all() and (z_o.sigmoid() >= 0.7).all()  # MTCNN's own thresholds
        torch.manual_seed(1)
        jitter = torch.randn(len(faces), 3) * torch.tensor([0.05, 0.05, 0.1])
        assert (detector(faces, jitter)[1].sigmoid() >= 0.7).float().mean() >= 0.9
        noise = torch.rand_like(faces) * 2 - 1
        z_r, z_o = detector(noise)
        assert (z_o.sigmoid() < 0.5).all()
        # the loss orders them and is near zero for real faces
        assert mtcnn.detectability_loss(detector(faces)) < 0.1 < mtcnn.detectability_loss(detector(noise))


@pytest.mark.parametrize("size", [24, 48])
def test_crop_box_is_the_documented_square_of_the_crop(size):
    """Crops holding their own x (y) pixel-centre coordinate: each output pixel is the mean over its cell of
    the box, so the first and last columns (rows) sit half a cell inside centre -+ side/2."""
    r = 128
    coord = (torch.arange(r, dtype=torch.float32) + 0.5) / r
    side = mtcnn.CROP_BOX_SIDE
    for axis, centre in ((3, mtcnn.CROP_BOX_CENTRE[0]), (2, mtcnn.CROP_BOX_CENTRE[1])):
        shape = [1, 1, 1, 1]
        shape[axis] = r
        ramp = coord.view(shape).expand(1, 3, r, r)
        line = mtcnn.crop_box(ramp, size).select(5 - axis, 0)[0, 0]  # along the ramp's axis
        half_cell = side / size / 2
        assert line[0].item() == pytest.approx(centre - side / 2 + half_cell, abs=1e-3)
        assert line[-1].item() == pytest.approx(centre + side / 2 - half_cell, abs=1e-3)
        assert torch.all(line.diff() > 0)


def test_crop_box_averages_like_an_area_resize():
    """Noise shrunk into the box keeps the spread of an area resize (no skipped input pixels)."""
    torch.manual_seed(2)
    noise = torch.randn(8, 3, 128, 128)
    side_px = round(mtcnn.CROP_BOX_SIDE * 128)
    for size in (24, 48):
        ours = mtcnn.crop_box(noise, size).std().item()
        area = F.interpolate(noise[..., :side_px, :side_px], size=(size, size), mode="area").std().item()
        assert ours == pytest.approx(area, rel=0.2)


def test_gradient_reaches_the_image(detector, faces):
    x = faces[:2].clone().requires_grad_(True)
    mtcnn.detectability_loss(detector(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in detector.parameters())  # frozen


def test_wrong_or_missing_weights_are_refused_by_name(tmp_path):
    src = mtcnn.default_weights_dir()
    shutil.copyfile(src / "rnet.pt", tmp_path / "rnet.pt")
    with pytest.raises(mtcnn.MTCNNWeightsError, match=r"onet\.pt: MTCNN weights not found"):
        mtcnn.load_face_detectability(tmp_path)
    blob = bytearray((src / "onet.pt").read_bytes())
    blob[-100] ^= 0xFF
    (tmp_path / "onet.pt").write_bytes(bytes(blob))
    with pytest.raises(mtcnn.MTCNNWeightsError, match=r"onet\.pt: sha256 .* is not facenet-pytorch"):
        mtcnn.load_face_detectability(tmp_path)
    shutil.copyfile(src / "onet.pt", tmp_path / "onet.pt")
    assert isinstance(mtcnn.load_face_detectability(tmp_path), mtcnn.FaceDetectability)
