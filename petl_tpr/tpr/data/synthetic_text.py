"""Caption vocabulary and templates of the three synthetic domains.

Domain 0 speaks plainly ("a pedestrian wearing a red t-shirt and black trousers"); domain 1 uses
other colour words, garment names and sentence shapes ("a commuter sporting a crimson tee paired
with ebony slacks"). Domain 2, the demo's unseen domain, draws its words from both (a model that
knows domains 0 and 1 knows them) in sentence shapes of its own, terse like a camera log ("Camera
view: a walker, an ivory coat over brown slacks, long hair, a rucksack."). Every caption names every attribute of the person (headwear and bag only
when present), always as "<colour word> <garment word>" for the two garments, so a test can check
a caption against the attributes that were drawn.
"""

from __future__ import annotations

import random
from typing import Callable

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange", "grey", "brown")

LEXICON: tuple[dict[str, dict[str, tuple[str, ...]]], ...] = (
    {
        "color": {"red": ("red",), "blue": ("blue",), "green": ("green",), "yellow": ("yellow",),
                  "black": ("black",), "white": ("white",), "purple": ("purple",), "orange": ("orange",),
                  "grey": ("grey", "gray"), "brown": ("brown",)},
        "upper_type": {"t-shirt": ("t-shirt", "short-sleeved shirt"), "jacket": ("jacket", "zip-up jacket"),
                       "coat": ("coat", "long coat")},
        "lower_type": {"trousers": ("trousers", "long trousers"), "shorts": ("shorts",), "skirt": ("skirt",)},
        "headwear": {"cap": ("cap", "baseball cap"), "hat": ("hat", "wide-brimmed hat")},
        "bag": {"backpack": ("backpack",), "handbag": ("handbag",)},
        "hair": {"short": ("short hair",), "long": ("long hair",)},
        "subject": {"": ("a person", "a pedestrian", "a young person", "someone")},
    },
    {
        "color": {"red": ("crimson", "scarlet"), "blue": ("navy", "azure"), "green": ("olive", "emerald"),
                  "yellow": ("golden", "mustard"), "black": ("jet-black", "ebony"), "white": ("ivory", "snow-white"),
                  "purple": ("violet", "plum"), "orange": ("tangerine", "amber"), "grey": ("ash", "slate"),
                  "brown": ("chocolate", "tan")},
        "upper_type": {"t-shirt": ("tee", "crew-neck top"), "jacket": ("windbreaker", "bomber"),
                       "coat": ("overcoat", "trench coat")},
        "lower_type": {"trousers": ("pants", "slacks"), "shorts": ("bermudas", "cut-offs"),
                       "skirt": ("miniskirt", "sarong")},
        "headwear": {"cap": ("snapback", "peaked cap"), "hat": ("fedora", "sun hat")},
        "bag": {"backpack": ("rucksack", "knapsack"), "handbag": ("purse", "tote bag")},
        "hair": {"short": ("cropped hair", "a buzz cut"), "long": ("flowing hair", "shoulder-length hair")},
        "subject": {"": ("an individual", "a commuter", "a passer-by", "a walker")},
    },
)
LEXICON = LEXICON + ({key: {value: LEXICON[0][key][value] + LEXICON[1][key][value] for value in LEXICON[0][key]}
                      for key in LEXICON[0]},)
PLURAL_GARMENTS = frozenset({"trousers", "long trousers", "shorts", "pants", "slacks", "bermudas", "cut-offs"})

Parts = dict[str, str | None]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _templates_0() -> list[Callable[[Parts], str]]:
    return [
        lambda p: (f"{_cap(p['subject'])} wearing {p['upper']} and {p['lower']}"
                   + (f", with {p['head']} on the head" if p["head"] else "")
                   + (f" and carrying {p['bag']}" if p["bag"] else "") + f". The person has {p['hair']}."),
        lambda p: (f"{_cap(p['subject'])} with {p['hair']} is dressed in {p['upper']} and {p['lower']}."
                   + (f" The person wears {p['head']}." if p["head"] else "")
                   + (f" The person carries {p['bag']}." if p["bag"] else "")),
        lambda p: (f"This person has {p['hair']} and wears {p['lower']} with {p['upper']}"
                   + (f", {p['head']}" if p["head"] else "") + (f" and {p['bag']}" if p["bag"] else "") + "."),
        lambda p: (f"{_cap(p['subject'])} in {p['upper']} and {p['lower']}" + (f" and {p['head']}" if p["head"] else "")
                   + f", with {p['hair']}" + (f", holding {p['bag']}" if p["bag"] else "") + "."),
    ]


