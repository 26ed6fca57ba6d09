"""The numbers that ``g2face-pipe audit`` and ``g2face-pipe evaluate`` both report, computed in one place.

Identity distances are dlib descriptor distances (same person below ``SAME_PERSON_DISTANCE`` = 0.6). The
verification threshold comes from the originals' impostor pairs at ``FAR_TARGET`` (paper Table I). Rows take
duck-typed runs (``.public`` manifest rows, ``.method``) and collections of re-read faces
(``.with_embeddings``: records with ``orig``, ``anon``, ``original_key``, ``side``, ``size_class``), as
``pipeline.audit`` builds them; both commands pass the same objects, so their numbers cannot drift apart.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from g2face.identity import SAME_PERSON_DISTANCE
from schemas import load_json

FAR_TARGET = 1e-3
HIST_EDGES = np.round(np.arange(0.0, 1.5001, 0.05), 2)  # identity distance bins; the last one also takes > 1.5
_SIZE_CLASSES = load_json("status.json")["size_class"]


def match_share(distances) -> float | None:
    """Share of identity distances below the same-person threshold (None without any distance)."""
    d = np.asarray([x for x in distances if x is not None], np.float64)
    return float((d < SAME_PERSON_DISTANCE).mean()) if len(d) else None


def tar_at(genuine, threshold: float | None) -> float | None:
    """Share of genuine pair distances accepted (d < threshold)."""
    g = np.asarray(genuine, np.float64)
    return float(np.mean(g < threshold)) if len(g) and threshold else None


def psnr_ssim_mae(a: np.ndarray, b: np.ndarray) -> dict:
    """PSNR (dB), SSIM (grey, Gaussian window 11 / sigma 1.5) and MAE (0..1 scale) of two uint8 RGB images."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    psnr = 10 * math.log10(255.0**2 / mse) if mse > 0 else None  # identical images: unbounded
    gx = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float64)
    gy = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float64)
    blur = lambda t: cv2.GaussianBlur(t, (11, 11), 1.5)  # noqa: E731
    mx, my = blur(gx), blur(gy)
    vx, vy, cxy = blur(gx * gx) - mx * mx, blur(gy * gy) - my * my, blur(gx * gy) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return {"psnr": psnr, "ssim": float(ssim.mean()), "mae": float(np.mean(np.abs(x - y)) / 255.0)}



def far_threshold(impostor: np.ndarray, far: float = FAR_TARGET) -> tuple[float | None, float]:
    """Distance threshold t (accept when d < t) letting at most far * n impostor pairs through, and the FAR it
    achieves. With fewer than 1/far impostor pairs no impostor may pass (t = the smallest impostor distance)."""
    d = np.sort(np.asarray(impostor, np.float64))
    if len(d) == 0:
        return None, 0.0
    k = int(math.floor(far * len(d) + 1e-9))
    t = float(d[k]) if k < len(d) else float(d[-1]) + 1e-6
    return t, float(np.mean(d < t))


def rank1(gallery: np.ndarray, probes: np.ndarray) -> float:
    """Share of probes whose nearest gallery entry (Euclidean) is the one at their own index."""
    g, p = gallery.astype(np.float64), probes.astype(np.float64)
    d = (p * p).sum(1)[:, None] - 2 * p @ g.T + (g * g).sum(1)[None]
    return float(np.mean(np.argmin(d, axis=1) == np.arange(len(p))))


