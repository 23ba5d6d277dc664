"""The GPT-2 byte-level BPE tokenizer and exact incremental decoding.

Loads with the `tokenizers` library alone (no torch, no transformers), so views that
need only token text start fast.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from functools import cache, cached_property
from pathlib import Path

from wmgen import files
from wmgen.errors import ModelError

EOS_TEXT = "<|endoftext|>"
TOKENIZER_LIMIT = 64 << 20  # bytes in one tokenizer file (gpt2's tokenizer.json: 3.6 MB)


def read_text(path: Path, limit: int) -> str:
    """A checkpoint's text file: regular, at most `limit` bytes, UTF-8."""
    try:
        return files.utf8(files.read_regular(path, limit))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except files.FileProblem as e:
        raise ModelError(f"{path} {e}; put the checkpoint's own file there") from None


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
        """The tokenizer in `folder`: tokenizer.json, else vocab.json and merges.txt.
        Files are read here (bounded, regular files only), then parsed from memory."""
        import tokenizers

        path = folder / "tokenizer.json"
        if os.path.lexists(path):
            text = read_text(path, TOKENIZER_LIMIT)
            try:
                return cls(tokenizers.Tokenizer.from_str(text), str(folder))
            except Exception as e:  # the library raises plain Exception for bad files
                raise ModelError(f"cannot read the tokenizer {path}: {files.one_line(e)}") from None
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        if os.path.lexists(vocab_path) and os.path.lexists(merges_path):
            vocab, merges = read_vocab(vocab_path), read_merges(merges_path)
            try:
                backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
            except Exception as e:
                raise ModelError(f"cannot read the tokenizer in {folder} (vocab.json, merges.txt): {files.one_line(e)}") from None
            backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = tokenizers.decoders.ByteLevel()
            backend.add_special_tokens([EOS_TEXT])
            return cls(backend, str(folder))
        raise ModelError(f"no tokenizer in {folder}: it needs tokenizer.json, or vocab.json and merges.txt")

    @property
    def id_limit(self) -> int:
        """One more than the largest token id (ids need not be dense, so not `vocab_size`)."""
        return max(self.vocab.values(), default=-1) + 1

    @cached_property
    def vocab(self) -> dict[str, int]:
        """Token text -> id, special tokens included (read once: ~20 ms for gpt2's)."""
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @cache  # noqa: B019 - one tokenizer per model, alive as long as the process
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
        blob = json.dumps(sorted(self.vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_vocab(path: Path) -> dict[str, int]:
    """A BPE vocabulary file: a JSON object from token to id."""
    try:
        vocab = json.loads(read_text(path, TOKENIZER_LIMIT))
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path} is not valid JSON: {files.one_line(e)}") from None
    if not isinstance(vocab, dict) or not all(type(i) is int and 0 <= i < 1 << 32 for i in vocab.values()):
        raise ModelError(f"{path} is not a vocabulary: expected a JSON object from token to id (a whole number >= 0)")
    return vocab


def read_merges(path: Path) -> list[tuple[str, str]]:
    """A BPE merges file: one pair a line, split by a space, after an optional #version line
    (the format `tokenizers` reads)."""
    lines = read_text(path, TOKENIZER_LIMIT).split("\n")
    if lines[-1] == "":
        lines.pop()
    merges = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ModelError(f"{path}: line {number} is not a merge (two tokens separated by one space)")
        merges.append((pair[0], pair[1]))
    return merges


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
