"""CLIP tokenizer with the IRRA `<|mask|>` token, working offline.

Vocabulary (49,408 ids, the CLIP text embedding's size):

- 0..255      the 256 byte symbols (`bytes_to_unicode` order), 256..511 the same with `</w>`;
- 512..49404  the results of merges 1..48,893, in merge order;
- 49405       `<|mask|>` (MASK_ID). In plain CLIP this id is the token of the last merge,
              `jekyll</w>`; IRRA drops that merge to make room, so no other id moves;
- 49406 `<|startoftext|>` (SOT_ID), 49407 `<|endoftext|>` (EOT_ID).

With `mask_token=True` (default) the dropped merge is also removed from the merge rules, so the
word "jekyll" is spelled with two shorter tokens (ids 13287 and 1702, "jek" + "yll</w>")
instead of id 49405. (IRRA keeps the merge rule but not its token, so it raises KeyError on
"jekyll".) Every other text gets exactly open_clip's ids. `mask_token=False` gives plain CLIP:
all 48,894 merges, id 49405 = `jekyll</w>`, no mask token.

A caption becomes `[SOT] + tokens + [EOT]`, zero-padded to `context_length` (77); a longer one is
cut to `context_length` with its last id forced to EOT. The literal strings `<|startoftext|>`,
`<|endoftext|>` and (with the mask) `<|mask|>` inside a text map to their ids, as in CLIP/IRRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from .bpe import CLIP_MERGES, WORD_END, BytePairEncoder, bytes_to_unicode, clean_text, default_vocab_path, \
    pre_tokenize, read_merges
from ..errors import TokenizerError

VOCAB_SIZE = 49408
MASK_ID = 49405
SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77
SOT_TOKEN, EOT_TOKEN, MASK_TOKEN = "<|startoftext|>", "<|endoftext|>", "<|mask|>"


class ClipTokenizer:
    """Text -> CLIP token ids. `vocab_path` defaults to the BPE file inside open_clip."""

    def __init__(self, *, vocab_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH,
                 mask_token: bool = True) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise TokenizerError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
        self.vocab_path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        self.context_length = context_length
        self.mask_token = mask_token
        merges = read_merges(self.vocab_path, count=CLIP_MERGES)
        if mask_token:
            merges = merges[:-1]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + WORD_END for s in symbols] + ["".join(pair) for pair in merges]
        specials = ([MASK_TOKEN] if mask_token else []) + [SOT_TOKEN, EOT_TOKEN]
        vocab += specials
        if len(vocab) != VOCAB_SIZE:
            raise TokenizerError(f"vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = vocab
        self.specials = {token: self.encoder[token] for token in specials}
        self.bpe = BytePairEncoder(merges)
        self._byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without SOT/EOT and without truncation."""
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for word in pre_tokenize(clean_text(text), specials=tuple(self.specials)):
            special = self.specials.get(word)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self.encoder[symbol] for symbol in self.bpe.symbols(word))
        return ids

    def pad(self, ids: Sequence[int]) -> torch.Tensor:
        """Body ids -> `(context_length,)` int64: SOT, ids, EOT, zeros; over-long cut, last = EOT."""
        tokens = [SOT_ID, *ids, EOT_ID]
        if len(tokens) > self.context_length:
            tokens = tokens[:self.context_length]
            tokens[-1] = EOT_ID
        out = torch.zeros(self.context_length, dtype=torch.long)
        out[:len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return out

    def tokenize(self, text: str) -> torch.Tensor:
        """One caption -> `(context_length,)` int64 ids."""
        return self.pad(self.encode(text))

    def __call__(self, texts: str | Iterable[str]) -> torch.Tensor:
        """A caption or captions -> `(N, context_length)` int64 ids (N = 1 for a single str)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.tokenize(text) for text in texts]
        if not rows:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.stack(rows)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Ids -> text. SOT is skipped and decoding stops at the first EOT (so padding is ignored);
        the mask token reads `<|mask|>`; word ends become spaces."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        raw = bytearray()
        for index in ids:
            if not 0 <= index < VOCAB_SIZE:
                raise TokenizerError(f"token id {index} is outside 0..{VOCAB_SIZE - 1}")
            if index == EOT_ID:
                break
            if index == SOT_ID:
                continue
            token = self.decoder[index]
            if token in self.specials:
                raw += token.encode("utf-8") + b" "
            else:
                raw += bytes(self._byte_decoder[char] for char in token)
        return raw.decode("utf-8", errors="replace").replace(WORD_END, " ").strip()
