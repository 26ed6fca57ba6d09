"""The audit's payload randomness check: bits read back without a key from a real g2face run (untrained,
seeded test artifact: its extractor is random, so the bits are NOT balanced; the tests check the arithmetic
and the refusals, not the balance; see test_leakage.py for the balance of real ciphertext)."""

import csv
import html
import json
import math
import shutil
from itertools import combinations
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DEMO_SHARDS, ROOT, job_tree
from g2face.config import LITE_128
from helpers import decode, read_tar
from pipeline import align
from pipeline.audit import load_run, payload_section, write_audit
from pipeline.runner import run_job
from pipeline.spec import parse_spec

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
QUIET = {"executor": "local", "progress": False, "torch_threads": 1}


def _artifact(path: Path, seed: int) -> Path:
    """An untrained lite-128 artifact: a fixture for the wiring only, never shipped or used for real."""
    from g2face.checkpoint import save_artifact
    from g2face.config import preset
    from g2face.model import G2Face

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_artifact(G2Face(preset("lite-128")), path)
    return path


@pytest.fixture(scope="module")
def g2run(tmp_path_factory):
    from pipeline.keys import create_master_key

    tmp = tmp_path_factory.mktemp("payload-audit")
    art = _artifact(tmp / "model" / "lite-random.pt", 0)
    key = tmp / "master.key"
    create_master_key(key)
    tree = job_tree(tmp / "run", DEMO_SHARDS[0], anonymizer={"method": "g2face", "checkpoint": str(art)},
                    keys={"master": str(key)}, output={"image_format": "png"}, metrics={"enabled": False},
                    runtime=QUIET)
    run_job(parse_spec(tree), echo=lambda *_: None)
    # Identity labels invented for the arithmetic (the demo portraits are six different people): images 0/1 and
    # 2/3 are declared the same person, every other pair different people.
    people = sorted(read_tar(DEMO_SHARDS[0]))
    same = {frozenset(people[0:2]), frozenset(people[2:4])}
    pairs = tmp / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key_a", "key_b", "same"])
        w.writerows((a, b, int(frozenset((a, b)) in same)) for a, b in combinations(people, 2))
        w.writerow(["not_in_this_run", people[0], 0])
    return {"tmp": tmp, "run": tmp / "run", "artifact": art, "pairs": pairs, "people": people, "same": same}


def _bits_read_by_the_test(run: Path, artifact: Path) -> dict[str, np.ndarray]:
    """original key -> bits of its (only) face: the test's own reading of the tar, manifests and model."""
    from g2face.checkpoint import load_artifact

    model = load_artifact(str(artifact)).eval()
    doc = json.loads((run / "run.json").read_text())
    res = doc["spec"]["anonymizer"]["resolution"]
    out = {}
    for item in doc["inputs"]:
        shard = item["shard"]
        published = read_tar(run / "shards" / shard)
        private = {r["index"]: r for r in pq.read_table(run / "private" / f"{shard}.parquet").to_pylist()}
        for row in pq.read_table(run / "manifests" / f"{shard}.parquet").to_pylist():
            assert row["published"] and row["n_faces"] == 1 and row["faces"][0]["method"] == "g2face"
            p = private[row["index"]]
            rgb = decode(published[p["key"]]["png"])
            crop = align.warp_to_crop(rgb, np.asarray(p["transforms"][0]).reshape(2, 3), res)
            x = torch.from_numpy(crop[None]).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                out[p["original_key"]] = (model.extract(x)[0].numpy() > 0).astype(np.uint8)
    return out