def _templates_1() -> list[Callable[[Parts], str]]:
    return [
        lambda p: (f"Pictured is {p['subject']} sporting {p['upper']} paired with {p['lower']}"
                   + (f", topped off by {p['head']}" if p["head"] else "")
                   + (f", toting {p['bag']}" if p["bag"] else "") + f"; {p['hair']} is visible."),
        lambda p: (f"{_cap(p['subject'])} dons {p['lower']} plus {p['upper']} and shows {p['hair']}"
                   + (f", {p['head']} on top" if p["head"] else "") + (f", {p['bag']} slung along" if p["bag"] else "")
                   + "."),
        lambda p: (f"Spotted: {p['subject']} with {p['hair']}, clad in {p['upper']} over {p['lower']}"
                   + (f", sporting {p['head']}" if p["head"] else "") + (f", lugging {p['bag']}" if p["bag"] else "")
                   + "."),
    ]


def _templates_2() -> list[Callable[[Parts], str]]:
    return [
        lambda p: (f"Camera view: {p['subject']}, {p['upper']} over {p['lower']}, {p['hair']}"
                   + (f", {p['head']}" if p["head"] else "") + (f", {p['bag']}" if p["bag"] else "") + "."),
        lambda p: (f"{_cap(p['lower'])} and {p['upper']}" + (f", with {p['head']}" if p["head"] else "")
                   + f"; {p['hair']}" + (f"; carrying {p['bag']}" if p["bag"] else "") + "."),
        lambda p: (f"Seen on camera: {p['subject']} with {p['hair']}" + (f" and {p['bag']}" if p["bag"] else "")
                   + f", in {p['upper']} and {p['lower']}" + (f", wearing {p['head']}" if p["head"] else "") + "."),
    ]


TEMPLATES = (_templates_0(), _templates_1(), _templates_2())


def _parts(attributes: dict[str, str], domain: int, rng: random.Random) -> Parts:
    words = LEXICON[domain]
    upper_garment = rng.choice(words["upper_type"][attributes["upper_type"]])
    upper = f"{rng.choice(words['color'][attributes['upper_color']])} {upper_garment}"
    garment = rng.choice(words["lower_type"][attributes["lower_type"]])
    lower = f"{rng.choice(words['color'][attributes['lower_color']])} {garment}"
    hair = rng.choice(words["hair"][attributes["hair"]])
    head = rng.choice(words["headwear"][attributes["headwear"]]) if attributes["headwear"] != "none" else None
    bag = rng.choice(words["bag"][attributes["bag"]]) if attributes["bag"] != "none" else None
    return {"subject": rng.choice(words["subject"][""]), "upper": _article(upper),
            "lower": lower if garment in PLURAL_GARMENTS else _article(lower),
            "hair": hair, "head": _article(head) if head else None, "bag": _article(bag) if bag else None}


def write_captions(attributes: dict[str, str], *, domain: int, count: int, rng: random.Random) -> tuple[str, ...]:
    """`count` captions of one image, different templates first, distinct where the vocabulary allows."""
    templates = TEMPLATES[domain]
    order = rng.sample(range(len(templates)), len(templates))
    captions: list[str] = []
    for k in range(count):
        caption = templates[order[k % len(order)]](_parts(attributes, domain, rng))
        for _ in range(8):
            if caption not in captions:
                break
            caption = templates[rng.randrange(len(templates))](_parts(attributes, domain, rng))
        captions.append(caption)
    return tuple(captions)
