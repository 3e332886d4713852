"""Text corpora, the deterministic train / held-out split, and batches of real token ids.

Default corpus ("stdlib"): the ``.py`` sources of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``), excluding ``site-packages``/``dist-packages``, test folders
(``test``, ``tests``, ``idle_test``) and ``__pycache__``. Any text file or folder can be given
instead (folders: every file ending in ``.py``, ``.txt`` or ``.md``).

Split rule (by file, deterministic, independent of listing order): a file is held out iff
``int(sha256(relative_path)[:8], 16) % 100 < 5`` -- about 5 % of the files. A single text file is
split by bytes instead: its last 5 % is held out. Files are read as UTF-8 (undecodable files are
skipped), sorted by relative path and joined with the EOS token between documents.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SMLPError
from .tokenizer import ByteTokenizer

STDLIB = "stdlib"
HELDOUT_PERCENT = 5
TEXT_SUFFIXES = (".py", ".txt", ".md")
EOS_ID = ByteTokenizer().eos_token_id  # the corpus separates documents with it
NEWLINE_ID = 10  # the separator instead, for a vocabulary without EOS (see fit_vocab)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def is_heldout(relpath: str) -> bool:
    """The split rule: ~5 % of files, chosen by a hash of their relative path."""
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def _list_files(root: Path, suffixes: tuple[str, ...]) -> list[tuple[str, Path]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for fn in filenames:
            if fn.endswith(suffixes):
                p = Path(dirpath) / fn
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


@dataclass
class Corpus:
    """Token ids of one corpus, split. ``train``/``heldout`` are 1-D int16 tensors."""

    source: str
    train: torch.Tensor
    heldout: torch.Tensor
    n_train_files: int
    n_heldout_files: int

    def describe(self) -> dict:
        return {"source": self.source, "split_rule": f"sha256(relpath) % 100 < {HELDOUT_PERCENT} is held out",
                "train_tokens": int(self.train.numel()), "heldout_tokens": int(self.heldout.numel()),
                "train_files": self.n_train_files, "heldout_files": self.n_heldout_files}


def _encode_docs(texts: list[str], tok: ByteTokenizer) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tok.encode(t))
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.int16)


@functools.lru_cache(maxsize=4)
def load_corpus(source: str | None = None) -> Corpus:
    """Load and split a corpus: ``None``/"stdlib", a folder, or one text file."""
    tok = ByteTokenizer()
    source = source or STDLIB
    if source == STDLIB:
        root, suffixes = Path(sysconfig.get_paths()["stdlib"]), (".py",)
    else:
        root, suffixes = Path(source), TEXT_SUFFIXES
    if not root.exists():
        raise SMLPError(f"corpus {source} does not exist")
    if root.is_file():
        try:
            text = root.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SMLPError(f"corpus file {root} is not UTF-8 text") from None
        cut = int(len(text) * (100 - HELDOUT_PERCENT) / 100)
        return Corpus(str(root), _encode_docs([text[:cut]], tok), _encode_docs([text[cut:]], tok), 1, 1)
    train, held = [], []
    for rel, p in _list_files(root, suffixes):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            (held if is_heldout(rel) else train).append(text)
    if not train or not held:
        raise SMLPError(f"corpus {source}: need files for both the train and held-out splits "
                        f"(found {len(train)} train, {len(held)} held-out)")
    return Corpus(source, _encode_docs(train, tok), _encode_docs(held, tok), len(train), len(held))


def corpus_source_of(model_or_meta) -> str:
    """The corpus a checkpoint was trained on (``metadata["corpus"]["source"]``), default stdlib."""
    meta = model_or_meta
    if hasattr(model_or_meta, "checkpoint_info"):
        meta = model_or_meta.checkpoint_info.get("metadata", {})
    corpus = (meta or {}).get("corpus") or {}
    src = corpus.get("source", STDLIB) if isinstance(corpus, dict) else STDLIB
    # A corpus path recorded on another machine may not exist here: fall back to the stdlib.
    return src if src == STDLIB or Path(src).exists() else STDLIB


def fit_vocab(ids: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """For a vocabulary without the EOS id (e.g. 256 byte tokens converted from g-mlp-pytorch), the
    document separator becomes a newline byte; other vocabularies are unchanged."""
    if vocab_size is None or vocab_size > EOS_ID:
        return ids
    return torch.where(ids == EOS_ID, torch.full_like(ids, NEWLINE_ID), ids)


def heldout_windows(n: int, seq_len: int, source: str | None = None, offset: int = 0,
                    vocab_size: int | None = None) -> torch.Tensor:
    """``n`` consecutive, non-overlapping windows of held-out token ids: int64 [n, seq_len].

    Deterministic: window i starts at ``(offset + i) * seq_len`` of the held-out stream (wrapping
    around if the stream is short). ``vocab_size``: the model's (see ``fit_vocab``).
    """
    ids = load_corpus(source).heldout
    total = ids.numel()
    if total < seq_len:
        raise SMLPError(f"held-out text has {total} tokens, fewer than seq_len {seq_len}")
    rows = []
    for i in range(n):
        start = ((offset + i) * seq_len) % (total - seq_len + 1)
        rows.append(ids[start:start + seq_len])
    return fit_vocab(torch.stack(rows).long(), vocab_size)


def random_batch(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator,
                 vocab_size: int | None = None) -> torch.Tensor:
    """Random windows of length ``seq_len + 1`` (inputs + next-token targets): int64 [batch, seq_len + 1]."""
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=gen)
    return fit_vocab(torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()]).long(), vocab_size)


def unigram_bits_per_byte(corpus: Corpus) -> float:
    """Cross-entropy (bits/token) of the held-out text under the train split's unigram distribution
    (add-one smoothing): the baseline a trained model must beat by far."""
    counts = torch.bincount(corpus.train.long(), minlength=257).double() + 1
    logp = torch.log2(counts / counts.sum())
    return float(-logp[corpus.heldout.long()].mean())
