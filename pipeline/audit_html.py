"""The audit report as one self-contained HTML page: sections, tables, inline PNGs, template and CSS.

Reads only the audit document that ``pipeline.audit.build_audit`` returns (every number shown is in it) and
the PNG bytes of its figures; nothing here computes a number.
"""

from __future__ import annotations

import base64
import html

import numpy as np

from schemas import load_json

_SIZE_CLASSES = load_json("status.json")["size_class"]
# utility rows' mtcnn_missed_by keys (privacy_metrics.mtcnn_misses), in words
_MISS_CAUSES = {
    "g2face/not_detected": "model faces of which no draw was both anonymized and found by the redraw check",
    "g2face/weak_detection": "model faces found by the redraw check only below its margin score",
    "g2face/passed": "model faces the redraw check found, lost after it (payload reinforcement, encoding, "
                     "neighbouring faces)",
    "g2face/identity_match": "model faces of which no draw was anonymized (identity guard off)",
    "g2face/unchecked": "model faces whose redraw failed",
    "g2face": "model faces without a redraw verdict",
}


def miss_cause(key: str) -> str:
    """One ``mtcnn_missed_by`` key in words (HTML-escaped)."""
    if key in _MISS_CAUSES:
        return _MISS_CAUSES[key]
    method, _, reason = key.partition("/")
    return html.escape(f"{method} faces ({reason})" if reason else f"{method} faces")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1080px;padding:1.5em;
  color:#1d232a}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:2px solid #d8dee4;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:right}
