"""``anonymizer.weights: official``: the paper's configuration (G2Face, Yang et al., TIFS 2024) in the pipeline.

The user supplies the released files (``anonymizer.official``): ``G2Face.pth`` (generator with its StyleGAN2
synthesis weights, mapper, dummy-identity generator and password extractor; read into ``paper-256``),
insightface ArcFace r50 (``ms1mv3_arcface_r50.pth``) and Deep3DFaceRecon (``epoch_20.pth``). The priors are
the ones the official model was trained with, computed the way its code computes them
(``../shared/reference/g2face_facts.md`` §1.4-1.5):

* identity: ArcFace on the whole 256 px aligned frame in [-1, 1], nearest-resized to 112 px, no crop; the raw,
  un-normalised 512-d embedding;
* geometry: Deep3DFaceRecon on the whole 256 px frame in [0, 1] (no 224 crop), and of its 257 coefficients
  the 147 the mapper takes: identity 80 + expression 64 + angles 3.

The BFM file is needed only by the training losses (vertices, landmarks, irradiance); inference uses the
coefficients alone, so ``bfm`` is optional and, when given, only checked to be a MATLAB file.

Payload: the official model hides 16384 bits over the whole 256 px crop, but the pipeline pastes back only a
feathered ellipse, so bits outside the face are lost and a reversible payload will usually not verify; the
verification stage then applies ``anonymizer.on_unverified`` (faces become irreversible or are withheld).
A 512-d ArcFace embedding fits 16384 bits (``pipeline.payload.PayloadLayout(16384, 512)``: one copy).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from .g2face_method import PAYLOAD_MODES, G2FaceUnavailable, irreversible_bits

OFFICIAL_RESOLUTION = 256
ARCFACE_INPUT = 112
_MAT_V5 = b"MATLAB 5.0 MAT-file"
_HDF5 = b"\x89HDF\r\n\x1a\n"  # MATLAB v7.3 files are HDF5 (signature at offset 512)
_FIELDS = {"g2face": "G2Face.pth", "arcface": "ArcFace r50 (ms1mv3_arcface_r50.pth)",
           "deep3d": "Deep3DFaceRecon (epoch_20.pth)", "bfm": "BFM (BFM_model_front.mat)"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def official_geometry(coefficients: torch.Tensor) -> torch.Tensor:
    """(B, 257) Deep3DFaceRecon coefficients -> (B, 147) = id 80 | exp 64 | angles 3, the mapper's input."""
    from g2face.deep3d import split_coefficients

    parts = split_coefficients(coefficients)
    return torch.cat([parts["id"], parts["exp"], parts["angle"]], 1)


def arcface_input(faces: torch.Tensor) -> torch.Tensor:
    """Aligned frames in [0, 1] -> ArcFace input: [-1, 1], nearest-resized to 112 (the official preprocessing)."""
    return F.interpolate(faces * 2 - 1, size=(ARCFACE_INPUT, ARCFACE_INPUT), mode="nearest")


def _unavailable(field: str, path, problem: str) -> G2FaceUnavailable:
    return G2FaceUnavailable(f"anonymizer.official.{field} {path}: {problem}; give the path of the official "
                             f"{_FIELDS[field]}, or set anonymizer.weights: shipped")


def _existing(field: str, path) -> Path:
    if not path:
        raise G2FaceUnavailable(f"anonymizer.official.{field} is not set; give the path of the official {_FIELDS[field]}")
    p = Path(path)
    if not p.is_file():
        raise _unavailable(field, p, "no such file")
    return p


def check_bfm(path: Path) -> None:
    """The BFM model is unused at inference; refuse anything that is not a MATLAB file all the same."""
    with open(path, "rb") as f:
        head = f.read(520)
    if not (head.startswith(_MAT_V5) or head[512:520] == _HDF5):
        raise _unavailable("bfm", path, "not a MATLAB .mat file (no MAT-file v5 header or v7.3 HDF5 signature)")