def summary(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if len(v) == 0:
        return None
    return {
        "n": int(len(v)),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p05": float(np.percentile(v, 5)),
        "p95": float(np.percentile(v, 95)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def identity_distances(run, collected) -> tuple[list[float], list[str | None], list[str | None], str]:
    """Per-face identity distances, size classes and methods: from the manifests' metrics, else recomputed
    from the re-read faces."""
    measured = [
        (f["metrics"]["identity_distance"], f["size_class"], f.get("method"))
        for r in run.public
        if r["published"]
        for f in r["faces"]
        if f.get("metrics") and f["metrics"].get("identity_distance") is not None
    ]
    source = "manifest"
    if not measured and collected and collected.with_embeddings:
        measured = [
            (float(np.linalg.norm(f.orig.astype(np.float64) - f.anon)), f.size_class, f.method)
            for f in collected.with_embeddings
        ]
        source = "recomputed"
    if not measured:
        return [], [], [], "none"
    return [m[0] for m in measured], [m[1] for m in measured], [m[2] for m in measured], source


def _matching(d: np.ndarray) -> dict:
    matching = int((d < SAME_PERSON_DISTANCE).sum())
    return {"faces": int(len(d)), "still_matching": matching,
            "share_still_matching": matching / len(d) if len(d) else None}


def privacy_row(label: str, run, collected) -> dict:
    dist, sizes, methods, source = identity_distances(run, collected)
    d = np.asarray(dist, np.float64)
    counts = np.histogram(np.clip(d, 0, HIST_EDGES[-1]), HIST_EDGES)[0] if len(d) else np.zeros(len(HIST_EDGES) - 1)
    faces = collected.with_embeddings if collected else []
    by_size = [{"size_class": name, **_matching(d[[s == name for s in sizes]] if len(d) else d)}
               for name in _SIZE_CLASSES]
    # A g2face run's faces split by the method that made them: the model's own, and the fallback's (faces
    # too small or scored too low for the model)
    by_method = [{"method": m, **_matching(d[[x == m for x in methods]])}
                 for m in sorted({x for x in methods if x is not None})]
    return {
        "label": label,
        "method": run.method,
        "faces": int(len(d)),
        "distance_source": source,
        "identity_distance": summary(dist),
        "histogram": {"edges": [float(e) for e in HIST_EDGES], "counts": [int(c) for c in counts]},
        "still_matching": int((d < SAME_PERSON_DISTANCE).sum()),
        "share_still_matching": match_share(d),
        "by_size_class": by_size,
        "by_method": by_method,
        "rank1": (
            rank1(np.stack([f.orig for f in faces]), np.stack([f.anon for f in faces])) if len(faces) >= 2 else None
        ),
        "rank1_gallery": len(faces),
        "rank1_chance": 1.0 / len(faces) if faces else None,
    }



def subjects(collected) -> dict:
    """Original key -> the image's largest face (the subject a pairs file refers to)."""
    best: dict = {}
    for f in collected.with_embeddings:
        if f.original_key is not None and (f.original_key not in best or f.side > best[f.original_key].side):
            best[f.original_key] = f
    return best


def verification(pairs: list[tuple[str, str, bool]], runs: list[tuple]) -> dict:
    """TAR at FAR=1e-3, one side anonymized (key_b), threshold from the originals' impostor pairs (paper Table I)."""
    ref = subjects(runs[0][2])
    usable = [(a, b, s) for a, b, s in pairs if a in ref and b in ref]
    dist = lambda x, y: float(np.linalg.norm(x.astype(np.float64) - y))  # noqa: E731
    genuine = np.array([dist(ref[a].orig, ref[b].orig) for a, b, s in usable if s])
    impostor = np.array([dist(ref[a].orig, ref[b].orig) for a, b, s in usable if not s])
    t, far = far_threshold(impostor)
    rows = [
        {
            "label": "Original (no anonymization)",
            "method": "none",
            "tar": tar_at(genuine, t),
            "far": far,
            "genuine_pairs": int(len(genuine)),
            "impostor_pairs": int(len(impostor)),
        }
    ]
    for label, run, col in runs:
        subj = subjects(col)
        use = [(a, b, s) for a, b, s in usable if b in subj]
        g = np.array([dist(ref[a].orig, subj[b].anon) for a, b, s in use if s])
        i = np.array([dist(ref[a].orig, subj[b].anon) for a, b, s in use if not s])
        rows.append(
            {
                "label": label,
                "method": run.method,
                "tar": tar_at(g, t),
                "far": float(np.mean(i < t)) if len(i) and t else None,
                "genuine_pairs": int(len(g)),
                "impostor_pairs": int(len(i)),
            }
        )
    return {
        "computed": bool(len(genuine) and len(impostor)),
        "far_target": FAR_TARGET,
        "threshold": t,
        "recognizer": "dlib",
        "pairs_total": len(pairs),
        "pairs_used": len(usable),
        "pairs_skipped": len(pairs) - len(usable),
        "rows": rows,
        "genuine_original": [float(x) for x in genuine],
        "impostor_original": [float(x) for x in impostor],
    }



def utility_row(label: str, run) -> dict:
    ms = [f["metrics"] for r in run.public if r["published"] for f in r["faces"] if f.get("metrics")]
    row = {
        "label": label,
        "method": run.method,
        "faces_measured": len(ms),
        "resolution": ms[0]["resolution"] if ms else None,
    }
    mean = lambda key: mean_of([m[key] for m in ms])  # noqa: E731
    for det in ("mtcnn", "hog"):
        found = [m for m in ms if m[f"{det}_original"]]
        row[f"{det}_original_found"] = len(found)
        row[f"{det}_redetected"] = sum(bool(m[f"{det}_redetected"]) for m in found)
        row[f"{det}_detection_rate"] = row[f"{det}_redetected"] / len(found) if found else None
        row[f"{det}_box_distance"] = mean(f"{det}_box_distance")
        row[f"{det}_box_iou"] = mean(f"{det}_box_iou")
    row["mtcnn_missed_by"] = mtcnn_misses(run)
    for key in (
        "mtcnn_landmark_distance",
        "landmark68_distance",
        "shape_distance",
        "expression_distance",
        "pose_distance",
        "identity_distance",
        "recognizer_cosine",
    ):
        row[key] = mean(key)
    return row


def mtcnn_misses(run) -> dict[str, int]:
    """Where MTCNN's misses (faces found in the original, not in the published image) come from, counted by
    the face's method and, for a fallback, its reason ('pixelate/too_small'), for a g2face face with redraws,
    what the redraw check concluded about its kept draw ('g2face/not_detected': no draw was both anonymized
    and found; 'g2face/passed': found at the check, lost after it); 'g2face' alone where the manifest has no
    verdict (no redraws, or written before manifest version 6)."""
    out: dict[str, int] = {}
    for r in run.public:
        if not r["published"]:
            continue
        for f in r["faces"]:
            m = f.get("metrics")
            if not m or not m["mtcnn_original"] or m["mtcnn_redetected"]:
                continue
            detail = f.get("fallback_reason") or (f.get("draw_check") if f["method"] == "g2face" else None)
            key = f"{f['method']}/{detail}" if detail else f["method"]
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def mean_of(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


# ---------------------------------------------------------------------------------------------------------
# Payload randomness: bits read back from published faces without any key. Ciphertext (reversible mode) and
# seeded noise (irreversible mode) should both look like fair coin flips; the functions take a (faces, bits)
# 0/1 matrix and never keep per-face bits.


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, statistic/2)."""
    import torch

    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(statistic / 2.0, dtype=torch.float64)))


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k ones in n fair coin flips: the probability of an outcome at least as far
    from n/2 as k."""
    if n == 0:
        return 1.0
    dev = abs(k - n / 2.0)
    log_p = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0) for i in range(n + 1)]
    return min(1.0, float(sum(math.exp(lp) for i, lp in enumerate(log_p) if abs(i - n / 2.0) >= dev - 1e-9)))


def bit_balance(bits: np.ndarray) -> dict:
    """Per-bit-position share of ones over faces, and whether it is consistent with fair coins.

    chi_square: sum over positions of (ones - n/2)^2 / (n/4), chi-square with one degree of freedom per position
    when every bit is a fair, independent coin. worst_position: the exact binomial test of the most unbalanced
    position, Bonferroni-adjusted for the number of positions."""
    b = np.asarray(bits, np.uint8)
    n, length = b.shape
    ones = b.sum(0, dtype=np.int64)
    share = ones / n
    stat = float(np.sum((ones - n / 2.0) ** 2) / (n / 4.0))
    worst = int(np.argmax(np.abs(share - 0.5)))
    p_worst = binomial_two_sided_p(int(ones[worst]), n)
    counts = np.histogram(share, np.linspace(0.0, 1.0, 21))[0]
    return {
        "faces": int(n),
        "bits_per_face": int(length),
        "share_of_ones": float(share.mean()),
        "position_share_min": float(share.min()),
        "position_share_max": float(share.max()),
        "max_abs_deviation": float(np.abs(share - 0.5).max()),
        "position_share_histogram": {"edges": [round(float(e), 2) for e in np.linspace(0.0, 1.0, 21)],
                                     "counts": [int(c) for c in counts]},
        "chi_square": {"statistic": stat, "dof": int(length), "p_value": chi_square_sf(stat, length)},
        "worst_position": {"position": worst, "share": float(share[worst]), "binomial_p_value": p_worst,
                           "bonferroni_p_value": min(1.0, p_worst * length)},
    }


def bit_agreement_matrix(bits: np.ndarray) -> np.ndarray:
    """(faces, faces) share of bit positions on which two faces agree."""
    b = np.asarray(bits, np.float32)
    agree = b @ b.T + (1.0 - b) @ (1.0 - b).T
    return agree / b.shape[1]


def pairwise_agreement(bits: np.ndarray) -> dict | None:
    """Mean bit agreement over all pairs of distinct faces (0.5 for independent fair coins)."""
    n = len(bits)
    if n < 2:
        return None
    a = bit_agreement_matrix(bits)[np.triu_indices(n, 1)].astype(np.float64)
    return {"pairs": int(len(a)), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max()), "expected_std": 0.5 / math.sqrt(bits.shape[1])}


def identity_agreement(bits: np.ndarray, pairs: list[tuple[int, int, bool]]) -> dict:
    """Bit agreement of same-person vs different-person pairs (row indices into ``bits``). z: the difference of the
    two means in units of its standard error for fair independent bits (0.5/sqrt(bits) per pair); a payload that
    carries identity makes same-person pairs agree more."""
    length = bits.shape[1]
    agree = lambda i, j: float(np.mean(bits[i] == bits[j]))  # noqa: E731
    same = [agree(i, j) for i, j, s in pairs if s]
    diff = [agree(i, j) for i, j, s in pairs if not s]
    out = {"same_person": {"pairs": len(same), "mean": float(np.mean(same)) if same else None},
           "different_person": {"pairs": len(diff), "mean": float(np.mean(diff)) if diff else None},
           "difference": None, "z": None, "p_value": None}
    if same and diff:
        d = out["same_person"]["mean"] - out["different_person"]["mean"]
        se = 0.5 / math.sqrt(length) * math.sqrt(1 / len(same) + 1 / len(diff))
        out.update(difference=d, z=d / se, p_value=math.erfc(abs(d / se) / math.sqrt(2)))
    return out
