"""Model files: our inference artifact, and loaders for the official files a user supplies.

* Inference artifact (``save_artifact`` / ``load_artifact``): config + (EMA) weights + a SHA-256 over
  both. It holds nothing of the training state (no discriminator, optimiser or step); the model is rebuilt
  from the stored config and loaded with ``strict=True``.
* ``load_stylegan2_g_ema``: a rosinality StyleGAN2 ``g_ema`` into ``SynthesisNetwork``. Its mapping
  network (``style.*``) and noise buffers (``noises.*``) are skipped by design; every other key must match.
* ``load_official_g2face``: the official ``G2Face.pth`` (``anonymous_net``, ``style_mlp``, ``map_2_id``,
  ``hiding_extractor``) into a ``paper-256`` model.

A wrong or partial file raises ``CheckpointError`` naming the file and the missing, unexpected or
mis-shaped keys. Files are read without running their pickled code: plain tensors and containers load;
any other object in the file (an optimiser or scheduler, say) becomes an inert placeholder.
"""
from __future__ import annotations

import builtins
import collections
import hashlib
import json
import os
import pickle
import types
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .config import G2FaceConfig
from .model import G2Face
from .stylegan2 import SynthesisNetwork

ARTIFACT_FORMAT = "g2face-inference-artifact"
ARTIFACT_VERSION = 1
OFFICIAL_ENTRIES = ("anonymous_net", "style_mlp", "map_2_id", "hiding_extractor")
_SHOW = 12  # keys listed per category in an error message
# The shipped default model: the g2face method runs it when a job names no anonymizer.checkpoint. Its card
# (g2face-lite-128.md) and evaluation (g2face-lite-128.eval.json) lie beside it; scripts/make_model_card.py
# writes both from `g2face-pipe evaluate`.
SHIPPED_ARTIFACT = Path(__file__).resolve().parent / "weights" / "g2face-lite-128.pt"
SHIPPED_SHA256 = "8e9293d5ed4f624b14f937a2f4782a65b9e7579aaf8155cc4cb4091d1cf62141"


class CheckpointError(ValueError):
    """A model file is missing, unreadable, or does not match the model."""


# ---------------------------------------------------------------------------------------------
# Reading torch files without executing their pickles


class _Inert:
    """Stands in for any object of an untrusted class: absorbs construction, state and items."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _trusted_global(module: str, name: str) -> Any:
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                                              "_rebuild_parameter_with_state"):
        return getattr(torch._utils, name)
    if module == "torch" and (name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict", "int", "float", "bool",
                                         "str", "bytes", "bytearray", "complex", "slice"):
        return getattr(builtins, name)
    return _Inert


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _trusted_global(module, name)


_INERT_PICKLE = types.ModuleType("g2face_inert_pickle")
_INERT_PICKLE.Unpickler = _InertUnpickler  # type: ignore[attr-defined]
_INERT_PICKLE.load = lambda f, **kw: _InertUnpickler(f, **kw).load()  # type: ignore[attr-defined]


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Load a torch file onto the CPU without executing code from it.

    Tries ``weights_only`` first; files that also pickle other objects (optimisers, schedulers,
    argparse namespaces) are read again with every untrusted object replaced by an inert placeholder.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # other objects besides tensors: read again with the inert unpickler
    except Exception as e:
        raise CheckpointError(f"{what} file {path} is not a readable PyTorch file: {e}") from e
    try:
        return torch.load(path, map_location="cpu", pickle_module=_INERT_PICKLE, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{what} file {path} is not a readable PyTorch file: {e}") from e


def _source(source: str | os.PathLike | Mapping, what: str) -> tuple[Any, str]:
    if isinstance(source, Mapping):
        return source, f"{what} (in-memory dict)"
    return load_torch_file(source, what), f"{what} file {source}"


# ---------------------------------------------------------------------------------------------
# Key checks


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def check_keys(where: str, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Any]) -> None:
    """Raise ``CheckpointError`` unless ``found`` has exactly the expected keys, each a tensor of its shape."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    misshaped = sorted(
        f"{k} (file {list(found[k].shape) if isinstance(found[k], Tensor) else type(found[k]).__name__}, "
        f"model {list(expected[k])})"
        for k in expected
        if k in found and not (isinstance(found[k], Tensor) and tuple(found[k].shape) == tuple(expected[k]))
    )
    parts = [f"{len(v)} {label}: {_listing(v)}" for label, v in
             (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if v]
    if parts:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(parts))


