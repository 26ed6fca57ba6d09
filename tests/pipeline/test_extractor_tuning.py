"""Extractor fine-tuning on the publishing channel (pipeline.extractor_tuning), on the committed hiding fixture
and the demo portraits aligned by the pipeline's MTCNN stages."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hiding_model import FIXTURE, aligned_demo_faces

from pipeline import align
from pipeline.extractor_tuning import (ChannelConfig, extract_logits, hide, payload_figures, publish_and_read,
                                       random_channel, similarity, tune_extractor)


@pytest.fixture(scope="module")
def crops():
    return aligned_demo_faces(128)[3]


@pytest.fixture(scope="module")
def fixture_model_and_priors(crops):
    from g2face.checkpoint import load_artifact
    from pipeline.g2face_method import G2FaceAnonymizer

    an = G2FaceAnonymizer(str(FIXTURE), 128)
    an.setup(torch.device("cpu"))
    identity, geometry = an.priors(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255)
    return load_artifact(FIXTURE), identity.numpy(), geometry.numpy()


@pytest.mark.parametrize("scale", [0.5, 1.2])
def test_channel_reads_the_generated_face_inside_the_mask_and_the_photo_outside(crops, scale):
    original = crops[0]
    generated = np.ascontiguousarray(255 - original)  # as different from the photo as a crop can be
    side = 1.6 * 128 / scale  # the photo make_photo builds for this scale
    m = similarity(scale, 7.0, (side / 2 + 0.3, side / 2 - 0.2), 128)
    read = publish_and_read(original, generated, m, None).astype(np.float32)
    mask = align.paste_mask(128)
    inside = mask > 0.99
    outside = mask == 0
    outside[:8], outside[-8:], outside[:, :8], outside[:, -8:] = False, False, False, False  # image border
    tol = 12 if scale > 1 else 6  # two bilinear resamplings; shrinking loses more
    assert np.abs(read - generated)[inside].mean() < tol
    assert np.abs(read - original)[outside].mean() < tol
    jpeg = publish_and_read(original, generated, m, 75).astype(np.float32)
    assert 0 < np.abs(jpeg - read).mean() < 10  # lossy, but the same picture


def test_channel_config_names_the_bad_field():
    with pytest.raises(ValueError, match="min_scale"):
        ChannelConfig(min_scale=2.0, max_scale=1.0)
    with pytest.raises(ValueError, match="jpeg_share"):
        ChannelConfig(jpeg_share=1.5)
    with pytest.raises(ValueError, match="jpeg_quality"):
        ChannelConfig(jpeg_quality=(90, 80))


def test_tuning_changes_only_the_extractor_and_reads_better(crops, fixture_model_and_priors):
    import copy

    model, identity, geometry = fixture_model_and_priors
    model = copy.deepcopy(model)  # tuned in place: the module's copy stays as loaded
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    rng = np.random.default_rng(3)
    originals = np.concatenate([crops] * 4)  # four payloads per portrait
    identity, geometry = np.concatenate([identity] * 4), np.concatenate([geometry] * 4)
    bits = rng.integers(0, 2, (len(originals), model.config.payload_bits)).astype(np.float32)
    seeds = [int(s) for s in rng.integers(0, 2**62, len(originals))]
    generated = hide(model, originals, identity, geometry, bits, seeds)
    assert np.array_equal(generated, hide(model, originals, identity, geometry, bits, seeds))  # seeded, deterministic
    # lossless storage: the fixture's bits survive it (under JPEG they are mostly gone, BER ~0.27, and no
    # extractor can read what is not there), so tuning has errors it can remove (measured on fresh payloads: 0.0016 -> 0.0013)
    channel = ChannelConfig(min_scale=0.5, max_scale=0.8, jpeg_share=0.0)
    # probed with payloads and seeds it never trained on, through other channel draws
    probe_bits = rng.integers(0, 2, bits.shape).astype(np.float32)
    probe_seeds = [int(s) for s in rng.integers(0, 2**62, len(originals))]
    probe, quality = random_channel(originals, hide(model, originals, identity, geometry, probe_bits, probe_seeds),
                                    channel, np.random.default_rng(99))
    assert not quality.any()

    def ber() -> float:
        return float(((extract_logits(model, probe) > 0) != (probe_bits > 0.5)).mean())

    start = ber()
    history = tune_extractor(model, originals, generated, bits, epochs=10, config=channel, batch_size=8, lr=3e-4, seed=1)
    assert len(history) == 10 and all(np.isfinite(h["loss"]) for h in history)
    after = ber()
    assert after < start * 0.9, (start, after)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed and all(k.startswith("extractor.") for k in changed), sorted(changed)[:5]
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training  # state restored
    # the anonymised faces are untouched by tuning
    assert np.array_equal(generated, hide(model, originals, identity, geometry, bits, seeds))


def test_payload_figures_decode_real_payloads(crops, fixture_model_and_priors):
    model, identity, geometry = fixture_model_and_priors
    figures = payload_figures(model, crops[:6], identity[:6], geometry[:6], scales=(0.5, 0.7))
    assert figures["faces"] == 6
    for name in ("png", "jpeg_q90"):
        f = figures[name]
        assert 0 <= f["ber"] <= 1 and 0 <= f["decode_rate"] <= 1
    # lossless storage of large faces: the fixture's bits come back, so the real payloads open
    assert figures["png"]["ber"] < 0.05 and figures["png"]["decode_rate"] == 1.0
    assert figures["jpeg_q90"]["ber"] >= figures["png"]["ber"]
    # the same seed hides the same payloads through the same transforms: a paired, repeatable measurement
    assert payload_figures(model, crops[:6], identity[:6], geometry[:6], scales=(0.5, 0.7)) == figures


def test_script_writes_a_tuned_artifact_that_differs_only_in_the_extractor(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import DEMO_SHARDS
    from helpers import prepare_small

    from g2face.checkpoint import load_artifact

    root = Path(__file__).resolve().parents[2]
    prepared = prepare_small(DEMO_SHARDS[0], tmp_path / "prepared", resolution=128)
    out, report = tmp_path / "tuned.g2face", tmp_path / "report.json"
    subprocess.run([sys.executable, str(root / "scripts" / "finetune_extractor.py"), "--artifact", str(FIXTURE),
                    "--data", str(prepared / "*.tar"), "--faces", "6", "--held-out-faces", "2", "--eval-faces", "2",
                    "--epochs", "1", "--batch", "3", "--threads", "1", "--out", str(out), "--report", str(report)],
                   check=True, capture_output=True, cwd=root)
    old, new = load_artifact(FIXTURE), load_artifact(out)  # strict, hash-checked
    doc = json.loads(report.read_text())
    assert doc["tuned_sha256"] == new.artifact_sha256 != old.artifact_sha256
    assert new.artifact_metadata["extractor_tuning"]["from"] == old.artifact_sha256
    differ = {k for k, v in new.state_dict().items() if not torch.equal(v, old.state_dict()[k])}
    assert differ and all(k.startswith("extractor.") for k in differ)
    assert doc["held_out"]["faces"] == 2 and doc["training"]["faces"] >= 1
    assert set(doc["before"]) == set(doc["after"]) == {"faces", "png", "jpeg_q90"}
