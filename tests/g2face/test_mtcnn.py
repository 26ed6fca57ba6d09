"""MTCNN's RNet/ONet port as the detectability prior: same numbers as facenet-pytorch, real faces accepted at
the aligned-crop box, wrong files refused by name."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
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


def test_crop_box_is_the_documented_square_of_the_crop():
    """A crop holding its own x coordinate: the box's left/right columns sit at centre -+ side/2."""
    r = 128
    ramp = torch.linspace(0, 1, r).view(1, 1, 1, r).expand(1, 3, r, r) * (r - 1) / r + 0.5 / r
    out = mtcnn.crop_box(ramp, 48)
    cx, side = mtcnn.CROP_BOX_CENTRE[0], mtcnn.CROP_BOX_SIDE
    half_px = side / 48 / 2  # half an output pixel, in crop fractions
    assert out[0, 0, 0, 0].item() == pytest.approx(cx - side / 2 + half_px, abs=0.01)
    assert out[0, 0, 0, -1].item() == pytest.approx(cx + side / 2 - half_px, abs=0.01)


def test_gradient_reaches_the_image(detector, faces):
    x = faces[:2].clone().requires_grad_(True)
    mtcnn.detectability_loss(detector(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in detector.parameters())  # frozen


def test_wrong_or_missing_weights_are_refused_by_name(tmp_path):
    src = mtcnn.default_weights_dir()
    shutil.copyfile(src / "rnet.pt", tmp_path / "rnet.pt")
    with pytest.raises(FileNotFoundError, match="onet.pt"):
        mtcnn.load_face_detectability(tmp_path)
    blob = bytearray((src / "onet.pt").read_bytes())
    blob[-100] ^= 0xFF
    (tmp_path / "onet.pt").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"onet\.pt: sha256 .* is not facenet-pytorch"):
        mtcnn.load_face_detectability(tmp_path)
    shutil.copyfile(src / "onet.pt", tmp_path / "onet.pt")
    assert isinstance(mtcnn.load_face_detectability(tmp_path), mtcnn.FaceDetectability)