def _check_fir_kernels(where: str, pairs: list[tuple[str, Tensor, Tensor]]) -> None:
    bad = [name for name, got, want in pairs if not torch.allclose(got.float(), want.float(), atol=1e-6)]
    if bad:
        raise CheckpointError(f"{where}: fixed FIR filter buffers differ from this model's blur kernel "
                              f"(a different blur_kernel config or a corrupted file): {_listing(bad)}")


def _strip_ddp_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a 'module.' prefix that every key carries (state dicts saved from a DDP-wrapped model)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


# ---------------------------------------------------------------------------------------------
# Inference artifact


def content_sha256(config: Mapping, state_dict: Mapping[str, Tensor], metadata: Mapping | None = None) -> str:
    """SHA-256 over the config, the metadata and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": config, "metadata": metadata or {}}, sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_artifact(model: G2Face, path: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
                  metadata: Mapping | None = None) -> str:
    """Write an inference artifact of ``model`` (pass the EMA copy when training keeps one).

    Floating-point tensors are stored as ``dtype``. Returns the content SHA-256 (also stored inside).
    """
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().to("cpu")).contiguous()
             for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    metadata = dict(metadata or {})
    digest = content_sha256(config, state, metadata)
    payload = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, "config": config,
               "metadata": metadata, "state_dict": state, "sha256": digest}
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return digest


def load_artifact(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, expected_sha256: str | None = None) -> G2Face:
    """Rebuild a model from an inference artifact: hash checked, config restored, ``strict=True`` load.

    Args:
        path: the artifact.
        device, dtype: where the returned model lives (eval mode).
        expected_sha256: if given, the artifact's content hash must equal it (pins a known model).
    """
    obj = load_torch_file(path, "G2Face artifact")
    if not isinstance(obj, Mapping) or obj.get("format") != ARTIFACT_FORMAT:
        kind = "a training state or another checkpoint" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path} is not a G2Face inference artifact (it looks like {kind}); "
                              "export one with g2face.checkpoint.save_artifact")
    if obj.get("format_version") != ARTIFACT_VERSION:
        raise CheckpointError(f"{path}: artifact format_version {obj.get('format_version')!r} is not supported "
                              f"(this library reads version {ARTIFACT_VERSION})")
    for field in ("config", "state_dict", "sha256"):
        if field not in obj:
            raise CheckpointError(f"{path}: artifact lacks its {field!r} entry")
    digest = content_sha256(obj["config"], obj["state_dict"], obj.get("metadata"))
    if digest != obj["sha256"]:
        raise CheckpointError(f"{path}: content hash mismatch (stored {obj['sha256']}, computed {digest}); "
                              "the file is corrupted or was edited")
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointError(f"{path}: content hash {digest} is not the expected {expected_sha256}; "
                              "this is a different model than the one pinned")
    try:
        config = G2FaceConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: stored config is invalid: {e}") from e
    model = G2Face(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(f"artifact {path}", expected, obj["state_dict"])
    model.load_state_dict(obj["state_dict"], strict=True)
    model.artifact_sha256 = digest  # identifies the model in manifests and payload associated data
    model.artifact_metadata = dict(obj.get("metadata") or {})
    return model.to(device, dtype).eval()


# ---------------------------------------------------------------------------------------------
# rosinality StyleGAN2 g_ema


def load_stylegan2_g_ema(synthesis: SynthesisNetwork, source: str | os.PathLike | Mapping) -> None:
    """Load a rosinality StyleGAN2 generator into ``synthesis`` (in place).

    ``source``: a path or dict, either the training checkpoint (its ``g_ema`` entry is used) or the
    ``g_ema`` state dict itself. ``style.*`` (mapping network) and ``noises.*`` are skipped by design.
    """
    obj, where = _source(source, "StyleGAN2 checkpoint")
    if isinstance(obj, Mapping) and "g_ema" in obj:
        state, where = obj["g_ema"], where + " [g_ema]"
    elif isinstance(obj, Mapping) and any(isinstance(k, str) and k.endswith("input.input") for k in obj):
        state = obj
    else:
        keys = sorted(map(str, obj))[:_SHOW] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{where} has no 'g_ema' entry and is not a generator state dict (found {keys})")
    state = _strip_ddp_prefix(state)
    kept = {k: v for k, v in state.items() if not (k.startswith("style.") or k.startswith("noises."))}
    own = synthesis.state_dict()
    check_keys(where, {k: tuple(v.shape) for k, v in own.items()}, kept)
    _check_fir_kernels(where, [(k, kept[k], own[k]) for k in own if k.endswith("kernel")])
    synthesis.load_state_dict(kept, strict=True)


# ---------------------------------------------------------------------------------------------
# Official G2Face.pth

_EXTRACTOR_NAMES = {"reduce_a": "conv1x1_branch_1", "norm_a1": "bn_branch_1_1", "conv_a": "conv3x3_branch_1",
                    "norm_a2": "bn_branch_1_2", "reduce_b": "conv1x1_branch_2", "norm_b": "bn_branch_2_1"}


def official_name(key: str) -> tuple[str, str]:
    """(entry, key) in the official G2Face.pth for one of our ``G2Face`` state-dict keys."""
    part, rest = key.split(".", 1)
    if part == "synthesis":
        return "anonymous_net", rest
    if part == "encoder":  # levels.i.conv.p -> pyramid.i.conv.conv.p
        _, i, conv, p = rest.split(".")
        return "anonymous_net", f"pyramid.{i}.{conv}.conv.{p}"
    if part == "fusion":  # masks.i.conv.p -> fusion_mask.i.conv.p
        return "anonymous_net", "fusion_mask." + rest.split(".", 1)[1]
    if part == "hiding":  # to_mask.k / to_features.k -> hiding_injects.2k / 2k+1; gain -> weight
        which, k, tail = rest.split(".", 2)
        index = 2 * int(k) + (which == "to_features")
        return "anonymous_net", f"hiding_injects.{index}.{'weight' if tail == 'gain' else tail}"
    if part == "mapper":  # low.j.p -> style_low.j.p
        return "style_mlp", "style_" + rest
    if part == "dummy":  # layers.n.p -> map_2_id.n.p
        return "map_2_id", "map_2_id." + rest.split(".", 1)[1]
    if part == "extractor":
        head, tail = rest.split(".", 1)
        if head == "stem":
            return "hiding_extractor", "conv1x1_input." + tail
        if head == "head":
            return "hiding_extractor", "conv1x1_output." + tail
        i, name, p = tail.split(".", 2)
        return "hiding_extractor", f"body.{i}.{_EXTRACTOR_NAMES[name]}.{p}"
    raise KeyError(f"no official counterpart for {key!r}")


def load_official_g2face(model: G2Face, source: str | os.PathLike | Mapping) -> None:
    """Load the official ``G2Face.pth`` into a ``paper-256`` model (in place).

    Reads the ``anonymous_net``, ``style_mlp``, ``map_2_id`` and ``hiding_extractor`` entries (others,
    such as the discriminator and optimiser states, are ignored) and needs every key of each.
    """
    c = model.config
    if not c.mapper_doubled_bias or c.dummy_norm != "batchnorm":
        raise CheckpointError(f"the official G2Face weights need mapper_doubled_bias=True and dummy_norm="
                              f"'batchnorm' (the paper-256 preset); config {c.name!r} differs")
    obj, where = _source(source, "G2Face checkpoint")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not the official checkpoint dict")
    absent = [e for e in OFFICIAL_ENTRIES if e not in obj]
    if absent:
        raise CheckpointError(f"{where} lacks entries {absent} (found {sorted(map(str, obj))}); "
                              "expected the official G2Face.pth")
    entries = {e: _strip_ddp_prefix(obj[e]) for e in OFFICIAL_ENTRIES}
    own = model.state_dict()
    names = {k: official_name(k) for k in own}
    problems = []
    for entry in OFFICIAL_ENTRIES:
        expected = {ok: tuple(own[k].shape) for k, (e, ok) in names.items() if e == entry}
        try:
            check_keys(f"[{entry}]", expected, entries[entry])
        except CheckpointError as err:
            problems.append(str(err))
    if problems:
        hint = "" if c.name == "paper-256" else f" (the official weights need the paper-256 preset; this is {c.name!r})"
        raise CheckpointError(f"{where}: " + " | ".join(problems) + hint)
    _check_fir_kernels(where, [(f"{e}.{ok}", entries[e][ok], own[k])
                               for k, (e, ok) in names.items() if k.endswith("kernel")])
    model.load_state_dict({k: entries[e][ok] for k, (e, ok) in names.items()}, strict=True)


def state_dict_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of ``module`` with its shape (for comparing against reference listings)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