class OfficialG2FaceAnonymizer:
    """The official G2Face configuration on aligned 256 px crops; same interface as ``G2FaceAnonymizer``.

    Args:
        g2face, arcface, deep3d, bfm: paths from ``anonymizer.official`` (bfm may be None).
        resolution: the pipeline's aligned crop side; must be 256.
        payload_mode: 'reversible' or 'irreversible' (labels model_id; see ``pipeline.g2face_method``).
    Every file is read and strictly checked here, so a bad file stops the job before anything is written.
    """

    def __init__(self, g2face: str, arcface: str, deep3d: str, bfm: str | None = None,
                 resolution: int = OFFICIAL_RESOLUTION, payload_mode: str = "reversible"):
        if resolution != OFFICIAL_RESOLUTION:
            raise G2FaceUnavailable(f"anonymizer.weights 'official' is the paper's 256 px model but "
                                    f"anonymizer.resolution is {resolution}; set anonymizer.resolution: 256")
        paths = {"g2face": _existing("g2face", g2face), "arcface": _existing("arcface", arcface),
                 "deep3d": _existing("deep3d", deep3d)}
        if bfm:
            check_bfm(_existing("bfm", bfm))
        self.resolution = resolution
        self.paths = paths
        # cheapest first, so that a bad prior fails before the 85 M-parameter generator is built
        self.geometry_net = self._load_deep3d(paths["deep3d"])
        self.identity_net = self._load_arcface(paths["arcface"])
        self.model = self._load_g2face(paths["g2face"])
        self.artifact_sha256 = file_sha256(paths["g2face"])  # binds payloads and run.json to these exact weights
        self.prior_sha256 = {k: file_sha256(paths[k]) for k in ("arcface", "deep3d")}
        self.identity_dim = self.model.config.identity_dim
        self.payload_bits = self.model.config.payload_bits
        self.set_payload_mode(payload_mode)

    @staticmethod
    def _load_deep3d(path: Path):
        from g2face.deep3d import NetReconLoadError, load_net_recon

        try:
            return load_net_recon(path)
        except NetReconLoadError as e:
            raise _unavailable("deep3d", path, str(e)) from None
        except Exception as e:  # an unreadable file
            raise _unavailable("deep3d", path, f"not a readable PyTorch file ({type(e).__name__}: {e})") from None

    @staticmethod
    def _load_arcface(path: Path):
        from g2face.arcface import ArcFaceWeightsError, load_arcface

        try:
            return load_arcface(path, arch="iresnet50")
        except ArcFaceWeightsError as e:
            raise _unavailable("arcface", path, str(e)) from None
        except Exception as e:
            raise _unavailable("arcface", path, f"not a readable PyTorch file ({type(e).__name__}: {e})") from None

    @staticmethod
    def _load_g2face(path: Path):
        from g2face.checkpoint import CheckpointError, load_official_g2face
        from g2face.config import PAPER_256
        from g2face.model import G2Face

        model = G2Face(PAPER_256)
        try:
            load_official_g2face(model, path)
        except CheckpointError as e:
            raise _unavailable("g2face", path, str(e)) from None
        return model.eval()

    def set_payload_mode(self, mode: str) -> None:
        if mode not in PAYLOAD_MODES:
            raise ValueError(f"anonymizer.payload must be one of {PAYLOAD_MODES}, got {mode!r}")
        self.payload_mode = mode
        self.model_id = (f"g2face-official:{self.model.config.name}:{self.artifact_sha256[:16]}"
                         f":arcface-r50={self.prior_sha256['arcface'][:8]}:d3dfr={self.prior_sha256['deep3d'][:8]}:{mode}")

    def setup(self, device: torch.device) -> None:
        self.device = device
        self.model = self.model.to(device)
        self.identity_net = self.identity_net.to(device)
        self.geometry_net = self.geometry_net.to(device)

    @torch.no_grad()
    def identity_embeddings(self, faces: torch.Tensor) -> torch.Tensor:
        """Raw ArcFace embeddings (B, 512) of aligned crops in [0, 1]: the official payload and dummy check."""
        return self.identity_net(arcface_input(faces))

    @torch.no_grad()
    def geometry(self, faces: torch.Tensor) -> torch.Tensor:
        """The mapper's 147 geometry coefficients of aligned crops in [0, 1] (Deep3DFaceRecon on the full frame)."""
        return official_geometry(self.geometry_net(faces))

    def priors(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.identity_embeddings(faces), self.geometry(faces)

    def anonymize(self, faces: torch.Tensor, seeds: list[int], payload_bits: torch.Tensor | None = None,
                  identity: torch.Tensor | None = None, identity_push=None) -> torch.Tensor:
        """Anonymized crops in [0, 1]; payload_bits (B, 16384) 0/1 to hide (None: seeded random bits);
        identity_push: see ``G2Face.anonymize``."""
        assert faces.ndim == 4 and faces.shape[1:] == (3, self.resolution, self.resolution), faces.shape
        assert len(seeds) == faces.shape[0]
        if identity is None:
            identity = self.identity_embeddings(faces)
        if payload_bits is None:
            payload_bits = irreversible_bits(list(seeds), self.payload_bits)
        return self.model.anonymize(faces, identity, self.geometry(faces), payload_bits.to(faces.device).float(),
                                    list(seeds), identity_push=identity_push)

    def extract(self, faces: torch.Tensor) -> torch.Tensor:
        """Payload bit logits (B, 16384) read from (re-aligned) crops in [0, 1]."""
        return self.model.extract(faces)

    def recover(self, anonymized: torch.Tensor, identity: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Crops in [0, 1] re-synthesised with the decrypted ArcFace embedding; geometry of the anonymized crop."""
        return self.model.recover(anonymized, identity, self.geometry(anonymized), list(seeds))
