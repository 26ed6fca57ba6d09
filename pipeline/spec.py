"""Job spec: YAML -> validated once here -> frozen dataclasses used everywhere else.

Every field is documented in its ``Field(description=...)``; the JSON Schema in
``schemas/job.schema.json`` is generated from these classes (``python -m pipeline.spec``) and a test
keeps the two in sync. Errors name the dotted key and say how to fix it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

SPEC_VERSION = 1
MAX_DRAWS = 64  # anonymizer.draws at most (pipeline/redraw.py)
DATASET_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_STRICT = ConfigDict(extra="forbid")


def _expand_home(path: str | None) -> str | None:
    """``~`` in a local file path, as a shell would expand it (fsspec does so for input and output paths)."""
    return os.path.expanduser(path) if isinstance(path, str) and "://" not in path else path


class JobSpecError(ValueError):
    """A job spec that cannot run; the message names each bad key and the fix."""


@dataclass(config=_STRICT, frozen=True)
class DatasetSpec:
    id: str = Field(
        pattern=DATASET_ID_PATTERN,
        description="Stable identifier of the corpus; bound into payloads, keys and manifests.",
    )


@dataclass(config=_STRICT, frozen=True)
class InputSpec:
    format: Literal["webdataset", "parquet"] = Field(description="Shard format of the input corpus.")
    paths: str | list[str] = Field(
        description="A glob, a list of paths/globs, or fsspec URIs (file://, memory://, s3://...) of the shards."
    )
    image_column: str | None = Field(
        default=None,
        description="Parquet: column holding encoded image bytes (or a {bytes, path} struct). WebDataset: the "
        "member extension of the image (default: the first of jpg, jpeg, png, webp in each sample).",
    )
    key_column: str | None = Field(
        default=None, description="Parquet: column with the sample key (default: '<shard stem>/<row index>')."
    )
    aligned: bool = Field(
        default=False,
        description="True for FFHQ/CelebA-HQ-aligned corpora: skip detection and treat each whole image as one "
        "face under the fixed template transform.",
    )
    max_pixels: int = Field(
        default=80_000_000, ge=1, description="Images with more pixels are rejected as errors (decompression bombs)."
    )


@dataclass(config=_STRICT, frozen=True)
class MetadataSpec:
    exif: Literal["strip", "keep"] = Field(
        default="strip",
        description="'strip' removes EXIF/XMP/comments (GPS, maker notes, thumbnails). 'keep' keeps EXIF but still "
        "drops the embedded thumbnail, which may hold an unanonymized face.",
    )
    fields: list[str] = Field(
        default_factory=list,
        description="Allow-list of non-image fields copied to the output: WebDataset member extensions or Parquet "
        "columns; 'json.<key>' keeps one key of a JSON member. Everything else is dropped.",
    )


@dataclass(config=_STRICT, frozen=True)
class OutputSpec:
    dir: str = Field(description="Output root (local path or fsspec URI): shards/, manifests/, private/, done/.")
    image_format: Literal["keep", "png", "jpeg"] = Field(
        default="keep", description="'keep' re-encodes in the input's format; 'png' is lossless; 'jpeg' uses jpeg_quality."
    )
    jpeg_quality: int = Field(default=95, ge=1, le=100, description="JPEG quality when a JPEG is written.")
    metadata: MetadataSpec = Field(default_factory=MetadataSpec, description="What metadata survives.")
    keys: Literal["keep", "pseudonymize"] = Field(
        default="pseudonymize",
        description="'pseudonymize' replaces sample keys (which often carry names) by a keyed HMAC; the mapping "
        "is only in the private manifest. Needs keys.master (or keys.create_demo_key).",
    )


@dataclass(config=_STRICT, frozen=True)
class OfficialWeightsSpec:
    g2face: str = Field(
        description="Path of the official G2Face.pth (entries anonymous_net, style_mlp, map_2_id, hiding_extractor; "
        "read strictly into the paper-256 model)."
    )
    arcface: str = Field(description="Path of the insightface ArcFace r50 state dict (ms1mv3_arcface_r50.pth).")
    deep3d: str = Field(description="Path of the Deep3DFaceRecon checkpoint (epoch_20.pth, with its net_recon entry).")
    bfm: str | None = Field(
        default=None,
        description="Path of BFM_model_front.mat. Optional: only the training losses use it; checked when given.",
    )

    _home = field_validator("g2face", "arcface", "deep3d", "bfm")(classmethod(lambda cls, v: _expand_home(v)))


@dataclass(config=_STRICT, frozen=True)
class AnonymizerSpec:
    method: Literal["g2face", "blur", "pixelate"] = Field(
        default="g2face", description="How each aligned face is replaced."
    )
    resolution: Literal[64, 128, 256] = Field(default=128, description="Side of the aligned face crop in pixels.")
    min_size: int = Field(
        default=32, ge=0, description="Faces whose box side is below this many pixels get `fallback` instead."
    )
    fallback: Literal["pixelate", "blur", "withhold"] = Field(
        default="pixelate",
        description="Method for faces below min_size or between the detection score thresholds; 'withhold' "
        "withholds the whole image instead.",
    )
    blur_sigma: float = Field(default=0.08, gt=0, le=1, description="Gaussian sigma as a fraction of the crop side.")
    pixelate_blocks: int = Field(default=8, ge=2, le=64, description="Pixel blocks across the aligned crop.")
    checkpoint: str | None = Field(
        default=None,
        description="Path of a G2Face inference artifact (method g2face); unset: the shipped lite-128 model "
        "(g2face/weights/g2face-lite-128.pt, sha256-pinned; its model card says which quality bars it meets).",
    )
    weights: Literal["shipped", "official"] = Field(
        default="shipped",
        description="Method g2face: 'shipped' runs `checkpoint` with the shipped priors (dlib identity, 3DMM "
        "regressor); 'official' runs the paper's configuration from the files in `official` (G2Face.pth, ArcFace "
        "r50, Deep3DFaceRecon) at resolution 256. Its payload spans the whole crop while only the face ellipse is "
        "pasted back, so reversible payloads usually fail verification and follow on_unverified.",
    )
    official: OfficialWeightsSpec | None = Field(
        default=None, description="The official files, for weights: official."
    )
    payload: Literal["reversible", "irreversible"] = Field(
        default="reversible",
        description="Method g2face: 'reversible' hides each face's identity embedding, encrypted and "
        "authenticated under the shard key (needs keys.master; see schemas/payload.md), so that key holders can "
        "recover the face with `g2face-pipe recover`; 'irreversible' hides seeded random bits that carry nothing.",
    )
    on_unverified: Literal["reencode_lossless", "irreversible", "withhold"] = Field(
        default="reencode_lossless",
        description="A reversible face whose payload does not read back from the written image: "
        "'reencode_lossless' re-encodes the image as PNG and verifies again, and faces that still fail are "
        "published as irreversible; 'irreversible' publishes them as irreversible at once; 'withhold' withholds "
        "the image. A face is labelled reversible only when its payload verified.",
    )
    identity_guard: Literal["fallback", "withhold", "off"] = Field(
        default="fallback",
        description="Method g2face: each output is compared with its original in dlib's identity space (aligned "
        "crops; with draws > 1 also as the published image will show it, pasted into its photo, by the "
        "redraw check and its margin of 0.03); a face closer than identity_guard_distance still shows the same "
        "person and is not published as it is: 'fallback' gives it the job's fallback method (fallback_reason "
        "identity_match; with fallback 'withhold' the image is withheld), 'withhold' withholds the image, 'off' publishes it anyway (only for "
        "measuring the model itself, as `g2face-pipe evaluate` does).",
    )
    identity_guard_distance: float = Field(
        default=0.6, gt=0, le=2,
        description="Euclidean distance between dlib embeddings below which the guard treats two faces as the "
        "same person (dlib's own threshold is 0.6; raise it for a wider safety margin).",
    )
    draws: int = Field(
        default=32, ge=1, le=MAX_DRAWS,
        description="Method g2face: a face whose output, pasted into its photo as the published image will show "
        "it and cut out again as the metrics stage cuts it, still matches the original (dlib distance below "
        "identity_guard_distance + 0.03) or that MTCNN no longer finds (score 0.9, IoU metrics.match_iou with "
        "the original's detection) is drawn again with the next seed of its sequence, up to this many draws in "
        "all; the first draw passing both checks is kept, else the best (anonymized first). Every published face stays a model output, and the identity guard still judges it "
        "(a kept draw that failed the identity check gets the guard's action). "
        "The check cannot see what happens after it: other faces of the photo replaced, the payload "
        "reinforcement and a lossy output format (its margins leave room for the reinforcement, and "
        "payload_reinforce_keep_detection judges detection again after it). "
        "The manifest's `draw` says which draw was kept, its `draw_check` what the check concluded about it. "
        "1 keeps every first draw. Each extra draw costs a "
        "generator pass, an identity embedding and an MTCNN pass for the faces that need it (1200 CelebA val "
        "images, 2 CPU cores, 16 against 8 draws: MTCNN re-detection 0.92 against 0.88, published faces still "
        "matching 5.9% against 6.6%, about 25% more time per image with the metrics stage on; all 1000 images "
        "of val shard 0, 32 against 16 draws: re-detection 0.955 against 0.937; bench/redraw.py).",
    )
    identity_push: float = Field(
        default=0.5, ge=0, le=2,
        description="Method g2face with draws > identity_push_after: from draw identity_push_after on, a face that "
        "no draw so far got past the identity check is drawn with its style code pushed away from the "
        "original's (w_dummy + s * (w_dummy - w_original), s rising linearly from this value towards twice it "
        "over the remaining draws: 0.5 to 0.98 at the defaults, 32 draws; 0.94 at draw 15 with 16 draws, 0.65 "
        "with 32, so the draws setting also sets how fast the push grows); faces that a plain draw got past the identity "
        "check and that failed only the detection check get plain draws (faces only a push got past it: "
        "identity_push_hold). It moves which face the "
        "generator draws, never pixels; not in the paper. The manifest's `identity_push` gives each kept draw's "
        "s. 0 turns it off (every draw as the paper draws it). Measured with bench/redraw.py --push (faces no "
        "earlier draw anonymized: most of them no longer match, at some cost in MTCNN re-detection; see the "
        "model card).",
    )
    identity_push_after: int = Field(
        default=8, ge=1, le=MAX_DRAWS,
        description="Method g2face: draws made as the paper draws them before identity_push starts (faces that "
        "pass within them are published exactly as without the push).",
    )
    identity_push_hold: bool = Field(
        default=True,
        description="Method g2face with identity_push: a face that only a pushed draw got past the identity check, "
        "and that MTCNN then missed, is drawn on with weaker pushes, each halfway between the strongest weaker push "
        "that left it matching (0, its plain draws, when none did) and the weakest that anonymized it "
        "(weaker pushes are "
        "found more often; its plain draws all still matched). false: plain draws from then on, as before this "
        "field. Measured with bench/redraw.py --push-hold off --push-hold on (see the README).",
    )
    payload_reinforce_steps: int = Field(
        default=12, ge=0, le=20,
        description="Method g2face with the shipped priors, reversible payload: up to this many projected-gradient "
        "steps nudge each anonymized crop towards the payload extractor reading every bit with a margin from the "
        "image as it is written (pasted back, encoded in the output format, re-aligned); a face stops once it "
        "does. 0 turns it off (weights: official ignores it). Each step costs an extractor forward and backward "
        "pass per face, plus a paste-back and, for lossy output, an encode/decode around the faces.",
    )
    payload_reinforce_max_change: int = Field(
        default=6, ge=1, le=8,
        description="The most payload reinforcement may move any pixel of an anonymized crop, in grey levels.",
    )
    payload_reinforce_keep_detection: bool = Field(
        default=True,
        description="After payload reinforcement, MTCNN (the job's detection thresholds, metrics.match_iou) "
        "judges each reinforced face as the metrics stage will see it (every face of its image pasted, through "
        "the output codec, cut at metrics.resolution); a face found without its reinforcement but not with it "
        "keeps half, a quarter or none of its change, the largest share still found, and the faces of one image "
        "are judged together at their final shares. The manifest's reinforce_share records each face's share. "
        "A scaled face's payload reads back with less margin; verification decides as for every face. "
        "Reinforcement's few grey levels lost faces that MTCNN found only narrowly (CelebA val shard 0, 1000 "
        "images, 16 draws: re-detection 0.914 without this check against 0.937 with it, payloads verified "
        "99.5% both; bench/redraw.py --keep-detection). With draws 1 it loads the redraw's checker for this. "
        "false: reinforcement as before this field.",
    )

    _home = field_validator("checkpoint")(classmethod(lambda cls, v: _expand_home(v)))

    @model_validator(mode="after")
    def _official_weights(self) -> "AnonymizerSpec":
        if self.weights == "shipped":
            if self.official is not None:
                raise ValueError("anonymizer.official is read only with anonymizer.weights: official; set that, or "
                                 "remove anonymizer.official")
            return self
        if self.method != "g2face":
            raise ValueError(f"anonymizer.weights: official is for method g2face, not {self.method!r}; set "
                             "anonymizer.method: g2face or anonymizer.weights: shipped")
        if self.official is None:
            raise ValueError("anonymizer.official is required with anonymizer.weights: official; give its g2face, "
                             "arcface and deep3d paths (and optionally bfm)")
        if self.resolution != 256:
            raise ValueError(f"anonymizer.resolution is {self.resolution} but the official model is 256 px; set "
                             "anonymizer.resolution: 256")
        if self.checkpoint is not None:
            raise ValueError("anonymizer.checkpoint names an artifact for the shipped priors; with anonymizer.weights:"
                             " official the model comes from anonymizer.official.g2face, so remove checkpoint")
        return self


@dataclass(config=_STRICT, frozen=True)
class DetectionSpec:
    min_face_size: int = Field(default=16, ge=8, description="MTCNN minimum face size in (detection-scale) pixels.")
    score_threshold: float = Field(
        default=0.95, gt=0, le=1, description="Faces at or above this score get the job's method."
    )
    low_score_threshold: float = Field(
        default=0.80,
        gt=0,
        le=1,
        description="Faces between this and score_threshold get the fallback; lower scores are not faces.",
    )
    max_side: int = Field(
        default=1280, ge=64, description="Images with a longer side are detected on a downscaled copy."
    )
    stage_thresholds: tuple[float, float, float] = Field(
        default=(0.6, 0.7, 0.7), description="MTCNN P/R/O-net thresholds."
    )
    scale_factor: float = Field(default=0.709, gt=0.3, lt=0.95, description="MTCNN image pyramid factor.")

    @model_validator(mode="after")
    def _ordered(self) -> "DetectionSpec":
        if self.low_score_threshold > self.score_threshold:
            raise ValueError(
                f"low_score_threshold ({self.low_score_threshold}) must not exceed score_threshold "
                f"({self.score_threshold}); lower detection.low_score_threshold"
            )
        return self


@dataclass(config=_STRICT, frozen=True)
class PolicySpec:
    on_no_face: Literal["pass", "withhold"] = Field(
        default="pass", description="Images without a detected face: publish unchanged ('pass') or withhold."
    )
    on_error: Literal["withhold", "fail"] = Field(
        default="withhold",
        description="A sample that fails: 'withhold' records it and goes on; 'fail' stops the job (debugging).",
    )


@dataclass(config=_STRICT, frozen=True)
class StageResources:
    actors: int = Field(default=1, ge=1, description="Actors for this stage.")
    num_cpus: float = Field(default=0.5, ge=0, description="Logical CPUs per actor (fractions allowed).")
    num_gpus: float | Literal["auto"] | None = Field(
        default=None,
        description="GPUs per actor (fractions allowed). Unset: 'auto' for the anonymize stage (1 when the Ray "
        "cluster reports GPUs, else 0) and 0 for the others. A model stage with GPUs runs in its own actor pool.",
    )
    batch_size: int = Field(default=16, ge=1, description="Images (decode/detect/encode) or faces (anonymize) per batch.")


@dataclass(config=_STRICT, frozen=True)
class ResourcesSpec:
    decode: StageResources = Field(default_factory=StageResources, description="Read and decode.")
    detect: StageResources = Field(default_factory=StageResources, description="MTCNN detection and alignment.")
    anonymize: StageResources = Field(default_factory=StageResources, description="Face model (GPU when there is one).")
    encode: StageResources = Field(default_factory=StageResources, description="Paste-back, encode and write.")


@dataclass(config=_STRICT, frozen=True)
class KeysSpec:
    master: str | None = Field(
        default=None, description="Master key file made by `g2face-pipe keys init --out PATH`."
    )
    create_demo_key: bool = Field(
        default=False,
        description="Demo only: create a clearly named demo master key next to the run when keys.master is unset.",
    )

    _home = field_validator("master")(classmethod(lambda cls, v: _expand_home(v)))

    @model_validator(mode="after")
    def _local_key_file(self) -> "KeysSpec":
        if self.master and "://" in self.master:
            raise ValueError(f"keys.master {self.master!r} is a URI; key files are read from the local file system "
                             "only (never fetched or uploaded): copy the key to the same local path, mode 0600, on "
                             "every node and give that path")
        return self


@dataclass(config=_STRICT, frozen=True)
class RuntimeSpec:
    executor: Literal["ray", "local"] = Field(
        default="ray", description="'ray' runs shard workers as Ray actors; 'local' is a single-process loop."
    )
    address: str | None = Field(default=None, description="Ray address; unset starts a local Ray.")
    num_cpus: int | None = Field(default=None, ge=1, description="Logical CPUs of a local Ray (default: the machine's).")
    torch_threads: int = Field(default=0, ge=0, description="Torch threads per worker; 0 picks from the CPU share.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Device of the model stages.")
    progress: bool = Field(default=True, description="Print per-shard progress.")


@dataclass(config=_STRICT, frozen=True)
class MetricsSpec:
    enabled: bool = Field(
        default=True,
        description="Measure every published face on the bytes actually written (identity distance, re-detection, "
        "box, landmark, 3D shape/expression and pose distances) into the public manifest. Numbers only, never "
        "embeddings. Payload verification does not depend on this switch.",
    )
    resolution: Literal[128, 256, 512] = Field(
        default=256,
        description="Side of the aligned crops the metrics are measured on; pixel distances are in these pixels "
        "(256 matches the paper's Table III).",
    )
    match_iou: float = Field(
        default=0.5, gt=0, le=1, description="A re-detection counts when its box has at least this IoU with the original's."
    )
    hog_upsample: int = Field(
        default=0, ge=0, le=2, description="Times dlib's HOG detector doubles each crop (0 finds faces from ~80 px)."
    )
    batch_size: int = Field(default=32, ge=1, description="Faces per network pass of the metric models.")
    recognizer_checkpoint: str | None = Field(
        default=None,
        description="Optional second recognizer: an ArcFace IResNet state dict (torch.save). Its cosine similarity "
        "original vs anonymized is recorded beside the dlib identity distance.",
    )
    recognizer_arch: Literal["iresnet50", "iresnet100"] = Field(
        default="iresnet50", description="Architecture of recognizer_checkpoint."
    )
    recognizer_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of recognizer_checkpoint (required with it: other weights stop the run).",
    )

    _home = field_validator("recognizer_checkpoint")(classmethod(lambda cls, v: _expand_home(v)))

    @model_validator(mode="after")
    def _hash_with_checkpoint(self) -> "MetricsSpec":
        if self.recognizer_checkpoint and not self.recognizer_sha256:
            raise ValueError(
                "recognizer_checkpoint needs recognizer_sha256: add the file's sha256 (sha256sum PATH) so that "
                "other weights are refused"
            )
        return self


@dataclass(config=_STRICT, frozen=True)
class JobSpec:
    dataset: DatasetSpec
    input: InputSpec
    output: OutputSpec
    version: Literal[1] = Field(default=SPEC_VERSION, description="Job spec format version.")
    anonymizer: AnonymizerSpec = Field(default_factory=AnonymizerSpec)
    detection: DetectionSpec = Field(default_factory=DetectionSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    keys: KeysSpec = Field(default_factory=KeysSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="The utility/privacy metrics stage.")
    seed: int = Field(default=0, ge=0, lt=2**63, description="Job seed; each face's seed derives from it, the sample key as published and the face index.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobSpec":
        for name in ("decode", "detect", "encode"):
            gpus = getattr(self.resources, name).num_gpus
            if gpus is not None and (gpus == "auto" or gpus < 0):
                raise ValueError(f"resources.{name}.num_gpus must be a number >= 0 ('auto' is for resources.anonymize)")
        gpus = self.resources.anonymize.num_gpus
        if gpus not in (None, "auto") and gpus < 0:
            raise ValueError("resources.anonymize.num_gpus must be >= 0 or 'auto'")
        if self.input.format == "parquet" and not self.input.image_column:
            raise ValueError("input.image_column is required for parquet input: name the column with image bytes")
        return self


_ADAPTER = TypeAdapter(JobSpec)

_FIX_HINTS = {
    "extra_forbidden": "remove it or check its spelling against schemas/job.schema.json",
    "unexpected_keyword_argument": "remove it or check its spelling against schemas/job.schema.json",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
}


def _schema_node(schema: dict, node: dict) -> dict:
    """``node`` with ``$ref`` and Optional/union wrappers resolved to the mapping it describes, if any."""
    defs = schema.get("$defs", {})
    for _ in range(16):  # refs to refs, unions of refs: a few levels at most
        if "$ref" in node:
            node = defs.get(node["$ref"].rsplit("/", 1)[-1], {})
            continue
        branches = node.get("anyOf") or node.get("oneOf") or node.get("allOf")
        if not branches:
            return node
        mappings = [b for b in branches if "$ref" in b or "properties" in b]
        if not mappings:
            return node
        node = mappings[0]
    return node


def known_keys(schema: dict, parent: list[str]) -> list[str]:
    """The keys ``schema`` allows in the mapping at the dotted path ``parent`` ([] where that is not a mapping
    it describes)."""
    node = _schema_node(schema, schema)
    for part in parent:
        props = node.get("properties", {})
        if part not in props:
            return []
        node = _schema_node(schema, props[part])
    return sorted(node.get("properties", {}))


def _did_you_mean(key: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'? "
    if 0 < len(known) <= 12:
        return f"this section takes {', '.join(known)}; "
    return ""


def _from_override(loc: list[str], overrides: list[tuple[str, str]]) -> str:
    """' (from --set KEY=VALUE)' when an override wrote the key at ``loc`` or a section holding it (errors about
    a whole section, or the whole job, are not pinned on an override of one key in it)."""
    for key, value in reversed(overrides):  # the last --set of a key is the one that counts
        parts = key.split(".")
        if loc and loc[: len(parts)] == parts:
            return f" (from --set {key}={value})"
    return ""


def _format_errors(err: ValidationError, source: str, adapter: TypeAdapter | None = None,
                   overrides: list[tuple[str, str]] = ()) -> str:
    """One line per error: the dotted key as the user wrote it, what is wrong, how to fix it; an unknown key
    gets the closest known key of its section, and a key an override wrote names that ``--set``."""
    overrides = list(overrides)
    lines = [f"invalid job spec {source}:"]
    for e in err.errors():
        # pydantic puts validators and union branches in the location path; keep the keys the user wrote
        parts = [str(p) for p in e["loc"] if not str(p).startswith("function-after") and str(p) not in ("str", "list[str]")]
        loc = ".".join(parts) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        hint = _FIX_HINTS.get(e["type"], "")
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key"
            if parts:  # the schema is built only here, on the rare unknown key
                hint = _did_you_mean(parts[-1], known_keys((adapter or _ADAPTER).json_schema(), parts[:-1])) + hint
        lines.append(f"  {loc}: {msg}" + (f" ({hint})" if hint else "") + _from_override(parts, overrides))
    return "\n".join(lines)


def set_override(tree: dict, dotted: str, raw_value: str) -> None:
    """Apply one ``--set a.b.c=value`` override; the value is parsed as YAML."""
    keys = dotted.split(".")
    if not all(keys):
        raise JobSpecError(f"--set {dotted}: empty key segment; write it as section.key=value")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise JobSpecError(f"--set {dotted}: '{k}' is a value, not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw_value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise JobSpecError(f"--set {dotted}={raw_value}: the value is not valid YAML ({problem}); quote it, e.g. "
                           f"--set '{dotted}={json.dumps(raw_value)}'") from None


def parse_spec(tree: Any, source: str = "<dict>", overrides: list[tuple[str, str]] = ()) -> JobSpec:
    """Validate a job tree; ``overrides`` are the (key, value) pairs of ``--set`` already applied to it, named in
    errors about the keys they wrote."""
    if not isinstance(tree, dict):
        raise JobSpecError(f"invalid job spec {source}: the top level must be a mapping of sections")
    try:
        return _ADAPTER.validate_python(tree)
    except ValidationError as err:
        raise JobSpecError(_format_errors(err, source, overrides=overrides)) from None


def apply_overrides(tree: dict, items: list[str], example: str) -> list[tuple[str, str]]:
    """Apply ``--set key=value`` items to ``tree`` in order; returns them as (key, value) pairs."""
    applied = []
    for item in items:
        if "=" not in item:
            raise JobSpecError(f"--set {item!r}: expected key=value, e.g. --set {example}")
        key, value = item.split("=", 1)
        set_override(tree, key.strip(), value)
        applied.append((key.strip(), value))
    return applied


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read a YAML job file, apply ``key=value`` overrides, validate."""
    path = Path(path)
    if path.is_dir():
        raise JobSpecError(f"job file {path} is a folder; pass the path of a YAML job spec in it (see jobs/)")
    if not path.is_file():
        raise JobSpecError(f"job file {path} does not exist; pass the path of a YAML job spec (see jobs/)")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise JobSpecError(f"job file {path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise JobSpecError(f"invalid job spec {path}: the top level must be a mapping of sections")
    applied = apply_overrides(tree, list(overrides), "output.dir=/tmp/out")
    if {"data", "run"} <= set(tree) and "input" not in tree:
        raise JobSpecError(f"job file {path} is a training job (sections data and run): run it with "
                           f"`g2face-pipe train {path}`; `run` takes anonymization jobs (see jobs/demo.yaml)")
    if "prepare" in tree and "anonymizer" not in tree:
        raise JobSpecError(f"job file {path} is a prepare job (section prepare): run it with "
                           f"`g2face-pipe prepare {path}`; `run` takes anonymization jobs (see jobs/demo.yaml)")
    return parse_spec(tree, str(path), applied)


def spec_to_dict(spec: JobSpec) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(spec)))


