"""The tokenizer: loaded from a tokenizer.json, a folder or the hub, or trained on the fly and cached.

A trained tokenizer is a byte-level BPE (no unknown tokens, any text round-trips) with "<|endoftext|>" as id 0
and "<|padding|>" as id 1, as in GPT-NeoX. It is cached under `<cache>/tokenizers/` by a hash of the text it
was trained on and its vocabulary size, so a dataset rebuilt with another block length reuses it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from rafale.config import DataSettings, cache_root
from rafale.errors import RafaleError

if TYPE_CHECKING:
    from datasets import Dataset
    from tokenizers import Tokenizer

KEY = "data.config.tokenizer_path"
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
PAD_TOKENS = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")
TRAINED_SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]
# Bump when the way tokenizers are trained changes, so that cached ones are not reused.
TRAINER_VERSION = 1


def find_tokenizer_file(path: str) -> Optional[Path]:
    """The local tokenizer.json that `tokenizer_path` names, or None for a hub name."""
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / "tokenizer.json"
        if not candidate.is_file():
            raise RafaleError(f"{KEY}: no tokenizer.json in {path}")
        return candidate
    if candidate.is_file():
        return candidate
    if candidate.is_absolute() or candidate.suffix == ".json":
        raise RafaleError(f"{KEY}: no such file or folder: {path}")
    return None


def tokenizer_name(settings: DataSettings) -> str:
    """The readable name in the cache folder's name: configured, else from the path, else `bpe<vocab>`."""
    if settings.tokenizer_name:
        return settings.tokenizer_name
    if settings.tokenizer_path is None:
        return f"bpe{settings.vocab_size}"
    path = Path(settings.tokenizer_path)
    name = path.parent.name if path.name == "tokenizer.json" else path.stem if path.suffix == ".json" else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "tokenizer"


def tokenizer_identity(settings: DataSettings) -> dict:
    """What identifies the tokenizer before it exists: the content of a file, a hub name, or how it is trained."""
    if settings.tokenizer_path is None:
        return {"trained": "byte-level-bpe", "vocab_size": settings.vocab_size, "version": TRAINER_VERSION}
    file = find_tokenizer_file(settings.tokenizer_path)
    if file is None:
        return {"hub": settings.tokenizer_path}
    return {"sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a tokenizer.json, a folder holding one, or a hub name; padding and truncation off."""
    from tokenizers import Tokenizer

    file = find_tokenizer_file(path)
    try:
        tokenizer = Tokenizer.from_file(str(file)) if file else Tokenizer.from_pretrained(path)
    except Exception as error:  # bad JSON, unknown model type, no network: all mean "this does not load"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RafaleError(f"{KEY}: could not load tokenizer {file or path}: {first_line}") from None
    # A tokenizer.json may carry padding or truncation settings; blocks are cut and padded by rafale instead.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def special_token_ids(tokenizer: Tokenizer, settings: DataSettings, where: str) -> tuple[int, int]:
    """(eos, pad): the first known end-of-text token; pad as configured, else the tokenizer's, else EOS."""
    eos = next((tokenizer.token_to_id(t) for t in EOS_TOKENS if tokenizer.token_to_id(t) is not None), None)
    if eos is None:
        raise RafaleError(f"{KEY}: {where} has none of the end-of-text tokens {', '.join(EOS_TOKENS)}")
    if settings.pad_token_id is not None:
        return eos, settings.pad_token_id
    pad = next((tokenizer.token_to_id(t) for t in PAD_TOKENS if tokenizer.token_to_id(t) is not None), eos)
    return eos, pad


def _text_hash(documents: Dataset, column: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for batch in documents.iter(batch_size=1000):
        for text in batch[column]:
            data = text.encode("utf-8")
            # Length-prefixed, so that ["ab", "c"] and ["a", "bc"] differ.
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def train_tokenizer(documents: Dataset, column: str, vocab_size: int, readable: str) -> Tokenizer:
    """A byte-level BPE trained on the documents' texts, or the cached one trained on the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256(f"{_text_hash(documents, column)}-{vocab_size}-{TRAINER_VERSION}".encode()).hexdigest()
    cached = cache_root() / "tokenizers" / f"{readable}_{key[:8]}.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TRAINED_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    batches = (batch[column] for batch in documents.iter(batch_size=1000))
    tokenizer.train_from_iterator(batches, trainer=trainer, length=len(documents))
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tokenizer.save(str(partial))
    os.replace(partial, cached)
    return tokenizer
