"""Reader for dlib's serialized face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``).

Pure Python + numpy; no dlib needed. The file is taken from the installed ``face_recognition_models``
package at run time (never copied into this repository) and must match a pinned sha256.

dlib's serialization stores the network's layer records, but not its wiring (which tag an ``add_prev``
refers to, which wrapper is a tag or a skip): that lives in the C++ type. So the reader walks the file
against the known architecture (:func:`expected_layers`) and checks every version integer and every
layer-type string on the way; any disagreement names the file, the byte offset and what was expected.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODEL_FILENAME = "dlib_face_recognition_resnet_model_v1.dat"
# sha256 of the file shipped in face_recognition_models 0.3.0 (22,466,066 bytes).
MODEL_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
CHIP_SIZE = 150

# Residual levels from the input upwards: (filters, number of blocks, first block down-samples).
LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
EMBEDDING_DIM = 128


class DlibFormatError(ValueError):
    """The file is not the expected dlib network (wrong hash, truncated, or unexpected records)."""


@dataclass
class LayerRecord:
    """One layer as stored: its type string, its integer/float settings and its parameter arrays."""

    kind: str
    settings: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Architecture: the C++ type of dlib's python binding, flattened.


def _block(filters: int, stride: int) -> list[tuple]:
    """conv3x3(stride) -> affine -> relu -> conv3x3 -> affine, listed outermost first."""
    return [
        ("affine",),
        ("con", filters, 3, 1, 1),
        ("relu",),
        ("affine",),
        ("con", filters, 3, stride, 0 if stride != 1 else 1),
    ]


def expected_layers() -> list[tuple]:
    """The network from the loss layer inwards, as stored: ('con', filters, k, stride, pad), ('tag',), ...

    Plain blocks are relu(add_prev1(block(tag1(x)))); down blocks are
    relu(add_prev2(avg_pool2x2(skip1(tag2(block_stride2(tag1(x))))))).
    """
    outer: list[tuple] = [("fc", EMBEDDING_DIM), ("avg_pool", 0, 0, 1, 1)]
    for filters, blocks, down in reversed(LEVELS):
        for i in reversed(range(blocks)):
            if down and i == 0:
                outer += [("relu",), ("add_prev",), ("avg_pool", 2, 2, 2, 2), ("skip",), ("tag",)]
                outer += _block(filters, 2) + [("tag",)]
            else:
                outer += [("relu",), ("add_prev",)] + _block(filters, 1) + [("tag",)]
    outer += [("max_pool", 3, 3, 2, 2), ("relu",), ("affine",), ("con", 32, 7, 2, 0)]
    return outer


# ---------------------------------------------------------------------------------------------
# Serialization primitives (dlib/serialize.h).


class _Stream:
    def __init__(self, data: bytes, path: Path):
        self.buf = memoryview(data)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.path}: at byte {self.pos}: {what}")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise self.fail(f"file ends early (needs {n} more bytes); the file is truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def integer(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise self.fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def real(self) -> float:
        # float/double: 64-bit mantissa and 16-bit exponent; value = m * 2**e.
        if self.pos < len(self.buf) and self.buf[self.pos] & 0x70:
            raise self.fail("legacy ASCII float; not expected in this file")
        mantissa, exponent = self.integer(), self.integer()
        specials = {32000: np.inf, 32001: -np.inf, 32002: np.nan}
        if exponent in specials:
            return float(specials[exponent])
        return float(mantissa) * 2.0**exponent

    def boolean(self) -> bool:
        ch = bytes(self.take(1))
        if ch not in (b"0", b"1"):
            raise self.fail(f"bad bool byte {ch!r}")
        return ch == b"1"

    def string(self) -> str:
        n = self.integer()
        return bytes(self.take(n)).decode("latin-1")

    def expect_int(self, want: int, what: str) -> None:
        at = self.pos
        got = self.integer()
        if got != want:
            self.pos = at
            raise self.fail(f"{what}: expected {want}, found {got}")

    def expect_string(self, want: str) -> None:
        at = self.pos
        got = self.string()
        if got != want:
            self.pos = at
            raise self.fail(f"expected layer record {want!r}, found {got[:40]!r}")

    def tensor(self) -> np.ndarray:
        """resizable_tensor: version 2, (n, k, nr, nc), raw little-endian float32 data."""
        self.expect_int(2, "tensor version")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        data = np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)
        return data.reshape(shape)

    def alias(self) -> tuple[int, ...]:
        self.expect_int(1, "alias_tensor version")
        return tuple(self.integer() for _ in range(4))

    def empty_tensor(self, what: str) -> None:
        t = self.tensor()
        if t.size:
            raise self.fail(f"{what} should be empty, holds {t.shape}")


# ---------------------------------------------------------------------------------------------
# Layer records.


def _read_record(s: _Stream, spec: tuple) -> LayerRecord:
    kind = spec[0]
    if kind == "con":
        _, filters, k, stride, pad = spec
        s.expect_string("con_4")
        params = s.tensor().reshape(-1)
        settings = {}
        for name, want in (("filters", filters), ("nr", k), ("nc", k), ("stride_y", stride), ("stride_x", stride),
                           ("padding_y", pad), ("padding_x", pad)):
            s.expect_int(want, f"con_4 {name}")
            settings[name] = want
        fshape, bshape = s.alias(), s.alias()
        for _ in range(4):
            s.real()  # learning-rate and weight-decay multipliers: training only
        if fshape[0] != filters or fshape[2:] != (k, k) or bshape != (1, filters, 1, 1):
            raise s.fail(f"con_4 aliases {fshape}, {bshape} do not fit {filters} filters of {k}x{k}")
        n_w = int(np.prod(fshape))
        if params.size != n_w + filters:
            raise s.fail(f"con_4 holds {params.size} values, expected {n_w + filters}")
        return LayerRecord("con", settings, {"weight": params[:n_w].reshape(fshape), "bias": params[n_w:]})
    if kind == "affine":
        s.expect_string("affine_")
        params = s.tensor().reshape(-1)
        g, b = s.alias(), s.alias()
        s.expect_int(0, "affine_ mode (0 = convolutional)")
        c = g[1]
        if g != (1, c, 1, 1) or b != g or params.size != 2 * c:
            raise s.fail(f"affine_ aliases {g}, {b} do not fit {params.size} values")
        return LayerRecord("affine", {}, {"gamma": params[:c], "beta": params[c:]})
    if kind in ("max_pool", "avg_pool"):
        s.expect_string(f"{kind}_2")
        _, nr, nc, sy, sx = spec
        for name, want in (("nr", nr), ("nc", nc), ("stride_y", sy), ("stride_x", sx), ("padding_y", 0),
                           ("padding_x", 0)):
            s.expect_int(want, f"{kind}_2 {name}")
        return LayerRecord(kind, {"nr": nr, "nc": nc, "stride": sy})
    if kind == "relu":
        s.expect_string("relu_")
        return LayerRecord("relu")
    if kind == "add_prev":
        s.expect_string("add_prev_")
        return LayerRecord("add_prev")
    if kind == "fc":
        s.expect_string("fc_2")
        s.expect_int(spec[1], "fc_2 outputs")
        n_in = s.integer()
        params = s.tensor()
        w_alias = s.alias()
        s.alias()  # the bias alias is written even in no-bias mode
        s.expect_int(1, "fc_2 bias mode (1 = no bias)")
        for _ in range(4):
            s.real()
        if params.shape != (n_in, spec[1], 1, 1) or w_alias != (n_in, spec[1], 1, 1):
            raise s.fail(f"fc_2 params {params.shape} / alias {w_alias} do not fit {n_in} -> {spec[1]}")
        # dlib computes y = x W with W (inputs x outputs).
        return LayerRecord("fc", {"inputs": n_in, "outputs": spec[1]}, {"weight_in_out": params[:, :, 0, 0]})
    raise AssertionError(kind)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path() -> Path:
    """The file inside the installed face_recognition_models package (found without importing it)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package face_recognition_models is not installed; `pip install face_recognition_models==0.3.0` "
            f"provides {MODEL_FILENAME}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall face_recognition_models==0.3.0")
    return path


