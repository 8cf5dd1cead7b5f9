"""The offline CLIP tokenizer: id scheme, mask token, parity with open_clip's SimpleTokenizer."""

from __future__ import annotations

import gzip
import importlib.util
import random
import unicodedata
from pathlib import Path

import pytest
import torch

from petl_tpr.tpr.data.bpe import _fix_text_fallback, bytes_to_unicode, clean_text
from petl_tpr.tpr.errors import TokenizerError
from petl_tpr.tpr.data.tokenizer import EOT_ID, MASK_ID, SOT_ID, VOCAB_SIZE, ClipTokenizer


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def plain() -> ClipTokenizer:
    return ClipTokenizer(mask_token=False)


@pytest.fixture(scope="module")
def reference():
    """open_clip's SimpleTokenizer, loaded from its file without importing open_clip (and torchvision)."""
    for name in ("ftfy", "regex", "numpy"):
        pytest.importorskip(name)
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_for_tests", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


WORDS = ("a woman man person pedestrian wearing wears red dark-blue black white grey jacket t-shirt coat "
         "trousers jeans shorts skirt backpack handbag cap hat shoes sneakers carrying holding walking "
         "long short hair glasses sleeves striped 2 3 10 1990s she's he's isn't they're we've I'm you'll "
         "she'd SHE'S Jekyll jekyll café naïve 北京 Ärmel ＡＢＣ").split()
PUNCT = [",", ".", ";", "!", "?", "...", " - ", "'", '"', "(", ")", " &amp; ", "’", " “", "”", "\t", "\n", "  "]


def sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(1, 40)
        parts = [rng.choice(WORDS) + (rng.choice(PUNCT) if rng.random() < 0.3 else " ") for _ in range(length)]
        out.append("".join(parts))
    return out


def random_unicode(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    assigned = [c for c in range(0x20, 0x2FFFF, 7) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    return ["".join(chr(rng.choice(assigned)) if rng.random() < 0.5 else rng.choice("ab '1,.Ss!")
                    for _ in range(rng.randint(1, 25))) for _ in range(count)]


def test_special_ids_and_vocabulary(tok, plain):
    assert (tok.vocab_size, VOCAB_SIZE, MASK_ID, SOT_ID, EOT_ID) == (49408, 49408, 49405, 49406, 49407)
    assert tok.decoder[MASK_ID] == "<|mask|>" and plain.decoder[MASK_ID] == "jekyll</w>"
    assert tok.decoder[SOT_ID] == plain.decoder[SOT_ID] == "<|startoftext|>"
    # Dropping the last merge moves no other id.
    assert tok.decoder[:MASK_ID] == plain.decoder[:MASK_ID]
    assert list(bytes_to_unicode().values())[:3] == ["!", '"', "#"]


def test_caption_layout_padding_and_truncation(tok):
    ids = tok.tokenize("A woman in a red jacket.")
    body = tok.encode("A woman in a red jacket.")
    assert ids.shape == (77,) and ids.dtype == torch.long
    assert ids[0] == SOT_ID and ids[len(body) + 1] == EOT_ID
    assert ids[1:len(body) + 1].tolist() == body and int(ids[len(body) + 2:].abs().sum()) == 0
    assert int(ids.argmax()) == len(body) + 1  # EOT is the argmax: the text feature position
    long_ids = tok.tokenize("red " * 200)
    assert long_ids.shape == (77,) and long_ids[0] == SOT_ID and long_ids[-1] == EOT_ID
    assert long_ids[1:-1].tolist() == tok.encode("red " * 75)
    batch = tok(["a", "b c"])
    assert batch.shape == (2, 77) and tok([]).shape == (0, 77)
    assert ClipTokenizer(context_length=5).tokenize("one two three four five").tolist()[-1] == EOT_ID


def test_parity_with_open_clip(tok, plain, reference):
    texts = sentences(0, 400) + random_unicode(1, 300) + ["", "   ", "&lt;b&gt;bold&lt;/b&gt;", "ÃƒÂ© mojibake",
                                                          "x" * 300]
    for text in texts:
        expected = reference.encode(text)
        assert plain.encode(text) == expected, text
        if MASK_ID not in expected:
            assert tok.encode(text) == expected, text
    padded = texts[:50] + ["long caption " * 60]
    assert torch.equal(plain(padded), reference(padded))


def test_mask_token_changes_only_the_dropped_merge(tok, plain, reference):
    assert reference.encode("jekyll") == plain.encode("jekyll") == [MASK_ID]
    assert tok.encode("jekyll") == [43893, 865]
    assert [tok.decoder[i] for i in tok.encode("jekyll")] == ["jeky", "ll</w>"]
    assert tok.encode("a <|mask|> shirt") == [320, MASK_ID, 2523]
    assert plain.encode("<|endoftext|>") == [EOT_ID]
    # open_clip >= 3 names its specials <start_of_text>/<end_of_text>; CLIP and IRRA (and this
    # tokenizer) use <|startoftext|>/<|endoftext|>, so those literal strings differ between the two.
    assert reference.encode("<start_of_text>")[0] == SOT_ID != plain.encode("<start_of_text>")[0]


def test_decode_round_trip(tok):
    ids = tok.tokenize("A man in a Grey coat, carrying <|mask|> bag!")
    assert tok.decode(ids) == "a man in a grey coat , carrying <|mask|> bag !"
    assert tok.decode([320, 786]) == "a man"
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([VOCAB_SIZE])


def test_cleaning(tok):
    assert clean_text("  Two&amp;amp;three \n\t Spaces  ") == "two&three spaces"
    assert _fix_text_fallback("she’s “here”") == "she's \"here\""
    assert tok.encode("she’s") == tok.encode("she's")


def test_bad_vocabulary_and_arguments(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read"):
        ClipTokenizer(vocab_path=tmp_path / "missing.txt.gz")
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(TokenizerError, match="48894"):
        ClipTokenizer(vocab_path=short)
    with pytest.raises(TokenizerError, match="context_length"):
        ClipTokenizer(context_length=1)
    with pytest.raises(TokenizerError, match="str"):
        ClipTokenizer.encode(None, 3)  # type: ignore[arg-type]
