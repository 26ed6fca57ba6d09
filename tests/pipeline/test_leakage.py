"""Leakage of the reversible payload without the key: balanced bits, no identity signal, fresh ciphertext per
seed and job, and no key material, plaintext or embedding in anything a run or a recovery writes.

Payload bits are computed by the pipeline's own encoder (pipeline.verify.ShardPayload) from real dlib
embeddings of real faces; these are the bits the model hides (and, with a working hiding path, what an
extractor reads back).
"""
import base64
import csv
import itertools

import numpy as np
import pytest
import torch

from conftest import DEMO_SHARDS, job_tree
from helpers import read_tar
from hiding_model import aligned_demo_faces
from pipeline.keys import ShardKey, create_master_key, load_master_key
from pipeline.recover import RecoveryError, recover_shard
from pipeline.runner import run_job
from pipeline.spec import parse_spec
from pipeline.verify import PayloadJob, ShardPayload

pytestmark = pytest.mark.timeout(600)
SHA = "ab" * 32


def _embed(crops: np.ndarray) -> np.ndarray:
    from g2face.identity import aligned_to_chip, load_dlib_face_resnet
    from pipeline import align

    net = load_dlib_face_resnet()
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return net(aligned_to_chip(x, align.template(crops.shape[1]))).numpy()


def _thumbnails(crops: np.ndarray) -> list[bytes]:
    """The payload's (version 5: kind 2) thumbnails of the crops: the face's own, as a run hides them."""
    from pipeline.thumbnail import encode_thumbnails

    return encode_thumbnails(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255, 2)


@pytest.fixture(scope="module")
def demo():
    keys, _, _, crops = aligned_demo_faces()
    return keys, _thumbnails(crops), _embed(crops)


def _payload(seed=0, dataset="ds", shard="s-000.tar"):
    return ShardPayload(PayloadJob.of(dataset, seed, SHA, 4096), ShardKey(bytes(range(32)), dataset, shard))


def test_payload_bits_are_balanced(demo):
    keys, thumbs, emb = demo
    sp = _payload()
    assert sp.job.layout.format_version == 5
    bits = np.stack([sp.encode(e, f"{k}/{r}", 0, t) for (k, e, t), r in itertools.product(zip(keys, emb, thumbs), range(20))])
    n = len(bits)
    assert abs(bits.mean() - 0.5) < 0.01
    sigma = 0.5 / np.sqrt(n)
    assert np.abs(bits.mean(0) - 0.5).max() < 5.5 * sigma  # every bit position ~50% ones


def test_another_seed_or_job_gives_another_ciphertext(demo):
    keys, thumbs, emb = demo
    base = _payload().encode(emb[0], keys[0], 0, thumbs[0])
    assert np.array_equal(base, _payload().encode(emb[0], keys[0], 0, thumbs[0]))  # reruns are byte-identical
    for other in (_payload(seed=1), _payload(dataset="other"), _payload(shard="s-001.tar")):
        agree = np.mean(other.encode(emb[0], keys[0], 0, thumbs[0]) == base)
        assert 0.45 < agree < 0.55


@pytest.mark.shared_data
def test_same_person_payloads_are_no_more_alike_than_different_people(shared_data):
    from pipeline.imaging import decode_image
    from pipeline.shardio import RawSample
    from pipeline.spec import DetectionSpec
    from pipeline.stages import AlignStage, DetectStage, Sample

    val = shared_data / "val"
    with open(val / "celeba-200id-pairs.csv") as f:
        pairs = [(r["key_a"], r["key_b"], r["same"] == "1") for r in csv.DictReader(f)]
    wanted = [p for p in pairs if p[2]][:12] + [p for p in pairs if not p[2]][:12]
    need = {k for a, b, _ in wanted for k in (a, b)}
    images = {}
    for shard in sorted(val.glob("celeba-200id-*.tar")):
        for key, files in read_tar(shard).items():
            if key in need:
                images[key] = files["jpg"]
    spec = DetectionSpec()
    detect = DetectStage(spec.min_face_size, spec.stage_thresholds, spec.scale_factor, spec.low_score_threshold,
                         spec.max_side, False, 128, "cpu")
    detect.setup()
    samples = [Sample(RawSample(i, k, {"jpg": d}, "jpg")) for i, (k, d) in enumerate(sorted(images.items()))]
    for s in samples:
        s.image = decode_image(s.raw.fields["jpg"], 10**8)
    detect.process(samples)
    samples = [s for s in samples if s.faces]
    for s in samples:
        s.faces = [max(s.faces, key=lambda f: f.box[2] - f.box[0])]
    AlignStage(128, "blur", "pixelate", 0, 0.0, 0, "pass").process(samples)
    crops = np.stack([s.faces[0].crop for s in samples])
    emb = dict(zip([s.raw.key for s in samples], _embed(crops)))
    thumb = dict(zip([s.raw.key for s in samples], _thumbnails(crops)))
    sp = _payload()
    agree = {True: [], False: []}
    dist = {True: [], False: []}
    for a, b, same in wanted:
        if a in emb and b in emb:
            # each photo is its own sample: same slot (face 0) under its own key, as in a real shard
            agree[same].append(np.mean(sp.encode(emb[a], a, 0, thumb[a]) == sp.encode(emb[b], b, 0, thumb[b])))
            dist[same].append(np.linalg.norm(emb[a] - emb[b]))
    assert len(agree[True]) >= 8 and len(agree[False]) >= 8
    assert np.mean(dist[True]) < np.mean(dist[False])  # the embeddings do tell people apart ...
    assert abs(np.mean(agree[True]) - 0.5) < 0.02 and abs(np.mean(agree[False]) - 0.5) < 0.02  # ... the payloads not
    assert np.mean(agree[True]) - np.mean(agree[False]) < 0.02


def test_no_key_material_plaintext_or_embedding_in_outputs(tmp_path, demo):
    """A reversible run (untrained model: payloads encoded, none verifies) plus a recovery attempt; every file
    they write is scanned for the master and shard keys and for the faces' embeddings and plaintexts."""
    from g2face.checkpoint import save_artifact
    from g2face.config import preset
    from g2face.model import G2Face

    torch.manual_seed(0)
    artifact = tmp_path / "lite-random.pt"
    save_artifact(G2Face(preset("lite-128")), artifact)
    key_path = tmp_path / "keys" / "master.key"
    create_master_key(key_path)
    out = tmp_path / "out"
    tree = job_tree(out, DEMO_SHARDS[0], anonymizer={"method": "g2face", "checkpoint": str(artifact)},
                    keys={"master": str(key_path)}, output={"keys": "pseudonymize"}, metrics={"enabled": False})
    run_job(parse_spec(tree), echo=lambda *_: None)
    with pytest.raises(RecoveryError):
        recover_shard(str(out / "shards" / DEMO_SHARDS[0].name), str(key_path), str(tmp_path / "rec"), user="t", reason="scan")

    master, _ = load_master_key(key_path)
    shard_key = ShardKey.from_master(master, "test", DEMO_SHARDS[0].name)._material
    needles = []
    for k in (master, shard_key):
        needles += [k, k.hex().encode(), base64.b64encode(k)]
    _, _, emb = demo
    for e in emb:
        half = e.astype("<f2").tobytes()
        needles += [half[:16], half[:16].hex().encode(), e.astype("<f4").tobytes()[:16]]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in files) and any(p.name == "recovery-log.jsonl" for p in files)
    for p in files:
        data = p.read_bytes()
        for n in needles:
            assert n not in data, f"{p} contains secret material"
