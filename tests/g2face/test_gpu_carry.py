"""scripts/make_gpu_carry.py: what a GPU lease carries, and the people it holds out of training."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import DEMO_SHARDS
from helpers import prepare_small

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from make_gpu_carry import held_out_people, person_of  # noqa: E402


def test_person_of_reads_lfw_names_and_keeps_other_keys_whole():
    assert person_of("lfw_Aaron_Eckhart_0012") == "Aaron_Eckhart"
    assert person_of("lfw_AJ_Cook_0001") == "AJ_Cook"
    assert person_of("celeba_002993") == "celeba_002993"  # a CelebA number names an image, not a person
    assert person_of("nasa_Mark_Kelly") == "nasa_Mark_Kelly"


def test_held_out_people_take_whole_people_and_do_not_depend_on_order():
    keys = [f"lfw_P{i}_{j:04d}" for i in range(40) for j in range(1 + i % 3)]
    chosen = held_out_people(keys, 10)
    assert chosen == held_out_people(list(reversed(keys)), 10)
    faces = [k for k in keys if person_of(k) in chosen]
    assert 10 <= len(faces) < 10 + 3  # whole people (at most 3 faces each), and it stops once there are enough
    assert held_out_people(keys, 0) == set()


def _keys(directory: Path) -> list[str]:
    out = []
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [m.name.rsplit(".", 1)[0] for m in tar if m.name.endswith(".jpg")]
    return out


def test_carry_keeps_held_out_people_out_of_the_training_shards(tmp_path):
    prepared = prepare_small(DEMO_SHARDS[0], tmp_path / "prepared")
    out = tmp_path / "carry"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_gpu_carry.py"), "--data", str(prepared),
                    "--out", str(out), "--max-mib", "5", "--held-out-faces", "2", "--seed", "3"], check=True,
                   capture_output=True, cwd=ROOT)
    held, train = _keys(out / "held_out"), _keys(out / "shards")
    assert len(held) >= 2 and train
    assert not {person_of(k) for k in held} & {person_of(k) for k in train}
    total = 0
    for shard in prepared.glob("*.tar"):
        with tarfile.open(shard) as tar:
            total += sum(1 for m in tar if m.name.endswith(".png"))
    assert len(held) + len(train) == total  # the budget fits all: every face is in exactly one place
    assert (out / "dlib_resnet_fp16.pt").is_file()
    from g2face.mtcnn import FaceDetectability, load_face_detectability
    assert isinstance(load_face_detectability(out / "mtcnn"), FaceDetectability)  # hash-checked copies
