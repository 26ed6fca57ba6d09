"""Manifest row types: the public manifest (one row per input sample, nothing that re-identifies) and
the private one (data controller only: original keys, input hashes, alignment transforms).

Column names and types are fixed here and exported to ``schemas/manifest.schema.json``; statuses
come from ``schemas/status.json``.
"""
from __future__ import annotations

import json

import pyarrow as pa

from schemas import face_methods, load_json, sample_statuses

# 2: per-face metrics struct and per-sample metrics_error; 3: per-face payload verification; 4: per-face draw and
# per-sample warnings; 5: per-face identity_push; 6: per-face draw_check; 7: per-face reinforce_share
MANIFEST_VERSION = 7
STATUSES = sample_statuses()
FACE_METHODS = face_methods()
_STATUS = load_json("status.json")

# Per-face metrics of pipeline/metrics_stage.py (its FIELDS documents each); null when the stage is off,
# the image is not published, or measuring failed (see metrics_error). Numbers only: no embeddings.
_METRIC_BOOLS = ("mtcnn_original", "mtcnn_redetected", "hog_original", "hog_redetected")
_METRIC_NAMES = (
    "identity_distance", "recognizer_cosine", "mtcnn_original", "mtcnn_redetected", "mtcnn_box_iou",
    "mtcnn_box_distance", "mtcnn_landmark_distance", "hog_original", "hog_redetected", "hog_box_iou",
    "hog_box_distance", "landmark68_distance", "shape_distance", "expression_distance", "pose_distance",
)
METRICS_TYPE = pa.struct(
    [("resolution", pa.int32())]
    + [(name, pa.bool_() if name in _METRIC_BOOLS else pa.float32()) for name in _METRIC_NAMES]
)

FACE_TYPE = pa.struct(
    [
        ("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in output-image pixels
        ("score", pa.float32()),
        ("landmarks", pa.list_(pa.float32(), 10)),  # 5 points (x, y): eyes, nose, mouth corners
        ("method", pa.string()),
        ("fallback_reason", pa.string()),
        ("size_class", pa.string()),
        ("paste_box", pa.list_(pa.int32(), 4)),  # region the paste-back could change (x0, y0, x1, y1)
        ("metrics", METRICS_TYPE),
        # g2face only (null for other methods): the payload mode as published ('reversible' only when the payload
        # read back from the written bytes verified), and the verification: ok / status / raw bit error rate
        # (irreversible: error rate against the seeded random bits). Never the payload itself.
        ("payload_mode", pa.string()),
        ("payload_ok", pa.bool_()),
        ("payload_status", pa.string()),
        ("payload_ber", pa.float32()),
        # g2face only: which draw of the face's seed sequence is published (0: the first; pipeline/redraw.py)
        ("draw", pa.int32()),
        # g2face only: how far that draw's style code was pushed away from the original's (0: the paper's plain
        # draw; pipeline/redraw.py push_strength). Reproducing a published face needs the draw and this.
        ("identity_push", pa.float32()),
        # g2face with redraws only: what the redraw check concluded about the kept draw, judged pasted into its
        # photo before payload reinforcement and encoding (pipeline/redraw.py DRAW_CHECK_OUTCOMES): 'passed',
        # 'weak_detection', 'not_detected' (no draw was both anonymized and found by MTCNN), 'identity_match',
        # 'unchecked' (the redraw failed). A verdict, never a distance or an embedding.
        ("draw_check", pa.string()),
        # g2face faces reinforced as reversible (verification may have made them irreversible since), with
        # anonymizer.payload_reinforce_keep_detection only: the share of its payload reinforcement the face kept
        # (1: all of it, or nothing moved; 0.5, 0.25 or 0: scaled back because MTCNN found the face without it
        # and not with it; pipeline/payload_reinforce.py keep_detection). Null where the check did not run.
        ("reinforce_share", pa.float32()),
    ]
)

PUBLIC_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("key", pa.string()),  # the key as published (pseudonymized when output.keys = pseudonymize)
        ("status", pa.string()),
        ("error", pa.string()),
        ("published", pa.bool_()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_format", pa.string()),
        ("n_faces", pa.int32()),
        ("faces", pa.list_(FACE_TYPE)),
        ("model_id", pa.string()),
        ("metrics_error", pa.string()),  # why this sample's faces have no metrics (the image is unaffected)
        ("payload_reencoded", pa.bool_()),  # written as PNG because a payload did not survive the job's format
        # steps skipped without stopping the sample (payload reinforcement, redraw), each with its reason
        ("warnings", pa.list_(pa.string())),
    ],
    metadata={"g2face-pipe.manifest": "public", "version": str(MANIFEST_VERSION)},
)