th{background:#f3f5f7} td:first-child,th:first-child{text-align:left} .note{color:#57606a;font-size:.9em}
.warn{background:#fff8c5;border-left:4px solid #d4a72c;padding:.5em .8em}
.ok{background:#eef9f0;border-left:4px solid #2da44e;padding:.5em .8em}
figure{margin:1em 0} figcaption{color:#57606a;font-size:.9em} img{max-width:100%}
code{background:#f3f5f7;padding:0 .2em}
"""


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c) if isinstance(c, str) else _fmt(c)}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def p_value_text(p: float) -> str:
    return "p < 1e-300" if p < 1e-300 else f"p = {p:.3g}"


def _keyless_html(k: dict) -> str:
    e = html.escape
    head = "<h3>Recovery without the key (re-synthesis attack)</h3>"
    if not k["computed"]:
        return head + f"<p>Not computed: {e(k['reason'])}.</p>"
    share = k["share_matching_original"]
    dist = (k.get("identity_distance") or {}).get("mean")
    return head + (
        # warn above bar 1's limit of issue 6: more than 5% of faces still showing their person
        f"<p class='{'warn' if share > 0.05 else 'ok'}'>Someone with the published data and the model, but no key, "
        f"restores a face matching its original (dlib distance below {_fmt(k['threshold'], 2)}) for "
        f"{_fmt(share * 100, 1)}% of the {k['attacked']} g2face faces attacked, of {k['faces']} "
        f"(mean distance {_fmt(dist, 3)}).</p>"
        f"<p class='note'>{e(k['method'])}</p>")


def _payload_html(pay: dict) -> str:
    e = html.escape
    r = pay["randomness"]
    parts = [f"<h3>Payload</h3><p>{e(pay['statement'])}</p>", "<h4>Payload randomness (read back without a key)</h4>"]
    if not r["computed"]:
        parts.append(f"<p>Not computed: {e(r['reason'])}.</p>")
        if "meaning" in r:
            parts.append(f"<p class='note'>{e(r['meaning'])}</p>")
        return "".join(parts)
    bal, agr, ident = r["balance"], r["pairwise_agreement"], r["identity"]
    parts.append(f"<p class='{'ok' if r['verdict'] == 'consistent_with_random' else 'warn'}'>{e(r['statement'])}</p>")
    parts.append(_table(
        ["figure", "value", "if uniformly random"],
        [
            ["faces read (of published g2face faces)", f"{r['faces_read']} of {r['faces_published']}", "–"],
            ["bits per face", bal["bits_per_face"], "–"],
            ["share of ones, all bits", bal["share_of_ones"], "0.5"],
            ["per-position share of ones, min – max",
             f"{_fmt(bal['position_share_min'])} – {_fmt(bal['position_share_max'])}", "near 0.5"],
            ["max |share − 0.5| over positions", bal["max_abs_deviation"],
             # the largest of `bits` |normal| deviations of sd 0.5/sqrt(faces) is about sqrt(2 ln(2 bits)) sd
             f"about {_fmt(0.5 / max(1, r['faces_read']) ** 0.5 * (2 * np.log(2 * bal['bits_per_face'])) ** 0.5)}"],
            [f"chi-square over positions ({bal['chi_square']['dof']} dof), p-value",
             f"{bal['chi_square']['statistic']:.1f}, {p_value_text(bal['chi_square']['p_value'])}", "p not tiny"],
            [f"worst position {bal['worst_position']['position']}: binomial p, Bonferroni-adjusted",
             p_value_text(bal["worst_position"]["bonferroni_p_value"]), "p not tiny"],
            ["mean pairwise bit agreement" + (f" ({agr['pairs']} pairs)" if agr else ""),
             agr["mean"] if agr else None, "0.5"],
            ["mean raw bit error rate at write time", r["mean_write_ber"], "–"],
        ],
    ))
    if ident.get("computed"):
        parts.append(_table(
            ["pairs (from --pairs)", "pairs", "mean bit agreement"],
            [["same person", ident["same_person"]["pairs"], ident["same_person"]["mean"]],
             ["different people", ident["different_person"]["pairs"], ident["different_person"]["mean"]],
             ["difference (z, p)", "–",
              f"{ident['difference']:.4f} (z = {ident['z']:.2f}, {p_value_text(ident['p_value'])})"]],
        ))
    else:
        parts.append(f"<p>Same-person vs different-person agreement not computed: {e(ident['reason'])}.</p>")
    parts.append(f"<p class='note'>{e(r['meaning'])} Faces: {e(r['sampling'])}; model sha256 "
                 f"<code>{e(str(r['artifact_sha256']))}</code>.</p>")
    return "".join(parts)


def render_html(doc: dict, figures: dict[str, bytes], grid: bytes | None) -> str:
    e = html.escape
    run, cov, priv, util = doc["run"], doc["coverage"], doc["privacy"], doc["utility"]
    parts = [
        f"<h1>Privacy audit: {e(run['dataset_id'])}</h1>",
        f"<p class='note'>Run <code>{e(doc['run_dir'])}</code> · method <b>{e(run['method'])}</b> "
        f"({e(str(run['anonymizer_model_id']))}) · generated {e(doc['generated'])} · every number is in "
        "<code>audit.json</code> beside this file.</p>",
    ]

    sec = [
        "<h2>Coverage</h2>",
        _table(
            [
                "images",
                "published",
                "faces found",
                "anonymized",
                "of which fallback",
                "images withheld",
                "errors",
                "no face",
            ],
            [
                [
                    cov["images"],
                    cov["published"],
                    cov["faces"],
                    cov["anonymized"],
                    cov["fallback"],
                    cov["withheld"],
                    cov["errors"],
                    cov["no_face"],
                ]
            ],
        ),
    ]
    sec.append(f"<p class='{'warn' if cov['risky_faces']['total'] else 'ok'}'>{e(cov['risky_faces']['statement'])}</p>")
    sec.append(
        "<h3>By shard</h3>"
        + _table(
            ["shard", "images", "published", "faces", "anonymized", "fallback", "withheld", "errors"],
            [
                [
                    s["shard"],
                    s["images"],
                    s["published"],
                    s["faces"],
                    s["anonymized"],
                    s["fallback"],
                    s["withheld"],
                    s["errors"],
                ]
                for s in cov["by_shard"]
            ],
        )
    )
    sec.append(
        "<h3>By face size</h3>"
        + _table(
            ["size class (box side, px)", "faces", "anonymized", "fallback"],
            [
                [
                    f"{c['size_class']} ({_SIZE_CLASSES[c['size_class']][0]}–"
                    f"{_SIZE_CLASSES[c['size_class']][1] or '∞'})",
                    c["faces"],
                    c["anonymized"],
                    c["fallback"],
                ]
                for c in cov["by_size_class"]
            ],
        )
    )
    if cov["fallback_reasons"]:
        sec.append(
            "<p>Fallback reasons: " + ", ".join(f"{e(k)}: {v}" for k, v in cov["fallback_reasons"].items()) + "</p>"
        )
    if cov.get("redrawn_faces"):
        sec.append(f"<p>G2Face faces that kept a later draw (redraw, <code>anonymizer.draws</code>): "
                   f"{cov['redrawn_faces']}</p>")
    if cov.get("pushed_faces"):
        sec.append(f"<p>Of those, kept a draw pushed away from the original (<code>anonymizer.identity_push</code>): "
                   f"{cov['pushed_faces']}</p>")
    if cov.get("reinforcement_scaled_faces"):
        sec.append("<p>G2Face faces that kept only part of their payload reinforcement, so that MTCNN still finds "
                   "them (<code>anonymizer.payload_reinforce_keep_detection</code>; manifest "
                   f"<code>reinforce_share</code>): {cov['reinforcement_scaled_faces']}</p>")
    if cov.get("samples_with_warnings"):
        sec.append(f"<p class='warn'>Samples published with a step skipped (manifest column <code>warnings</code>): "
                   f"{cov['samples_with_warnings']}</p>")
    parts.append(f"<section id='coverage'>{''.join(sec)}</section>")

    main = priv["rows"][0]
    sec = ["<h2>Privacy</h2>"]
    if main["faces"]:
        cls = "ok" if not main["still_matching"] else "warn"
        sec.append(
            f"<p class='{cls}'>{main['still_matching']} of {main['faces']} anonymized faces "
            f"({_pct(main['share_still_matching'])}) "
            f"still match their original (dlib identity distance below {priv['threshold']}; distances from the "
            f"{e(main['distance_source'])}).</p>"
        )
    else:
        sec.append(
            "<p class='warn'>No identity distances: the run has no measured faces (metrics off and originals "
            "unreachable).</p>"
        )
    sec.append(
        _table(
            [
                "method",
                "faces",
                "mean identity distance",
                "share still matching",
                "rank-1 re-identification",
                "gallery",
                "chance",
            ],
            [
                [
                    r["label"],
                    r["faces"],
                    (r["identity_distance"] or {}).get("mean"),
                    _pct(r["share_still_matching"]),
                    _pct(r["rank1"]),
                    r["rank1_gallery"],
                    _pct(r["rank1_chance"]),
                ]
                for r in priv["rows"]
            ],
        )
    )
    sec.append(f"<p class='note'>{e(priv['reidentification'])}</p>")
    sec.append(
        "<h3>Still matching, by face size</h3>"
        + _table(
            ["size class"] + [r["label"] for r in priv["rows"]],
            [
                [c["size_class"]]
                + [
                    f"{r['by_size_class'][i]['still_matching']} of {r['by_size_class'][i]['faces']}"
                    for r in priv["rows"]
                ]
                for i, c in enumerate(priv["rows"][0]["by_size_class"])
            ],
        )
        + "<p class='note'>Small faces are upscaled to the recognizer's input: a match there can also mean that too "
        "little is left of either face to tell people apart.</p>"
    )
    v = priv["verification"]
    sec.append("<h3>Verification (Table I layout)</h3>")
    if v["computed"]:
        sec.append(
            _table(
                [f"method", f"TAR @ FAR={v['far_target']:g} (dlib)", "FAR achieved", "genuine pairs", "impostor pairs"],
                [
                    [r["label"], _pct(r["tar"]), _fmt(r["far"], 4), r["genuine_pairs"], r["impostor_pairs"]]
                    for r in v["rows"]
                ],
            )
        )
        sec.append(
            f"<p class='note'>Pairs from <code>{e(v['pairs_file'])}</code>: {v['pairs_used']} of "
            f"{v['pairs_total']} used; {v['pairs_skipped']} skipped because they name an image without a published "
            "face in this run. key_a stays original, key_b is anonymized. The threshold "
            f"({_fmt(v['threshold'], 4)}) lets at most {v['far_target']:g} of the originals' impostor pairs through "
            f"(with fewer than {round(1 / v['far_target'])} impostor pairs: none).</p>"
        )
    else:
        sec.append(f"<p>Not computed: {e(v['reason'])}.</p>")
    sec.append(_payload_html(priv["payload"]))
    sec.append(_keyless_html(priv["keyless_resynthesis"]))
    parts.append(f"<section id='privacy'>{''.join(sec)}</section>")

    sec = ["<h2>Utility (Table III layout)</h2>"]
    fid_doc = util["fid"]
    fid_values = {
        r["label"]: r["value"] if r["value"] is not None else "not computed" for r in fid_doc.get("rows", [])
    }
    if any(r["faces_measured"] for r in util["rows"]):
        sec.append(
            _table(
                [
                    "method",
                    "faces",
                    "detection MTCNN ↑",
                    "detection dlib ↑",
                    "bbox MTCNN ↓",
                    "bbox dlib ↓",
                    "landmarks MTCNN ↓",
                    "landmarks dlib ↓",
                    "shape (mm) ↓",
                    "expression (mm) ↓",
                    "pose (°) ↓",
                    "FID ↓",
                ],
                [
                    [
                        r["label"],
                        r["faces_measured"],
                        _pct(r["mtcnn_detection_rate"]),
                        _pct(r["hog_detection_rate"]),
                        r["mtcnn_box_distance"],
                        r["hog_box_distance"],
                        r["mtcnn_landmark_distance"],
                        r["landmark68_distance"],
                        r["shape_distance"],
                        r["expression_distance"],
                        r["pose_distance"],
                        fid_values.get(r["label"], "not computed"),
                    ]
                    for r in util["rows"]
                ],
            )
        )
        sec.append(
            f"<p class='note'>Measured on aligned {util['resolution']} px crops of the original and of the image as "
            "written (eye centres 63 px apart at 256). Detection rate: faces re-detected in the anonymized crop "
            "among those "
            "the same detector finds in the original crop. Box distance: mean distance of the box corners; landmark "
            "distances: mean point distance (MTCNN's 5 points between re-detections; dlib's 68 points in the same "
            "box on "
            "both crops); shape and expression: 3DMM fits to the 68 points, RMS 3D distance; pose: rotation angle "
            "between the fitted head poses. A dash: not defined (no face re-detected by that detector).</p>"
        )
        missed = util["rows"][0].get("mtcnn_missed_by") or {}
        if missed:
            parts_missed = ", ".join(f"{miss_cause(k)}: {n}" for k, n in missed.items())
            sec.append(f"<p class='note'>Faces MTCNN no longer finds in this run, by cause: {parts_missed}.</p>")
    else:
        sec.append(
            "<p class='warn'>No utility metrics: the metrics stage was off in this run (metrics.enabled: false).</p>"
        )
    if fid_doc["computed"]:
        per_run = "; ".join(
            f"{e(r['label'])}: {_fmt(r['value'], 2)} over {r['faces']} faces"
            if r["value"] is not None
            else f"{e(r['label'])}: not computed ({e(r['reason'])})"
            for r in fid_doc["rows"]
        )
        sec.append(
            f"<p><b>FID:</b> {per_run}. Weights <code>{e(fid_doc['weights'])}</code> "
            f"({e(fid_doc['weights_format'])} layout).</p><p class='note'>{e(fid_doc['statement'])}</p>"
        )
    else:
        sec.append(f"<p><b>FID:</b> not computed. {e(fid_doc['reason'])}</p>")
    parts.append(f"<section id='utility'>{''.join(sec)}</section>")

    rec = doc["recovery"]
    sec = ["<h2>Recovery</h2>"]
    if rec["run"]:
        sec.append(
            _table(
                ["recovered faces", "expected", "decode rate", "PSNR (dB)", "SSIM", "MAE"],
                [
                    [
                        rec["faces_recovered"],
                        rec["faces_expected"],
                        _pct(rec["decode_rate"]),
                        (rec["psnr"] or {}).get("mean"),
                        (rec["ssim"] or {}).get("mean"),
                        (rec["mae"] or {}).get("mean"),
                    ]
                ],
            )
        )
    sec.append(f"<p>{e(rec['statement'])}</p>")
    parts.append(f"<section id='recovery'>{''.join(sec)}</section>")

    sec = ["<h2>Figures</h2>"]
    for f in doc["figures"]:
        sec.append(f"<figure>{_img(figures[f['name']], f['title'])}<figcaption>{e(f['title'])}</figcaption></figure>")
    parts.append(f"<section id='figures'>{''.join(sec)}</section>")

    sec = ["<h2>Examples</h2>", f"<p class='note'>{e(doc['examples']['statement'])}</p>"]
    if grid is not None:
        sec.append(f"<figure>{_img(grid, 'example faces: originals above, anonymized below')}</figure>")
    parts.append(f"<section id='examples'>{''.join(sec)}</section>")

    inp = doc["inputs"]
    sec = [
        "<h2>Provenance</h2>",
        _table(
            ["item", "value"],
            [
                ["dataset", run["dataset_id"]],
                ["anonymizer model", str(run["anonymizer_model_id"])],
                ["spec fingerprint", str(run["fingerprint"])],
                ["key id", str(run["key_id"])],
                ["shards", run["shards"]],
                ["devices", ", ".join(run.get("devices") or [])],
                ["metrics in manifests", run["metrics_enabled"]],
                ["originals re-read", inp["reachable"]],
                ["inputs changed since the run", inp["changed_since_run"]],
                ["unreadable samples", inp["unreadable_samples"]],
            ]
            + [[b["label"], b["run_dir"]] for b in run["baselines"]],
        ),
    ]
    sec.append(f"<p class='note'>{e(inp['statement'])}</p>")
    parts.append(f"<section id='provenance'>{''.join(sec)}</section>")

    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{csp}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>Privacy audit: {e(run['dataset_id'])}</title><link rel='icon' href='data:,'>"
        f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n"
    )
