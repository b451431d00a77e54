"""Where a FoMo-in-Flux dataset's images and labels come from: image sources and the authors' info files.

Images of a dataset live in ``<root>/<NAME>/`` (the unpacked download) or ``<root>/<NAME>.tar`` (the authors' tar
mode); labels and captions come from the per-split info JSON of the authors' ``data_lib/00_info`` folder and the
class lists next to it (layout facts: ``../shared/FIF_LAYOUT.md``; dataset table: ``fomo_ray.data.fif_catalogue``).
Roth, Udandarao et al., "A Practitioner's Guide to Continual Multimodal Pretraining", arXiv 2408.14471.
Nothing here writes; :mod:`fomo_ray.prep.convert_fif` plans and converts from these records.
"""
from __future__ import annotations

import difflib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from fomo_ray.data.fif_catalogue import FifDataset
from fomo_ray.prep.staging import ConversionError


# =================================================================================================== sources
class DirSource:
    """Images of one dataset under ``<root>/<NAME>/`` (the unpacked download)."""

    def __init__(self, base: Path):
        self.base = Path(base)

    def where(self, key: str) -> str:
        return str(self.base / key)

    def has_dir(self, prefix: str) -> bool:
        return (self.base / prefix).is_dir()

    def read(self, key: str) -> bytes | None:
        try:
            return (self.base / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None


class TarSource:
    """Images of one dataset inside ``<root>/<NAME>.tar`` (members ``<NAME>/<key>``, as the authors' tar mode)."""

    def __init__(self, tar_path: Path, top: str):
        self.tar_path, self.top = Path(tar_path), top
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] | None = None

    def _index(self) -> dict[str, tarfile.TarInfo]:
        if self._members is None:
            self._tar = tarfile.open(self.tar_path)
            prefix = self.top + "/"
            self._members = {m.name[len(prefix):]: m for m in self._tar.getmembers()
                             if m.isfile() and m.name.startswith(prefix)}
        return self._members

    def where(self, key: str) -> str:
        return f"{self.tar_path}:{self.top}/{key}"

    def has_dir(self, prefix: str) -> bool:
        p = prefix.rstrip("/") + "/"
        return any(k.startswith(p) for k in self._index())

    def read(self, key: str) -> bytes | None:
        member = self._index().get(key)
        if member is None:
            return None
        f = self._tar.extractfile(member)  # type: ignore[union-attr]
        return f.read() if f is not None else None


def locate(root: Path, name: str) -> tuple[str, Path] | None:
    """Where a dataset's images are: ``("dir", <root>/<NAME>)`` preferred, else ``("tar", <root>/<NAME>.tar)``."""
    if (root / name).is_dir():
        return "dir", root / name
    if (root / f"{name}.tar").is_file():
        return "tar", root / f"{name}.tar"
    return None


def open_source(kind: str, path: Path, name: str) -> DirSource | TarSource:
    return DirSource(path) if kind == "dir" else TarSource(path, name)


# =================================================================================================== info files
def training_captions(entry: Mapping) -> list[str]:
    """FiF's training text: ``default_caption`` if not null, else ``synthetic_merged_caption``; lists keep all."""
    for field_name in ("default_caption", "synthetic_merged_caption"):
        value = entry.get(field_name)
        if value is None:
            continue
        caps = [value] if isinstance(value, str) else [c for c in value if isinstance(c, str)]
        caps = [c.strip() for c in caps if c.strip()]
        if caps:
            return caps
    return []


@dataclass(frozen=True)
class Record:
    """One image of an info file: its key (path below ``<NAME>/``), class index (-1: none) and captions."""

    key: str
    label: int
    captions: tuple[str, ...]


def build_records(spec: FifDataset, info: Mapping, classnames: Sequence[str], info_path: Path
                  ) -> tuple[list[Record], dict[str, int]]:
    """Info-file entries -> records, validating every classname. Returns (records, counters).

    The label is the classname's index in the class list (the authors' ``target`` agrees with it in every shipped
    file; a disagreement is counted, the classname wins since streams address classes by name).
    """
    if not isinstance(info, Mapping) or not info:
        raise ConversionError(f"{spec.name}: info file {info_path} is empty or not a JSON object")
    index = {c: i for i, c in reversed(list(enumerate(classnames)))}  # first occurrence wins on duplicates
    records, fallback, mismatch = [], 0, 0
    for key, entry in info.items():
        if not isinstance(entry, Mapping) or "classname" not in entry:
            raise ConversionError(f"{spec.name}: info file {info_path}: entry '{key}' has no 'classname' field")
        cname = entry.get("classname")
        if spec.num_classes == 0:
            label = -1
        else:
            label = _label_of(spec, key, cname, entry.get("target"), classnames, index, info_path)
            mismatch += int(entry.get("target") != label)
        caps = training_captions(entry)
        if not caps:
            if label < 0:
                raise ConversionError(f"{spec.name}: info file {info_path}: retrieval image '{key}' has no caption")
            primer = entry.get("primer_caption")
            caps = [primer if isinstance(primer, str) and primer else spec.template.format(cname)]
            fallback += 1
        records.append(Record(key=str(key), label=label, captions=tuple(caps)))
    return records, {"primer_fallback": fallback, "target_mismatch": mismatch}


def _label_of(spec, key, cname, target, classnames, index, info_path) -> int:
    if not isinstance(cname, str) or cname not in index:
        close = difflib.get_close_matches(str(cname), list(classnames), n=2)
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        raise ConversionError(
            f"{spec.name}: info file {info_path}: key '{key}' has classname {cname!r}, which is not in the class "
            f"list ({len(classnames)} classes{hint})")
    if isinstance(target, int) and 0 <= target < len(classnames) and classnames[target] == cname:
        return target  # duplicate classnames: keep the authors' index
    return index[cname]


def find_info_dir(root: Path, info_dir: str | None) -> Path:
    """The authors' ``00_info`` folder: explicit, or ``<root>/00_info``, or ``<root>/data_lib/00_info``."""
    candidates = [Path(info_dir)] if info_dir else [root / "00_info", root / "data_lib" / "00_info"]
    for c in candidates:
        if c.is_dir():
            return c
    raise ConversionError(
        f"info folder not found (looked at {', '.join(map(str, candidates))}). The per-image info files ship with "
        "the authors' code repository (data_lib/00_info), not with the data: pass --info-dir <repo>/data_lib/00_info")


def load_classnames(info_dir: Path, spec: FifDataset) -> tuple[list[str], Path | None]:
    """The class list of a dataset (``[]`` for FLICKR30K/MSCOCO); IMAGENET_V2 uses IMAGENET's, sorted lower-case."""
    if spec.num_classes == 0:
        return [], None
    source = spec.classnames_from or spec.name
    path = info_dir / f"{source}_classnames.json"
    if not path.is_file():
        raise ConversionError(f"{spec.name}: class list not found: {path}")
    names = json.loads(path.read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConversionError(f"{spec.name}: class list {path} must be a JSON list of strings")
    if spec.classnames_from:
        names = sorted(names, key=str.lower)  # authors' imagenet_v2.py
    return names, path
