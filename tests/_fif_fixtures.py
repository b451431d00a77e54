"""Builders of tiny directories in the exact layout of the FoMo-in-Flux download (../shared/FIF_LAYOUT.md).

``make_fif_root(base)`` writes ``<base>/data/<NAME>/...`` image trees and ``<base>/00_info/`` info files for:

- DTD (adaptation, JPEG folder tree, base files only, non-square photos);
- CUB200 (adaptation, the PNG-folder dump of an array dataset, ``synthetic_merged_caption`` as a single string);
- MONKEYS10 (evaluation-only, with a ``MONKEYS10_test_224/`` tree whose images differ from the originals, so a test
  can tell which variant was read; it also has a train split that must not be converted);
- MSCOCO (evaluation-only retrieval, test only, 5 captions per image, classname null; its ``_224`` info file exists
  but its ``_224`` tree does not, so the originals must be used);
- optionally FSCOCO (adaptation retrieval with a class list and one ``default_caption`` string per image).

Every image is a solid colour, unique per image, so a round trip can check pixels, labels and captions.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DTD_CLASSES = ["banded", "braided", "bubbly"]
CUB_CLASSES = ["Black footed Albatross", "Laysan Albatross"]
MONKEY_CLASSES = ["mantled howler", "patas monkey"]
FSCOCO_CLASSES = ["giraffe", "zebra"]


@dataclass
class Expected:
    """What one converted row must hold: image key, class index, captions and the source file it came from."""

    key: str
    label: int
    captions: list[str]
    path: Path


@dataclass
class FifFixture:
    root: Path
    info_dir: Path
    expected: dict[tuple[str, str], list[Expected]] = field(default_factory=dict)  # (dataset, our split) -> rows


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, JPEG-stable solid colour per image index."""
    rng = np.random.default_rng(1000 + i)
    return tuple(int(v) for v in rng.integers(20, 236, size=3))