@dataclass
class DlibNetwork:
    """Parsed file: input settings and the 108 layer records from the input upwards."""

    path: Path
    channel_means: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[LayerRecord]
    loss: dict

    def by_kind(self, kind: str) -> list[LayerRecord]:
        return [r for r in self.layers if r.kind == kind]

    @property
    def num_params(self) -> int:
        return sum(int(a.size) for r in self.layers for a in r.params.values())


def read_dlib_network(path: str | Path | None = None, expected_sha256: str | None = MODEL_SHA256) -> DlibNetwork:
    """Parse the face-recognition network file; refuse it unless its sha256 is ``expected_sha256``.

    Args:
        path: the ``.dat`` file; defaults to the one in the installed face_recognition_models package.
        expected_sha256: pinned hash; None skips the check (for files already verified elsewhere).
    """
    path = Path(path) if path is not None else default_model_path()
    if expected_sha256 is not None:
        got = file_sha256(path)
        if got != expected_sha256:
            raise DlibFormatError(
                f"{path}: sha256 {got} is not the expected {expected_sha256} (dlib_face_recognition_resnet_model_v1 "
                "from face_recognition_models 0.3.0); reinstall that package or pass the right file"
            )
    s = _Stream(path.read_bytes(), path)
    s.expect_int(1, "loss layer version")
    s.expect_string("loss_metric_2")
    loss = {"margin": s.real(), "distance_threshold": s.real()}

    specs = expected_layers()
    # Wrapper versions, outermost first: layers 2 (3 for the one on the input), tags and skips 1.
    for i, spec in enumerate(specs):
        want = 1 if spec[0] in ("tag", "skip") else (3 if i == len(specs) - 1 else 2)
        s.expect_int(want, f"version of wrapper {i} ({spec[0]})")

    s.expect_string("input_rgb_image_sized")
    means = (s.real(), s.real(), s.real())
    size = (s.integer(), s.integer())
    if size != (CHIP_SIZE, CHIP_SIZE):
        raise s.fail(f"input size {size}, expected {CHIP_SIZE}x{CHIP_SIZE}")

    layer_specs = [sp for sp in reversed(specs) if sp[0] not in ("tag", "skip")]
    layers = []
    for i, spec in enumerate(layer_specs):
        layers.append(_read_record(s, spec))
        for _ in range(3):
            s.boolean()  # setup-called / gradient-stale / gradient-disabled flags
        s.empty_tensor("x_grad")
        s.empty_tensor("cached_output")
        if i == 0:
            s.empty_tensor("grad_final")
            s.integer()  # sample expansion factor
        else:
            s.empty_tensor("params_grad")
    if s.pos != len(s.buf):
        raise s.fail(f"{len(s.buf) - s.pos} unread bytes after the last layer")
    return DlibNetwork(path, means, size, layers, loss)