def _chi2_sf_even_dof(x: float, k: int) -> float:
    """Q(k/2, x/2) for even k by its finite series: exp(-x/2) * sum_{i < k/2} (x/2)^i / i!."""
    h = x / 2
    terms = [i * math.log(h) - math.lgamma(i + 1) - h for i in range(k // 2)] if h > 0 else [0.0]
    top = max(terms)
    return math.exp(top) * sum(math.exp(t - top) for t in terms)


def _binomial_p(k: int, n: int) -> float:
    return min(1.0, sum(math.comb(n, i) for i in range(n + 1) if abs(i - n / 2) >= abs(k - n / 2)) / 2**n)


def test_payload_figures_agree_with_bits_read_by_the_test(g2run, tmp_path):
    html_path, json_path = write_audit(str(g2run["run"]), str(tmp_path / "report.html"), pairs=str(g2run["pairs"]))
    doc = json.loads(json_path.read_text())
    jsonschema.validate(doc, json.loads((ROOT / "schemas" / "audit.schema.json").read_text()))
    r = doc["privacy"]["payload"]["randomness"]
    mine = _bits_read_by_the_test(g2run["run"], g2run["artifact"])
    keys = sorted(mine)
    bits = np.stack([mine[k] for k in keys]).astype(np.int64)
    n, length = bits.shape
    assert r["computed"] and r["faces_read"] == r["faces_published"] == r["faces_selected"] == n == 6
    assert r["faces_unreadable"] == 0 and sum(r["payload_modes"].values()) == n
    assert r["artifact_sha256"] == json.loads((g2run["run"] / "run.json").read_text())["payload"]["artifact_sha256"]

    bal = r["balance"]
    ones = bits.sum(0)
    assert bal["faces"] == n and bal["bits_per_face"] == length == LITE_128.payload_bits
    assert bal["share_of_ones"] == pytest.approx(bits.mean(), abs=1e-12)
    assert bal["max_abs_deviation"] == pytest.approx(np.abs(ones / n - 0.5).max())
    assert sum(bal["position_share_histogram"]["counts"]) == length
    stat = sum((o - n / 2) ** 2 / (n / 4) for o in ones)
    assert bal["chi_square"]["statistic"] == pytest.approx(stat) and bal["chi_square"]["dof"] == length
    assert bal["chi_square"]["p_value"] == pytest.approx(_chi2_sf_even_dof(stat, length), rel=1e-6, abs=1e-300)
    w = bal["worst_position"]["position"]
    assert abs(ones[w] / n - 0.5) == pytest.approx(np.abs(ones / n - 0.5).max())
    assert bal["worst_position"]["binomial_p_value"] == pytest.approx(_binomial_p(int(ones[w]), n))
    # sanity of the p-value code on textbook values (fair coins: 3 of 6 ones -> p = 1; chi2(2) at 2 ln 20 -> 0.05)
    from pipeline.privacy_metrics import binomial_two_sided_p, chi_square_sf

    assert binomial_two_sided_p(3, 6) == 1.0 and binomial_two_sided_p(0, 6) == pytest.approx(2 / 64)
    assert chi_square_sf(2 * math.log(20), 2) == pytest.approx(0.05)
    for x in (0.95 * length, 1.0 * length, 1.05 * length):  # where the p-value is neither 0 nor 1 (the run's bits give p ~ 0)
        assert chi_square_sf(x, length) == pytest.approx(_chi2_sf_even_dof(x, length), rel=1e-6)

    agree = [np.mean(bits[i] == bits[j]) for i, j in combinations(range(n), 2)]
    agr = r["pairwise_agreement"]
    assert agr["pairs"] == 15 and agr["mean"] == pytest.approx(np.mean(agree), abs=1e-9)
    assert agr["min"] == pytest.approx(min(agree)) and agr["max"] == pytest.approx(max(agree))

    ident = r["identity"]
    same = [np.mean(mine[a] == mine[b]) for a, b in combinations(keys, 2) if frozenset((a, b)) in g2run["same"]]
    diff = [np.mean(mine[a] == mine[b]) for a, b in combinations(keys, 2) if frozenset((a, b)) not in g2run["same"]]
    assert ident["computed"] and ident["pairs_used"] == 15
    assert ident["same_person"] == {"pairs": 2, "mean": pytest.approx(np.mean(same))}
    assert ident["different_person"] == {"pairs": 13, "mean": pytest.approx(np.mean(diff))}
    assert ident["difference"] == pytest.approx(np.mean(same) - np.mean(diff))

    # The untrained extractor's bits are far from fair coins: the report must say so, not call them random.
    assert r["verdict"] == "biased" and "NOT look uniformly random" in r["statement"]
    page = html.unescape(html_path.read_text())
    assert "Payload randomness" in page and "same person" in page and r["statement"] in page
    for k in g2run["people"]:  # original keys never appear
        assert k not in page and k not in json_path.read_text()


def test_sampling_is_bounded_and_deterministic(g2run):
    run = load_run(str(g2run["run"]))
    a = payload_section(run, limit=4)["randomness"]
    b = payload_section(run, limit=4)["randomness"]
    assert a["faces_read"] == a["faces_selected"] == 4 and a["faces_published"] == 6
    assert a["balance"] == b["balance"] and a["pairwise_agreement"]["pairs"] == 6
    # faces named by the pairs file come first
    from pipeline.payload_readback import select_faces

    chosen, total = select_faces(run, 2, [g2run["people"][5], g2run["people"][4]])
    assert total == 6 and sorted(f.original_key for f in chosen) == sorted(g2run["people"][4:6])


def _copy_run(src: Path, dst: Path, **spec_changes) -> Path:
    shutil.copytree(src, dst)
    doc = json.loads((dst / "run.json").read_text())
    doc["spec"]["anonymizer"].update(spec_changes)
    (dst / "run.json").write_text(json.dumps(doc))
    return dst


def test_unreachable_or_wrong_artifact_and_missing_private_are_reported_not_computed(g2run, tmp_path):
    missing = _copy_run(g2run["run"], tmp_path / "missing", checkpoint=str(tmp_path / "gone.pt"))
    r = payload_section(load_run(str(missing)))["randomness"]
    assert not r["computed"] and "unreachable" in r["reason"] and "gone.pt" in r["reason"]

    other = _artifact(tmp_path / "other.pt", 1)
    wrong = _copy_run(g2run["run"], tmp_path / "wrong", checkpoint=str(other))
    r = payload_section(load_run(str(wrong)))["randomness"]
    assert not r["computed"] and "not the run's model" in r["reason"] and "sha256 differs" in r["reason"]

    shutil.rmtree(missing / "private")
    r = payload_section(load_run(str(missing)))["randomness"]
    assert not r["computed"] and "private manifests" in r["reason"]

    html_path, json_path = write_audit(str(wrong), str(tmp_path / "report" / "report.html"), examples=False)
    doc = json.loads(json_path.read_text())
    jsonschema.validate(doc, json.loads((ROOT / "schemas" / "audit.schema.json").read_text()))
    assert "Not computed: the checkpoint at" in html_path.read_text()


def test_blur_run_states_that_the_check_does_not_apply(tmp_path):
    run_job(parse_spec(job_tree(tmp_path / "blur", DEMO_SHARDS[0], metrics={"enabled": False}, runtime=QUIET)),
            echo=lambda *_: None)
    pay = payload_section(load_run(str(tmp_path / "blur")))
    assert not pay["present"] and not pay["randomness"]["computed"] and "'blur'" in pay["randomness"]["reason"]


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_g2face_report_renders_in_headless_chromium(g2run, tmp_path):
    from test_audit import SECTIONS, render_in_chromium

    html_path, _ = write_audit(str(g2run["run"]), str(tmp_path / "report.html"), pairs=str(g2run["pairs"]))
    got = render_in_chromium(html_path, tmp_path / "profile")
    assert got["problems"] == [], got["problems"]
    sections = {s["id"]: s for s in got["state"]["sections"]}
    assert all(sections[name]["visible"] and sections[name]["heading"] for name in SECTIONS), sections
    assert all(i["ok"] for i in got["state"]["images"]), got["state"]["images"]


def test_the_tests_pass_fair_coins_and_catch_bias_and_identity_leaks():
    from pipeline.privacy_metrics import bit_balance, identity_agreement, pairwise_agreement

    rng = np.random.default_rng(7)
    fair = rng.integers(0, 2, (500, 4096), dtype=np.uint8)
    bal, agr = bit_balance(fair), pairwise_agreement(fair)
    assert bal["chi_square"]["p_value"] > 1e-3 and bal["worst_position"]["bonferroni_p_value"] > 1e-3
    assert abs(agr["mean"] - 0.5) < 0.002 and agr["pairs"] == 500 * 499 // 2
    biased = fair.copy()
    biased[:, 17] = rng.random(500) < 0.62  # one leaky position
    assert bit_balance(biased)["worst_position"]["position"] == 17
    assert bit_balance(biased)["worst_position"]["bonferroni_p_value"] < 1e-3
    leaky = fair.copy()
    leaky[1::2, :256] = leaky[0::2, :256]  # faces 2i and 2i+1 (one person) share 256 bits
    pairs = [(2 * i, 2 * i + 1, True) for i in range(50)] + [(2 * i, 2 * i + 3, False) for i in range(50)]
    assert identity_agreement(leaky, pairs)["p_value"] < 1e-3 < identity_agreement(fair, pairs)["p_value"]