def image_bytes(rgb, size=(40, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def entry(classname, target, default=None, merged=None, primer=None) -> dict:
    """One info-file value with exactly the six keys of the authors' schema."""
    return {"classname": classname, "default_caption": default, "primer_caption": primer,
            "synthetic_caption": None if merged is None else ([merged] if isinstance(merged, str) else merged),
            "synthetic_merged_caption": merged, "target": target}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


class _Builder:
    def __init__(self, fx: FifFixture):
        self.fx, self.n = fx, 0

    def image(self, dataset: str, key: str, fmt: str, size=(40, 30)) -> Path:
        path = self.fx.root / dataset / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(colour(self.n), size, fmt))
        self.n += 1
        return path


def _dtd(b: _Builder, fx: FifFixture) -> None:
    write_json(fx.info_dir / "DTD_classnames.json", DTD_CLASSES)
    for split, per_class in (("train", 2), ("test", 1)):
        info, rows = {}, []
        for t, cls in enumerate(DTD_CLASSES):
            for i in range(per_class):
                key = f"dtd/dtd/images/{cls}/{cls}_{split}_{i:04d}.jpg"
                merged = [f"a {cls} texture, sample {i}"] + ([f"another {cls} caption"] if i == 0 else [])
                info[key] = entry(cls, t, merged=merged, primer=f"A photo of a {cls} texture.")
                rows.append(Expected(key, t, merged, b.image("DTD", key, "JPEG", size=(40, 30))))
        write_json(fx.info_dir / f"DTD_{split}.json", info)
        fx.expected[("DTD", split)] = rows


def _cub(b: _Builder, fx: FifFixture) -> None:
    write_json(fx.info_dir / "CUB200_classnames.json", CUB_CLASSES)
    for split, n in (("train", 4), ("test", 2)):
        info, rows = {}, []
        for i in range(n):
            t = i % 2
            key = f"cub-200-images-{split}/{i}.png"
            merged = f"a {CUB_CLASSES[t].lower()} over the sea"  # single string, as in the 3-caption files
            info[key] = entry(CUB_CLASSES[t], t, merged=merged)
            rows.append(Expected(key, t, [merged], b.image("CUB200", key, "PNG", size=(16, 16))))
        write_json(fx.info_dir / f"CUB200_{split}.json", info)
        fx.expected[("CUB200", split)] = rows


def _monkeys(b: _Builder, fx: FifFixture) -> None:
    write_json(fx.info_dir / "MONKEYS10_classnames.json", MONKEY_CLASSES)
    for split, folder, n in (("train", "training/training", 2), ("test", "validation/validation", 3)):
        base, resized, rows = {}, {}, []
        for i in range(n):
            t = i % 2
            key = f"monkeys10/{folder}/n{t}/n{t}{i:03d}.jpg"
            cap = [f"a {MONKEY_CLASSES[t]} on a branch"]
            base[key] = entry(MONKEY_CLASSES[t], t, merged=cap)
            resized[f"MONKEYS10_{split}_224/{key}"] = entry(MONKEY_CLASSES[t], t, merged=cap)
            b.image("MONKEYS10", key, "JPEG", size=(60, 50))  # originals: never read when _224 exists
            path = b.image("MONKEYS10", f"MONKEYS10_{split}_224/{key}", "JPEG", size=(36, 30))
            rows.append(Expected(f"MONKEYS10_{split}_224/{key}", t, cap, path))
        write_json(fx.info_dir / f"MONKEYS10_{split}.json", base)
        write_json(fx.info_dir / f"MONKEYS10_{split}_224.json", resized)
        fx.expected[("MONKEYS10", split)] = rows


def _mscoco(b: _Builder, fx: FifFixture) -> None:
    info, rows = {}, []
    for i in range(3):
        key = f"images_mscoco_2014_5k_test/COCO_val2014_{i + 42:012d}.jpg"
        caps = [f"caption {j} of picture {i}" for j in range(5)]
        info[key] = entry(None, i, default=caps)
        rows.append(Expected(key, -1, caps, b.image("MSCOCO", key, "JPEG", size=(30, 44))))
    write_json(fx.info_dir / "MSCOCO_test.json", info)
    write_json(fx.info_dir / "MSCOCO_test_224.json", {f"MSCOCO_test_224/{k}": v for k, v in info.items()})
    fx.expected[("MSCOCO", "test")] = rows


def _fscoco(b: _Builder, fx: FifFixture) -> None:
    write_json(fx.info_dir / "FSCOCO_classnames.json", FSCOCO_CLASSES)
    for split, n in (("train", 2), ("test", 2)):
        info, rows = {}, []
        for i in range(n):
            t = i % 2
            key = f"fscoco/raster_sketches/{t + 1}/{1000 + i}.jpg"
            cap = f"A sketch of a {FSCOCO_CLASSES[t]} standing in a field"
            info[key] = entry(FSCOCO_CLASSES[t], t, default=cap)
            rows.append(Expected(key, t, [cap], b.image("FSCOCO", key, "JPEG", size=(32, 32))))
        write_json(fx.info_dir / f"FSCOCO_{split}.json", info)
        fx.expected[("FSCOCO", split)] = rows


BUILDERS = {"DTD": _dtd, "CUB200": _cub, "MONKEYS10": _monkeys, "MSCOCO": _mscoco, "FSCOCO": _fscoco}


def make_fif_root(base: Path, datasets=("DTD", "CUB200", "MONKEYS10", "MSCOCO")) -> FifFixture:
    """Write the data root (``<base>/data``) and the info folder (``<base>/00_info``) for ``datasets``."""
    fx = FifFixture(root=base / "data", info_dir=base / "00_info")
    fx.root.mkdir(parents=True)
    b = _Builder(fx)
    for name in datasets:
        BUILDERS[name](b, fx)
    return fx


def tar_dataset(fx: FifFixture, name: str) -> Path:
    """Replace ``<root>/<NAME>/`` by ``<root>/<NAME>.tar`` (members ``<NAME>/<key>``, as download_dataset_tars.sh)."""
    import shutil

    tar_path = fx.root / f"{name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(fx.root / name, arcname=name)
    shutil.rmtree(fx.root / name)
    return tar_path


# --------------------------------------------------------------------------------------------------- web shards
def write_shard(path: Path, samples: list[dict]) -> None:
    """A webdataset tar: per sample ``<key>.<ext>`` members (ext -> bytes or str), img2dataset style."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, payload in s["files"].items():
                data = payload.encode() if isinstance(payload, str) else payload
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