# Anonymizer keys only a g2face job reads (the model, its payload, its redraws and guard).
G2FACE_ONLY_KEYS = ("checkpoint", "weights", "official", "payload", "on_unverified", "identity_guard",
                    "identity_guard_distance", "draws", "identity_push", "identity_push_after",
                    "identity_push_hold",
                    "payload_reinforce_steps", "payload_reinforce_max_change", "payload_reinforce_keep_detection")


def unused_anonymizer_keys(an: AnonymizerSpec) -> list[str]:
    """Anonymizer keys this job never reads: the g2face-only ones for a blur or pixelate job, and the blur's
    or pixelation's strength where neither the method nor the fallback is that."""
    unused = [] if an.method == "g2face" else list(G2FACE_ONLY_KEYS)
    used = {an.method, an.fallback}
    unused += [k for k, m in (("blur_sigma", "blur"), ("pixelate_blocks", "pixelate")) if m not in used]
    return unused


def reinforcement_applies(an: AnonymizerSpec) -> bool:
    """Whether payload reinforcement runs for this anonymizer (reversible shipped-prior g2face, steps > 0)."""
    return (an.method == "g2face" and an.weights == "shipped" and an.payload == "reversible"
            and an.payload_reinforce_steps > 0)


def push_applies(an: AnonymizerSpec) -> bool:
    """Whether some draw of this anonymizer can be pushed (g2face, identity_push > 0, draws beyond the plain ones)."""
    return an.method == "g2face" and an.identity_push > 0 and an.draws > an.identity_push_after


