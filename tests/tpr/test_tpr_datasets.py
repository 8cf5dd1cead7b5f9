"""Annotation readers, split handling, path safety and the torch datasets, on tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from petl_tpr.errors import PetlError
from petl_tpr.tpr.data.datasets import build_dataset, dataset_names
from petl_tpr.tpr.errors import DatasetError
from petl_tpr.tpr.data.masking import MaskingConfig
from petl_tpr.tpr.data.tokenizer import ClipTokenizer
from petl_tpr.tpr.data.torch_data import CaptionDataset, ImageDataset, ImageTextDataset, load_image
from petl_tpr.tpr.data.transforms import TransformConfig, build_test_transform


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def write_dataset(root: Path, folder: str, filename: str, path_key: str, records: list[dict], images=True) -> Path:
    base = root / folder
    (base / "imgs").mkdir(parents=True, exist_ok=True)
    entries = []
    for record in records:
        entry = {"split": record["split"], "captions": record["captions"], "id": record["id"], path_key: record["path"]}
        if path_key == "file_path":
            entry["processed_tokens"] = [c.lower().split() for c in record["captions"]]
        entries.append(entry)
        if images and not Path(record["path"]).is_absolute() and ".." not in record["path"]:
            target = base / "imgs" / record["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 16), (10 * record["id"] % 255, 40, 90)).save(target)
    (base / filename).write_text(json.dumps(entries))
    return root


def records(splits: dict[str, list[int]]) -> list[dict]:
    out = []
    for split, ids in splits.items():
        for n, pid in enumerate(ids):
            out.append({"split": split, "id": pid, "path": f"{split}/{pid}_{n}.jpg",
                        "captions": [f"person {pid} view {n}", f"another caption of {pid}"]})
    return out


def test_cuhk_layout_splits_and_remapping(tmp_path):
    root = write_dataset(tmp_path, "CUHK-PEDES", "reid_raw.json", "file_path",
                         records({"train": [5, 5, 9, 2, 9], "val": [40, 41], "test": [100, 7, 100]}))
    data = build_dataset("CUHK-PEDES", root)
    assert data.name == "cuhk-pedes" and data.num_train_ids == 3 and data.num_train_images == 5
    assert len(data.train) == 10  # one sample per caption
    assert [s.pid for s in data.train[::2]] == [1, 1, 2, 0, 2]  # ids 2, 5, 9 -> 0, 1, 2
    assert [s.image_id for s in data.train] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert data.train[0].path == root / "CUHK-PEDES" / "imgs" / "train" / "5_0.jpg"
    assert data.train[1].caption == "another caption of 5"
    assert data.val_source == "dataset" and data.val.image_pids == (0, 1)
    test = data.test
    assert test.image_pids == (1, 0, 1) and test.num_ids == 2
    assert test.caption_pids == (1, 1, 0, 0, 1, 1) and test.caption_image_index == (0, 0, 1, 1, 2, 2)
    assert len(data.image_paths()) == 10
    # The dataset folder itself is accepted as root.
    assert build_dataset("cuhk", root / "CUHK-PEDES").train == data.train


def test_icfg_names_and_carved_validation(tmp_path):
    splits = {"train": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2], "test": [20, 21]}
    root = write_dataset(tmp_path, "ICFG-PEDES", "ICFG_PEDES.json", "file_path", records(splits))
    plain = build_dataset("icfg-pedes", root)
    assert plain.val is None and plain.val_source == "none" and plain.num_train_ids == 10
    carved = build_dataset("icfg_pedes", root, val_fraction=0.25, val_seed=3)
    again = build_dataset("icfg-pedes", root, val_fraction=0.25, val_seed=3)
    assert carved == again and carved.val_source == "carved"
    assert carved.val.num_ids == 3 and carved.num_train_ids == 7  # ceil(0.25 * 10) identities held out
    held_paths = set(carved.val.image_paths)
    assert not held_paths & {s.path for s in carved.train}
    assert len(held_paths) + carved.num_train_images == 12
    held_by_seed = {frozenset(build_dataset("icfg-pedes", root, val_fraction=0.25, val_seed=s).val.image_paths)
                    for s in range(5)}
    assert len(held_by_seed) > 1  # the seed chooses which identities are held out
    with pytest.raises(DatasetError, match="val_fraction"):
        build_dataset("icfg-pedes", root, val_fraction=1.0)


def test_rstpreid_uses_img_path(tmp_path):
    root = write_dataset(tmp_path, "RSTPReid", "data_captions.json", "img_path",
                         records({"train": [3, 3], "val": [4], "test": [5, 6]}))
    data = build_dataset("RSTPReid", root)
    assert data.train[0].path.name == "3_0.jpg" and data.val.image_pids == (0,)
    assert set(dataset_names()) == {"cuhk-pedes", "icfg-pedes", "rstpreid"}


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.jpg", "a/../../b.jpg", "C:\\x.jpg", "..\\x.jpg", ""])
def test_escaping_paths_are_refused(tmp_path, bad):
    recs = records({"train": [1], "test": [2]})
    recs[1]["path"] = bad
    root = write_dataset(tmp_path, "CUHK-PEDES", "reid_raw.json", "file_path", recs, images=False)
    with pytest.raises(DatasetError, match="record 1"):
        build_dataset("cuhk-pedes", root)


def test_malformed_annotations(tmp_path):
    with pytest.raises(DatasetError, match="no annotation file"):
        build_dataset("cuhk-pedes", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset("market", tmp_path)
    base = tmp_path / "CUHK-PEDES"
    base.mkdir()
    cases = [("{not json", "cannot read"), ('{"a": 1}', "JSON list"),
             ('[{"split": "train", "captions": ["x"], "id": 1}]', "missing key"),
             ('[{"split": "dev", "captions": ["x"], "id": 1, "file_path": "a.jpg"}]', "split"),
             ('[{"split": "train", "captions": "x", "id": 1, "file_path": "a.jpg"}]', "captions"),
             ('[{"split": "train", "captions": ["x"], "id": "1", "file_path": "a.jpg"}]', "id must"),
             ('[{"split": "train", "captions": ["x"], "id": 1, "file_path": "a.jpg"}]', "'test'")]
    for text, message in cases:
        (base / "reid_raw.json").write_text(text)
        with pytest.raises(PetlError, match=message):
            build_dataset("cuhk-pedes", tmp_path)


def test_blank_captions_are_dropped(tmp_path):
    recs = records({"train": [1, 2], "test": [3]})
    recs[0]["captions"] = ["  ", "fine caption"]
    data = build_dataset("cuhk-pedes", write_dataset(tmp_path, "CUHK-PEDES", "reid_raw.json", "file_path", recs))
    assert data.dropped_captions == 1 and len(data.train) == 3


def test_torch_datasets_and_loader(tmp_path, tokenizer):
    root = write_dataset(tmp_path, "CUHK-PEDES", "reid_raw.json", "file_path",
                         records({"train": [1, 2, 2], "test": [3, 4]}))
    data = build_dataset("cuhk-pedes", root)
    transform = build_test_transform(TransformConfig(height=32, width=16))
    train = ImageTextDataset(data.train, transform=transform, tokenizer=tokenizer, masking=MaskingConfig(), seed=1)
    batch = next(iter(DataLoader(train, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 16) and batch["caption_ids"].shape == (4, 77)
    assert batch["pid"].tolist() == [0, 0, 1, 1] and batch["image_id"].tolist() == [0, 0, 1, 1]
    assert batch["mlm_ids"].shape == batch["mlm_labels"].shape == (4, 77)
    assert torch.equal(train[2]["mlm_ids"], train[2]["mlm_ids"])
    train.set_epoch(1)
    assert not all(torch.equal(train[i]["mlm_labels"], batch["mlm_labels"][i]) for i in range(4))
    gallery = ImageDataset.from_split(data.test, transform=transform)
    queries = CaptionDataset.from_split(data.test, tokenizer=tokenizer)
    assert len(gallery) == 2 and len(queries) == 4
    assert gallery[1]["pid"] == 1 and queries[0]["caption_ids"][0] == 49406


def test_missing_and_corrupt_images_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_image(broken)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DatasetError, match="truncated.png"):
        load_image(truncated)
    assert load_image(_png(tmp_path)).mode == "RGB"


def _png(tmp_path: Path) -> Path:
    path = tmp_path / "grey.png"
    Image.new("L", (4, 4), 128).save(path)
    return path
