"""A hand-written byte-level CLIP tokenizer (no download, no learned merges).

CLIP's BPE marks the last symbol of each word with ``</w>``; with an empty merge list every
word becomes its bytes, so the vocabulary is the 256 byte symbols, the same 256 with
``</w>``, and the two special tokens: 514 entries, ids 0-255 = byte value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 514
BOS_ID = 512
EOS_ID = 513


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (same table transformers uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_vocab() -> Dict[str, int]:
    """Token -> id for the byte-level vocabulary described in the module docstring."""
    b2u = bytes_to_unicode()
    vocab: Dict[str, int] = {}
    for b in range(256):
        vocab[b2u[b]] = b
    for b in range(256):
        vocab[b2u[b] + "</w>"] = 256 + b
    vocab[BOS] = BOS_ID
    vocab[EOS] = EOS_ID
    assert len(vocab) == VOCAB_SIZE
    return vocab


def write_vocab_files(directory: Path) -> None:
    """vocab.json + merges.txt: the slow-tokenizer files every transformers version can read."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(byte_vocab(), ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def write_tokenizer_files(directory: Path, max_length: int) -> Path:
    """Write the vocabulary and a tokenizer_config.json that AutoTokenizer understands."""
    write_vocab_files(directory)
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return directory


def load_tokenizer(directory: Path):
    """Load the tokenizer through AutoTokenizer (fast/Rust where available, both transformers 4 and 5)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def build_tokenizer(directory: Path, max_length: int):
    """Write the hand-made vocabulary and load it; raises if it does not round-trip a caption."""
    tok = load_tokenizer(write_tokenizer_files(directory, max_length))
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok) -> None:
    """Guard against silent vocabulary mistakes: bytes map to their ids and specials wrap the text."""
    ids = tok("a photo of the number: \"7\".")["input_ids"]
    expected = [BOS_ID, 353, 112, 104, 111, 116, 367, 111, 358, 116, 104, 357, 110, 117, 109, 98, 101, 370,
                314, 290, 311, 34, 302, EOS_ID]
    if list(ids) != expected:
        raise RuntimeError(f"byte tokenizer mismatch: {ids}")
    if tok.pad_token_id != EOS_ID or len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"unexpected special tokens: pad={tok.pad_token_id} len={len(tok)}")


def encode_captions(tok, captions: Sequence[str], max_length: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (N x max_length, EOS-padded), true lengths and a caption id (equal id = equal text).

    Templated captions repeat a lot, so only distinct strings are tokenized; the ids also let the
    contrastive loss treat identical captions in a batch as positives rather than negatives.
    """
    uniq: Dict[str, int] = {}
    for c in captions:
        uniq.setdefault(c, len(uniq))
    texts = list(uniq)
    ids = np.full((len(texts), max_length), EOS_ID, dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for start in range(0, len(texts), 4096):
        enc = tok(texts[start:start + 4096], truncation=True, max_length=max_length)["input_ids"]
        for j, row in enumerate(enc):
            ids[start + j, :len(row)] = row
            lengths[start + j] = len(row)
    index = np.fromiter((uniq[c] for c in captions), dtype=np.int64, count=len(captions))
    return ids[index], lengths[index], index