def spec_fingerprint(spec: JobSpec) -> str:
    """Hash of what shapes the output bytes of a shard (fingerprint_fields)."""
    return _hash(fingerprint_fields(spec))


def accepted_fingerprints(spec: JobSpec) -> set[str]:
    """Fingerprints of done shards a run of ``spec`` resumes: its own, and the one the same job had while
    weight files' paths were still hashed (their content is checked by the model id either way)."""
    return {spec_fingerprint(spec), _hash(fingerprint_fields(spec, weight_paths=True))}


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_fields(spec: JobSpec, weight_paths: bool = False) -> dict:
    """What shapes the output bytes of a shard.

    Left out: where inputs and outputs live (adding shards later must not refuse a resume), the key file's
    path (the key id is checked separately), weight files' paths (their hashes are checked), the failure
    policy, and actor counts. Kept: the detection batch size and device, because MTCNN's float results
    depend on batch composition and hardware, and the metrics section, which shapes the manifests (a
    resumed run must not mix measured and unmeasured shards).
    """
    d = spec_to_dict(spec)
    if d["anonymizer"]["weights"] == "shipped":  # fingerprints of jobs written before these keys stay the same
        d["anonymizer"].pop("weights")
        d["anonymizer"].pop("official")
    # Weight files are named by where they lie, but the run checks what they hold: the done markers carry the
    # model id (the artifact's and priors' sha256) and metrics keep recognizer_sha256. So a moved or remounted
    # file resumes, and a changed one is refused by the model id. Unset paths stay, keeping old fingerprints.
    # (weight_paths: the fields as they were before, for accepted_fingerprints.)
    for section, key in (("anonymizer", "checkpoint"), ("anonymizer", "official"), ("metrics", "recognizer_checkpoint")):
        if d[section].get(key) is not None and not weight_paths:
            d[section].pop(key)
    if spec.anonymizer.method != "g2face":  # blur / pixelate jobs never draw
        d["anonymizer"].pop("draws")
    if not push_applies(spec.anonymizer):  # jobs that never push keep the fingerprints of before the field
        d["anonymizer"].pop("identity_push")
        d["anonymizer"].pop("identity_push_after")
    if not (push_applies(spec.anonymizer) and spec.anonymizer.identity_push_hold):
        d["anonymizer"].pop("identity_push_hold")  # plain draws after a push: the bytes of before the field
    if not reinforcement_applies(spec.anonymizer):  # jobs whose bytes it does not touch keep their fingerprints
        d["anonymizer"].pop("payload_reinforce_steps")
        d["anonymizer"].pop("payload_reinforce_max_change")
    if not (reinforcement_applies(spec.anonymizer) and spec.anonymizer.payload_reinforce_keep_detection):
        d["anonymizer"].pop("payload_reinforce_keep_detection")  # reinforcement as before the field: same bytes
    if spec.anonymizer.method == "g2face" and spec.output.keys == "pseudonymize":
        # Face seeds come from the published (pseudonymized) key since this field: a run started before
        # drew from the original keys and must not resume into shards drawn the new way.
        d["face_seeds"] = "published_key"
    if spec.anonymizer.method == "g2face" and spec.anonymizer.identity_guard != "off" and spec.anonymizer.draws > 1:
        # Since this field the guard also reads the redraw check's verdict on the published look: a run begun
        # before, which let some still-matching faces through, must not resume into shards guarded the new way.
        d["identity_guard_checks"] = "crop_and_published"
    d.pop("runtime", None)
    d.pop("resources", None)
    d["output"].pop("dir", None)
    d["input"].pop("paths", None)
    d["keys"].pop("master", None)
    d["policy"].pop("on_error", None)
    d["detect_batch_size"] = spec.resources.detect.batch_size
    d["device"] = spec.runtime.device
    return d


def json_schema() -> dict:
    schema = _ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "g2face-pipe job spec"
    schema["$comment"] = "Generated by `python -m pipeline.spec`; do not edit by hand."
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "schemas" / "job.schema.json"
    out.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
