"""Byte-level tokenizer, stored inside each checkpoint as ``smlp_tokenizer.json`` (older checkpoints:
``tokenizer.json``; renamed so Hugging Face tools do not take it for a ``tokenizers`` file).

Ids 0..255 are the UTF-8 bytes; id 256 is the end-of-sequence token (between training documents).
``eos_token_id=None``: a vocabulary without EOS (e.g. g-mlp-pytorch's 256 byte tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, InputError


@dataclass(frozen=True)
class ByteTokenizer:
    vocab_size: int = 257
    eos_token_id: int | None = 256

    kind = "byte"

    def encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # lone surrogates (e.g. undecodable argv bytes)
            raise InputError(f"text is not valid UTF-8 (character U+{ord(text[e.start]):04X} at "
                             f"position {e.start})") from None

    def decode(self, ids: list[int] | Any, errors: str = "replace") -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors=errors)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ByteTokenizer":
        if not isinstance(d, dict) or d.get("type") != cls.kind:
            raise CheckpointError(f"tokenizer: unsupported tokenizer type {d.get('type') if isinstance(d, dict) else d!r}")
        for name in ("vocab_size", "eos_token_id"):
            if name not in d:
                raise CheckpointError(f"tokenizer: missing field {name}")
            v = d[name]
            if name == "eos_token_id" and v is None:  # a vocabulary without EOS (e.g. converted gMLPs)
                continue
            # int() would silently truncate 257.5 (or read "257"): only a JSON integer is accepted
            if not isinstance(v, int) or isinstance(v, bool):
                raise CheckpointError(f"tokenizer: {name} must be an integer, got {v!r}")
        tok = cls(vocab_size=d["vocab_size"], eos_token_id=d["eos_token_id"])
        if tok.vocab_size < 256 or (tok.eos_token_id is not None and not 0 <= tok.eos_token_id < tok.vocab_size):
            raise CheckpointError("tokenizer: byte tokenizer needs vocab_size >= 256 and eos inside it")
        return tok
