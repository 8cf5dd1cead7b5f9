"""An embedded synthetic person-retrieval dataset, written in CUHK-PEDES format.

`write_synthetic(root, domain=0, identities=200, ...)` draws small pedestrian images and writes
`root/CUHK-PEDES/reid_raw.json` + `root/CUHK-PEDES/imgs/`, so `build_dataset("cuhk-pedes", root)`
reads it like the real set. Generation is deterministic: the same arguments give byte-identical
files (seeding uses `random.Random` with string seeds, which do not depend on PYTHONHASHSEED).

An identity is a distinct combination of seven attributes (`ATTRIBUTE_VALUES`: upper-clothing
colour and type, lower colour and type, headwear, bag, hair length) plus body traits that captions
do not mention (skin, hair and bag colour, proportions). Its images differ in pose, placement,
background and lighting; each image gets `captions_per_image` captions from the domain's
templates. Identities are split by `test_fraction` / `val_fraction` (rounded, at least one test
identity) into the `test`, `val` and `train` splits.

The domains differ in vocabulary (`synthetic_text.py`) and appearance (`DOMAIN_STYLES`:
canvas size 48x128 vs 40x112, colour shades, plain indoor vs textured outdoor backgrounds,
lighting, tint and noise), for domain-shift experiments. Domain 2 (44x120, a night scene: dark
blue-grey backgrounds under a cold blue tint, washed-out shades, heavy noise, a smaller figure)
is the demo's unseen domain; its captions use both other domains' words in its own sentences. `CUHK-PEDES/synthetic_meta.json` records
every image's attributes; the reader ignores it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ...atomic import write_atomic
from ..errors import DatasetError, TaskInputError, check_int
from .synthetic_draw import Body, DomainStyle, View, draw_person
from .synthetic_text import COLOURS, write_captions

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "upper_color": ("red", "blue", "green", "yellow", "black", "white", "purple", "orange"),
    "upper_type": ("t-shirt", "jacket", "coat"),
    "lower_color": ("black", "blue", "grey", "brown", "white", "green"),
    "lower_type": ("trousers", "shorts", "skirt"),
    "headwear": ("none", "cap", "hat"),
    "bag": ("none", "backpack", "handbag"),
    "hair": ("short", "long"),
}
SHADES = (  # RGB per colour name, per domain
    dict(zip(COLOURS, [(200, 30, 35), (35, 70, 190), (40, 150, 60), (230, 200, 40), (25, 25, 28), (235, 235, 235),
                       (120, 50, 160), (240, 130, 30), (128, 128, 128), (120, 75, 40)])),
    dict(zip(COLOURS, [(170, 40, 60), (30, 50, 130), (70, 110, 50), (200, 160, 50), (35, 30, 30), (215, 210, 195),
                       (100, 60, 120), (210, 110, 50), (105, 105, 110), (100, 65, 45)])),
    dict(zip(COLOURS, [(215, 80, 95), (80, 110, 215), (90, 175, 120), (235, 220, 110), (45, 45, 55), (245, 245, 250),
                       (150, 100, 190), (245, 160, 90), (150, 150, 160), (140, 100, 75)])),
)
DOMAIN_STYLES = (
    DomainStyle(size=(48, 128), palette=SHADES[0], backgrounds=((200, 200, 195), (185, 190, 200), (210, 200, 180)),
                ground=((150, 145, 140), (140, 140, 150)), texture_strength=0.15, brightness=(0.95, 1.1),
                tint=(255, 255, 255), tint_strength=0.0, pixel_noise=8, figure_height=0.86),
    DomainStyle(size=(40, 112), palette=SHADES[1], backgrounds=((90, 120, 80), (110, 110, 120), (80, 100, 120)),
                ground=((70, 70, 70), (90, 80, 60)), texture_strength=0.45, brightness=(0.65, 0.9),
                tint=(255, 170, 90), tint_strength=0.12, pixel_noise=20, figure_height=0.8),
    DomainStyle(size=(44, 120), palette=SHADES[2], backgrounds=((55, 60, 80), (45, 55, 70), (70, 65, 75)),
                ground=((35, 38, 45), (50, 48, 50)), texture_strength=0.3, brightness=(0.7, 0.95),
                tint=(90, 140, 255), tint_strength=0.15, pixel_noise=28, figure_height=0.78),
)
SKIN = ((241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172))
HAIR = ((20, 20, 20), (90, 56, 30), (200, 170, 90), (150, 150, 150))
HEADWEAR = ((40, 40, 40), (200, 200, 200), (60, 40, 110), (150, 30, 30))


@dataclass(frozen=True)
class SyntheticConfig:
    domain: int = 0
    identities: int = 200
    images_per_id: int = 4
    captions_per_image: int = 2
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.0
    caption_domains: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        domains = tuple(range(len(DOMAIN_STYLES)))
        if self.domain not in domains:
            raise TaskInputError(f"SyntheticConfig.domain must be one of {domains}, got {self.domain!r}")
        if self.caption_domains is not None:
            object.__setattr__(self, "caption_domains", tuple(self.caption_domains))
            if not self.caption_domains or any(d not in domains for d in self.caption_domains):
                raise TaskInputError(f"SyntheticConfig.caption_domains must be a non-empty list of {domains}, "
                                     f"got {self.caption_domains!r}")
        for name in ("identities", "images_per_id", "captions_per_image"):
            check_int(f"SyntheticConfig.{name}", getattr(self, name))
        combos = 1
        for values in ATTRIBUTE_VALUES.values():
            combos *= len(values)
        if self.identities > combos:
            raise TaskInputError(f"SyntheticConfig.identities: at most {combos} distinct attribute combinations")
        test, val = self.test_fraction, self.val_fraction
        if not (0 < test < 1 and 0 <= val < 1 and test + val < 1):
            raise TaskInputError("SyntheticConfig: need 0 < test_fraction < 1, 0 <= val_fraction < 1 and their sum < 1")
        if self.identities < 2 + (self.val_fraction > 0):
            raise TaskInputError("SyntheticConfig.identities too small for a train, test (and val) identity each")


@dataclass(frozen=True)
class SyntheticImage:
    """One generated image: its annotation fields and what was drawn."""

    pid: int  # 1-based, the annotation's `id`
    split: str
    file_path: str  # relative to CUHK-PEDES/imgs
    captions: tuple[str, ...]
    attributes: dict[str, str]
    body: Body
    view: View


def _identity(index: int, rng: random.Random) -> tuple[dict[str, str], Body]:
    attributes = {}
    for name, values in ATTRIBUTE_VALUES.items():  # mixed-radix decoding of a distinct combination
        index, digit = divmod(index, len(values))
        attributes[name] = values[digit]
    body = Body(skin=rng.choice(SKIN), hair=rng.choice(HAIR), bag=SHADES[0][rng.choice(COLOURS)],
                headwear=rng.choice(HEADWEAR), height=rng.uniform(0.9, 1.05), width=rng.uniform(0.85, 1.15))
    return attributes, body


def _view(rng: random.Random) -> View:
    return View(arm_swing=rng.uniform(-25, 25), stride=rng.uniform(0, 1), shift_x=rng.uniform(-0.08, 0.08),
                shift_y=rng.uniform(-0.03, 0.03), scale=rng.uniform(0.92, 1.05), background=rng.randrange(6),
                handbag_side=rng.choice((-1, 1)))


def synthetic_records(config: SyntheticConfig) -> list[SyntheticImage]:
    """The dataset's images (attributes, captions, pose) without drawing anything."""
    rng = random.Random(f"petl-tpr-synthetic/{config.seed}/{config.domain}")
    combos = 1
    for values in ATTRIBUTE_VALUES.values():
        combos *= len(values)
    chosen = rng.sample(range(combos), config.identities)
    n_test = max(1, round(config.test_fraction * config.identities))
    n_val = max(1, round(config.val_fraction * config.identities)) if config.val_fraction > 0 else 0
    n_test = min(n_test, config.identities - 1 - n_val)
    records = []
    for position, combo in enumerate(chosen):
        split = "test" if position < n_test else "val" if position < n_test + n_val else "train"
        pid = position + 1
        id_rng = random.Random(f"{config.seed}/{config.domain}/identity/{pid}")
        attributes, body = _identity(combo, id_rng)
        for k in range(config.images_per_id):
            # Drawn only when asked for, so the default keeps the files of earlier versions byte for byte.
            wording = id_rng.choice(config.caption_domains) if config.caption_domains else config.domain
            captions = write_captions(attributes, domain=wording, count=config.captions_per_image, rng=id_rng)
            records.append(SyntheticImage(pid=pid, split=split, file_path=f"d{config.domain}/{pid:05d}_{k:02d}.png",
                                          captions=captions, attributes=attributes, body=body, view=_view(id_rng)))
    return records


