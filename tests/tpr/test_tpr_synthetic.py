"""The synthetic dataset: determinism, CUHK-PEDES round trip, captions true to the drawing, domains."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
from PIL import Image

from petl_tpr.tpr.data.datasets import build_dataset
from petl_tpr.tpr.errors import DatasetError, TaskInputError
from petl_tpr.tpr.data.synthetic import DOMAIN_STYLES, SyntheticConfig, synthetic_records, write_synthetic
from petl_tpr.tpr.data.synthetic_draw import draw_person
from petl_tpr.tpr.data.synthetic_text import LEXICON
from petl_tpr.tpr.data.torch_data import load_image

SMALL = dict(identities=12, images_per_id=2, captions_per_image=3, test_fraction=0.25)


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = files(write_synthetic(tmp_path / "a", domain=0, seed=7, **SMALL))
    b = files(write_synthetic(tmp_path / "b", domain=0, seed=7, **SMALL))
    c = files(write_synthetic(tmp_path / "c", domain=0, seed=8, **SMALL))
    assert a == b and len(a) == 12 * 2 + 2
    assert a != c


def test_reader_reads_it_back(tmp_path):
    root = write_synthetic(tmp_path, domain=1, seed=0, val_fraction=0.25, **SMALL)
    data = build_dataset("cuhk-pedes", root)
    assert data.test.num_ids == 3 and data.val.num_ids == 3 and data.num_train_ids == 6
    assert len(data.train) == 6 * 2 * 3 and data.num_train_images == 12
    assert len(data.test.captions) == 3 * 2 * 3 and len(data.test.image_paths) == 6
    image = load_image(data.train[0].path)
    assert image.size == DOMAIN_STYLES[1].size
    with pytest.raises(DatasetError, match="already exists"):
        write_synthetic(tmp_path, domain=1, seed=0, **SMALL)
    write_synthetic(tmp_path, domain=1, seed=0, overwrite=True, **SMALL)


@pytest.mark.parametrize("domain", [0, 1, 2])
def test_captions_describe_the_drawn_attributes(domain):
    words = LEXICON[domain]
    records = synthetic_records(SyntheticConfig(domain=domain, identities=80, images_per_id=2, captions_per_image=3))
    for record in records:
        a = record.attributes
        assert len(set(record.captions)) == 3
        for caption in record.captions:
            text = caption.lower()
            for colour_key, type_key in (("upper_color", "upper_type"), ("lower_color", "lower_type")):
                pairs = [f"{c} {g}" for c in words["color"][a[colour_key]] for g in words[type_key][a[type_key]]]
                assert any(has_phrase(text, p) for p in pairs), (caption, a)
                others = [g for value, gs in words[type_key].items() if value != a[type_key] for g in gs]
                assert not any(has_phrase(text, g) for g in others), (caption, a)
            assert any(has_phrase(text, h) for h in words["hair"][a["hair"]]), (caption, a)
            for key in ("headwear", "bag"):
                mentioned = {value for value, ws in words[key].items() if any(has_phrase(text, w) for w in ws)}
                assert mentioned == ({a[key]} if a[key] != "none" else set()), (caption, a)


@pytest.mark.parametrize("domain", [0, 1, 2])
def test_drawing_uses_the_attribute_colours(domain):
    config = SyntheticConfig(domain=domain, identities=150, images_per_id=1)
    flat = dataclasses.replace(DOMAIN_STYLES[domain], brightness=(1.0, 1.0), pixel_noise=0, tint_strength=0.0)
    for record in synthetic_records(config):
        image = draw_person(record.attributes, record.body, record.view, flat, random.Random(0))
        counts = {colour: n for n, colour in image.getcolors(maxcolors=1 << 16)}
        upper = flat.palette[record.attributes["upper_color"]]
        lower = flat.palette[record.attributes["lower_color"]]
        assert counts.get(upper, 0) > 300, record.attributes
        assert counts.get(lower, 0) > 40, record.attributes


def test_domains_differ_in_words_and_looks(tmp_path):
    config = dict(identities=40, images_per_id=1, captions_per_image=2)
    vocab = []
    for domain in (0, 1):
        records = synthetic_records(SyntheticConfig(domain=domain, **config))
        vocab.append({w for r in records for c in r.captions for w in re.findall(r"[a-z-]+", c.lower())})
    shared = vocab[0] & vocab[1]
    assert len(shared) / len(vocab[0] | vocab[1]) < 0.15, shared
    r0 = write_synthetic(tmp_path / "d0", domain=0, **SMALL) / "CUHK-PEDES" / "imgs" / "d0"
    r1 = write_synthetic(tmp_path / "d1", domain=1, **SMALL) / "CUHK-PEDES" / "imgs" / "d1"
    mean = [sum(sum(Image.open(p).convert("L").getdata()) / (Image.open(p).width * Image.open(p).height)
                for p in sorted(r.glob("*.png"))) / 24 for r in (r0, r1)]
    assert Image.open(next(r0.glob("*.png"))).size != Image.open(next(r1.glob("*.png"))).size
    assert mean[0] - mean[1] > 30  # domain 1 is darker (outdoor, dusk lighting)


def test_unseen_domain_uses_known_words_in_its_own_sentences_and_looks(tmp_path):
    """Domain 2 (the demo's unseen domain): every content word is one of domain 0's or 1's, the
    sentence shapes are its own, and its images differ in size and darkness from both."""
    config = dict(identities=40, images_per_id=1, captions_per_image=2)
    captions = [[c for r in synthetic_records(SyntheticConfig(domain=d, **config)) for c in r.captions]
                for d in (0, 1, 2)]
    known = {w for d in (0, 1) for table in LEXICON[d].values() for words in table.values() for w in words}
    for key, table in LEXICON[2].items():
        for value, words in table.items():
            assert set(words) == set(LEXICON[0][key][value]) | set(LEXICON[1][key][value]) and set(words) <= known
    assert all(c.startswith(("Camera view:", "Seen on camera:")) or "; " in c for c in captions[2])
    assert not any(c.startswith(("Camera view:", "Seen on camera:")) for d in (0, 1) for c in captions[d])
    roots = [write_synthetic(tmp_path / f"d{d}", domain=d, **SMALL) / "CUHK-PEDES" / "imgs" / f"d{d}" for d in (0, 1, 2)]
    sizes = {Image.open(next(r.glob("*.png"))).size for r in roots}
    assert len(sizes) == 3
    mean = [sum(sum(Image.open(p).convert("L").getdata()) / (Image.open(p).width * Image.open(p).height)
                for p in sorted(r.glob("*.png"))) / 24 for r in roots]
    assert mean[0] - mean[2] > 30, mean


def test_config_validation():
    with pytest.raises(TaskInputError, match="domain"):
        SyntheticConfig(domain=3)
    with pytest.raises(TaskInputError, match="distinct"):
        SyntheticConfig(identities=10**6)
    with pytest.raises(TaskInputError, match="test_fraction"):
        SyntheticConfig(test_fraction=0.0)
    with pytest.raises(TaskInputError, match="identities"):
        SyntheticConfig(identities=0)


def test_caption_domains_mix_wordings_and_keep_the_default_files():
    base = dict(domain=0, identities=40, images_per_id=2, captions_per_image=2)
    plain = synthetic_records(SyntheticConfig(**base))
    assert synthetic_records(SyntheticConfig(**base, caption_domains=None)) == plain
    mixed = synthetic_records(SyntheticConfig(**base, caption_domains=(0, 1)))
    words = [set(LEXICON[d]["subject"][""]) for d in (0, 1)]

    def wording(record):
        found = {d for d in (0, 1) for c in record.captions for s in words[d] if c.lower().startswith(s)
                 or f" {s} " in c.lower() or f": {s} " in c.lower()}
        return found

    seen = [wording(r) for r in mixed]
    assert sum(1 in w for w in seen) > 10 and sum(0 in w for w in seen) > 10
    assert [r.attributes for r in mixed] == [r.attributes for r in plain]   # same people, other words
    with pytest.raises(TaskInputError, match="caption_domains"):
        SyntheticConfig(caption_domains=(3,))
