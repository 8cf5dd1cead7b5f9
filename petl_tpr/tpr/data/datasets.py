"""Annotation readers for CUHK-PEDES, ICFG-PEDES and RSTPReid, and `build_dataset`.

Layouts (`root` is the folder holding the dataset folder; the dataset folder itself works too):

| name         | annotation file                                         | image folder      | path key    |
|--------------|---------------------------------------------------------|-------------------|-------------|
| `cuhk-pedes` | `CUHK-PEDES/reid_raw.json`                              | `CUHK-PEDES/imgs` | `file_path` |
| `icfg-pedes` | `ICFG-PEDES/ICFG-PEDES.json` (or `ICFG_PEDES.json`)     | `ICFG-PEDES/imgs` | `file_path` |
| `rstpreid`   | `RSTPReid/data_captions.json`                           | `RSTPReid/imgs`   | `img_path`  |

Each file is a JSON list of records `{split, captions: [str], <path key>, id}` (one per image).
Image paths must be relative to the image folder and stay inside it: an absolute path or a `..`
component is refused (`DatasetError` naming the record). Symlinks are not resolved, so a linked
image folder works. Blank captions are dropped and counted in `dropped_captions`.

Splits: pids are remapped to 0..N-1 per split in ascending order of the original ids; training
image ids to 0..M-1 in annotation order. Every caption of a training image is one sample
`(pid, image_id, path, caption)`. Evaluation splits keep captions (queries) and images (gallery)
apart, each with its pids. The validation split is the dataset's own `val` split when it has one
(CUHK-PEDES, RSTPReid); otherwise (ICFG-PEDES) `val_fraction > 0` holds out that fraction of the
training identities (rounded up, at least one, all their images), chosen by a permutation from
`torch.Generator().manual_seed(val_seed)` over the sorted original ids; with the default
`val_fraction=0.0` there is no validation split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
import torch

from ..errors import DatasetError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TrainSample:
    pid: int
    image_id: int
    path: Path
    caption: str


@dataclass(frozen=True)
class EvalSplit:
    """Queries and gallery of one evaluation split; `caption_image_index[i]` is the index (into
    `image_paths`) of the image caption i describes."""

    captions: tuple[str, ...]
    caption_pids: tuple[int, ...]
    caption_image_index: tuple[int, ...]
    image_paths: tuple[Path, ...]
    image_pids: tuple[int, ...]

    @property
    def num_ids(self) -> int:
        return len(set(self.image_pids))


@dataclass(frozen=True)
class PersonRetrievalData:
    name: str
    root: Path
    train: tuple[TrainSample, ...]
    num_train_ids: int
    num_train_images: int
    test: EvalSplit
    val: EvalSplit | None
    val_source: str  # "dataset", "carved" or "none"
    dropped_captions: int = 0

    def image_paths(self) -> list[Path]:
        """Every image path of every split (for an existence check before a long run)."""
        paths = {s.path for s in self.train} | set(self.test.image_paths)
        paths |= set(self.val.image_paths) if self.val is not None else set()
        return sorted(paths)


@dataclass(frozen=True)
class _Record:
    split: str
    raw_id: int
    path: Path
    captions: tuple[str, ...]


@dataclass(frozen=True)
class _Layout:
    folder: str
    annotation_files: tuple[str, ...]
    path_key: str


LAYOUTS: dict[str, _Layout] = {
    "cuhk-pedes": _Layout("CUHK-PEDES", ("reid_raw.json",), "file_path"),
    "icfg-pedes": _Layout("ICFG-PEDES", ("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path"),
    "rstpreid": _Layout("RSTPReid", ("data_captions.json",), "img_path"),
}
ALIASES = {"cuhk": "cuhk-pedes", "icfg": "icfg-pedes", "rstp": "rstpreid", "rstp-reid": "rstpreid"}


def safe_image_path(image_dir: Path, relative: object, *, where: str) -> Path:
    """`image_dir / relative`, refusing anything that could leave `image_dir` lexically."""
    if not isinstance(relative, str) or not relative.strip():
        raise DatasetError(f"{where}: image path must be a non-empty string, got {relative!r}")
    posix = PurePosixPath(relative.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(relative).drive or PureWindowsPath(relative).is_absolute():
        raise DatasetError(f"{where}: image path {relative!r} is absolute; it must be relative to {image_dir}")
    if ".." in posix.parts:
        raise DatasetError(f"{where}: image path {relative!r} contains '..' and could leave {image_dir}")
    return image_dir.joinpath(*posix.parts)


def _find_annotation(root: Path, layout: _Layout) -> tuple[Path, Path]:
    """(annotation file, dataset folder) under `root` or `root/<folder>`."""
    for folder in (root / layout.folder, root):
        for filename in layout.annotation_files:
            if (folder / filename).is_file():
                return folder / filename, folder
    tried = ", ".join(str(root / layout.folder / f) for f in layout.annotation_files)
    raise DatasetError(f"no annotation file found; looked for {tried} (and the same directly under {root})")


def _read_records(annotation: Path, image_dir: Path, path_key: str) -> list[_Record]:
    try:
        entries = json.loads(annotation.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read annotation file {annotation}: {error}") from error
    if not isinstance(entries, list):
        raise DatasetError(f"{annotation}: expected a JSON list of records, got {type(entries).__name__}")
    records = []
    for index, entry in enumerate(entries):
        where = f"{annotation.name} record {index}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [key for key in ("split", "captions", path_key, "id") if key not in entry]
        if missing:
            raise DatasetError(f"{where}: missing key(s) {missing}; present: {sorted(entry)}")
        if entry["split"] not in SPLITS:
            raise DatasetError(f"{where}: split {entry['split']!r} is not one of {SPLITS}")
        raw_id = entry["id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, int):
            raise DatasetError(f"{where}: id must be an integer, got {raw_id!r}")
        captions = entry["captions"]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise DatasetError(f"{where}: captions must be a list of strings")
        path = safe_image_path(image_dir, entry[path_key], where=where)
        records.append(_Record(entry["split"], raw_id, path, tuple(captions)))
    return records


def _remap(raw_ids: list[int]) -> dict[int, int]:
    return {raw: new for new, raw in enumerate(sorted(set(raw_ids)))}


def _eval_split(records: list[_Record]) -> EvalSplit:
    pid_of = _remap([r.raw_id for r in records])
    captions, caption_pids, caption_image = [], [], []
    for image_index, record in enumerate(records):
        for caption in record.captions:
            captions.append(caption)
            caption_pids.append(pid_of[record.raw_id])
            caption_image.append(image_index)
    return EvalSplit(tuple(captions), tuple(caption_pids), tuple(caption_image),
                     tuple(r.path for r in records), tuple(pid_of[r.raw_id] for r in records))


def _carve(train: list[_Record], fraction: float, seed: int) -> tuple[list[_Record], list[_Record]]:
    ids = sorted({r.raw_id for r in train})
    if len(ids) < 2:
        raise DatasetError(f"cannot carve a validation split from {len(ids)} training identity")
    count = min(len(ids) - 1, max(1, math.ceil(fraction * len(ids))))
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {ids[i] for i in order[:count]}
    return [r for r in train if r.raw_id not in held], [r for r in train if r.raw_id in held]


def _assemble(name: str, folder: Path, records: list[_Record], val_fraction: float,
              val_seed: int) -> PersonRetrievalData:
    dropped = sum(1 for r in records for c in r.captions if not c.strip())
    records = [_Record(r.split, r.raw_id, r.path, tuple(c for c in r.captions if c.strip())) for r in records]
    by_split = {split: [r for r in records if r.split == split] for split in SPLITS}
    for split in ("train", "test"):
        if not by_split[split]:
            raise DatasetError(f"{name}: the annotation file has no '{split}' records")
    train, val_source = by_split["train"], "dataset" if by_split["val"] else "none"
    val_records = by_split["val"]
    if not val_records and val_fraction > 0:
        train, val_records = _carve(train, val_fraction, val_seed)
        val_source = "carved"
    pid_of = _remap([r.raw_id for r in train])
    samples = tuple(TrainSample(pid_of[r.raw_id], image_id, r.path, caption)
                    for image_id, r in enumerate(train) for caption in r.captions)
    return PersonRetrievalData(name=name, root=folder, train=samples, num_train_ids=len(pid_of),
                               num_train_images=len(train), test=_eval_split(by_split["test"]),
                               val=_eval_split(val_records) if val_records else None, val_source=val_source,
                               dropped_captions=dropped)


def canonical_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in LAYOUTS:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(LAYOUTS)} (aliases {sorted(ALIASES)})")
    return key


def build_dataset(name: str, root: str | Path, *, val_fraction: float = 0.0, val_seed: int = 0) -> PersonRetrievalData:
    """Read a dataset's annotations (images are opened later, by the torch datasets)."""
    key = canonical_name(name)
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    layout = LAYOUTS[key]
    annotation, folder = _find_annotation(Path(root), layout)
    records = _read_records(annotation, folder / "imgs", layout.path_key)
    return _assemble(key, folder, records, val_fraction, val_seed)



def dataset_names() -> tuple[str, ...]:
    """Names `build_dataset` accepts (aliases aside). A new layout is one `LAYOUTS` entry."""
    return tuple(sorted(LAYOUTS))