def render(record: SyntheticImage, config: SyntheticConfig):
    """The PIL image of one record (deterministic)."""
    rng = random.Random(f"{config.seed}/{config.domain}/pixels/{record.file_path}")
    return draw_person(record.attributes, record.body, record.view, DOMAIN_STYLES[config.domain], rng)


def _annotation(record: SyntheticImage) -> dict:
    tokens = [re.findall(r"[a-z]+|[^\sa-z]", caption.lower()) for caption in record.captions]
    return {"split": record.split, "captions": list(record.captions), "file_path": record.file_path,
            "processed_tokens": tokens, "id": record.pid}


def write_synthetic(root: str | Path, *, domain: int = 0, identities: int = 200, images_per_id: int = 4,
                    captions_per_image: int = 2, seed: int = 0, test_fraction: float = 0.2,
                    val_fraction: float = 0.0, caption_domains: tuple[int, ...] | None = None,
                    overwrite: bool = False) -> Path:
    """Generate the dataset under `root/CUHK-PEDES` and return `root` (for `build_dataset`).

    `caption_domains` (default: `(domain,)`) lists the wordings the captions are drawn from, one
    chosen per image: `domain=0, caption_domains=(0, 1)` draws domain-0 images described in both
    vocabularies (a pre-training corpus that knows the words of both domains, as CLIP's does).

    An existing `reid_raw.json` there is refused unless `overwrite=True` (which rewrites the
    annotation and the images this configuration produces; other files are left alone).
    """
    config = SyntheticConfig(domain=domain, identities=identities, images_per_id=images_per_id,
                             captions_per_image=captions_per_image, seed=seed, test_fraction=test_fraction,
                             val_fraction=val_fraction, caption_domains=caption_domains)
    base = Path(root) / "CUHK-PEDES"
    if (base / "reid_raw.json").exists() and not overwrite:
        raise DatasetError(f"{base / 'reid_raw.json'} already exists; pass overwrite=True or another root")
    records = synthetic_records(config)
    (base / "imgs" / f"d{domain}").mkdir(parents=True, exist_ok=True)
    for record in records:
        render(record, config).save(base / "imgs" / record.file_path, format="PNG")
    meta = {"generator": "petl_tpr.tpr.data.synthetic", "version": 1, "config": asdict(config),
            "images": {r.file_path: {"pid": r.pid, "split": r.split, **r.attributes} for r in records}}
    write_atomic(base / "synthetic_meta.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8"))
    # The annotation goes last: a crash before it leaves no dataset that looks complete.
    text = json.dumps([_annotation(r) for r in records], indent=1)
    write_atomic(base / "reid_raw.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return Path(root)
