"""The GPT-2 byte-level BPE tokenizer and exact incremental decoding.

Loads with the `tokenizers` library alone (no torch, no transformers), so views that
need only token text start fast.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from functools import cache, cached_property
from pathlib import Path

from wmgen.errors import ModelError

EOS_TEXT = "<|endoftext|>"


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable characters in its vocabulary back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Tokenizer:
    def __init__(self, backend, source: str):
        self.backend = backend
        self.source = source
        self.eos_id = backend.token_to_id(EOS_TEXT)

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        import tokenizers

        try:
            if (folder / "tokenizer.json").is_file():
                return cls(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), str(folder))
            if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                bpe = tokenizers.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
                backend = tokenizers.Tokenizer(bpe)
                backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
                backend.decoder = tokenizers.decoders.ByteLevel()
                backend.add_special_tokens([EOS_TEXT])
                return cls(backend, str(folder))
        except Exception as e:  # the library raises plain Exception for bad files
            raise ModelError(f"cannot read the tokenizer in {folder}: {e}") from None
        raise ModelError(f"no tokenizer in {folder}: it needs tokenizer.json, or vocab.json and merges.txt")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @cache
    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a piece of UTF-8, maybe incomplete)."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        table = byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode()

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary: sessions made with another tokenizer are refused."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TextStream:
    """Turns token ids into text pieces whose concatenation is exactly the decoded
    text: bytes of a character split across tokens wait for the token that completes
    them; invalid bytes become U+FFFD as `bytes.decode(errors="replace")` does."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token_id))

    def close(self) -> str:
        return self.decoder.decode(b"", final=True)