PRIVATE_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("key", pa.string()),
        ("original_key", pa.string()),
        ("input_sha256", pa.string()),
        ("status", pa.string()),
        ("transforms", pa.list_(pa.list_(pa.float64(), 6))),  # per face: image -> aligned crop (2x3, row-major)
    ],
    metadata={"g2face-pipe.manifest": "private", "version": str(MANIFEST_VERSION)},
)


def check_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not in schemas/status.json ({', '.join(STATUSES)})")
    return status


def _schema_doc(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


# Columns that are never null, and the closed vocabularies of string columns (dotted paths into structs).
_NOT_NULL = {"shard", "index", "status", "published", "n_faces", "faces", "transforms", "faces[].box", "faces[].score",
             "faces[].landmarks"}
_ENUMS = {
    "status": list(STATUSES),
    "faces[].method": list(FACE_METHODS),
    "faces[].fallback_reason": list(_STATUS["fallback_reason"]),
    "faces[].size_class": list(_STATUS["size_class"]),
    "faces[].payload_mode": ["reversible", "irreversible"],
    "faces[].payload_status": ["ok", "uncorrectable", "authentication_failed"],
    "faces[].draw_check": list(_STATUS["draw_check"]),
}


def _json_type(t: pa.DataType, path: str) -> dict:
    """JSON Schema of one Arrow type as it reads back from Parquet (``Table.to_pylist``)."""
    if pa.types.is_struct(t):
        props = {f.name: _nullable(_json_type(f.type, f"{path}.{f.name}"), f"{path}.{f.name}") for f in t}
        return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        out = {"type": "array", "items": _nullable(_json_type(t.value_type, path + "[]"), path + "[]")}
        if pa.types.is_fixed_size_list(t):
            out["minItems"] = out["maxItems"] = t.list_size
        return out
    if pa.types.is_string(t):
        return {"type": "string", **({"enum": _ENUMS[path]} if path in _ENUMS else {})}
    if pa.types.is_boolean(t):
        return {"type": "boolean"}
    if pa.types.is_integer(t):
        bits = t.bit_width
        return {"type": "integer", "minimum": -(2 ** (bits - 1)), "maximum": 2 ** (bits - 1) - 1}
    if pa.types.is_floating(t):
        return {"type": "number"}
    raise TypeError(f"no JSON Schema mapping for Arrow type {t} at {path}")


def _nullable(schema: dict, path: str) -> dict:
    if path in _NOT_NULL or path.endswith("[]"):  # list items are never null
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def row_json_schema(schema: pa.Schema) -> dict:
    """JSON Schema (draft 2020-12) of one manifest row read back as a Python dict."""
    props = {f.name: _nullable(_json_type(f.type, f.name), f.name) for f in schema}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": props,
        "required": sorted(props),
        "additionalProperties": False,
    }


def schema_text() -> str:
    doc = {
        "$comment": "Generated by `python -m pipeline.manifest`; do not edit by hand.",
        "version": MANIFEST_VERSION,
        "statuses": list(STATUSES),
        "public": _schema_doc(PUBLIC_SCHEMA),
        "private": _schema_doc(PRIVATE_SCHEMA),
        "row_json_schema": {"public": row_json_schema(PUBLIC_SCHEMA), "private": row_json_schema(PRIVATE_SCHEMA)},
    }
    return json.dumps(doc, indent=2) + "\n"


if __name__ == "__main__":
    from pathlib import Path

    out = Path(__file__).resolve().parent.parent / "schemas" / "manifest.schema.json"
    out.write_text(schema_text(), encoding="utf-8")
