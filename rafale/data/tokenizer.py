"""The tokenizer: loaded from a tokenizer.json, a folder or the hub, or trained on the fly and cached.

For decoder tasks a trained tokenizer is a byte-level BPE (no unknown tokens, any text round-trips)
with "<|endoftext|>" as id 0 and "<|padding|>" as id 1, as in GPT-NeoX. For the encoder tasks (MLM,
classification) it is a BERT-style WordPiece (cased) with [PAD], [UNK], [CLS], [SEP], [MASK] as ids 0 to 4 and
BERT's post-processor ([CLS] A [SEP], [CLS] A [SEP] B [SEP] with segment ids). Either is cached under
`<cache>/tokenizers/` by a hash of the text it was trained on, its kind and its vocabulary size, so a dataset
rebuilt with another block length reuses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import string
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from rafale.config import DataSettings, cache_root
from rafale.errors import RafaleError

if TYPE_CHECKING:
    from datasets import Dataset
    from tokenizers import Tokenizer

KEY = "data.config.tokenizer_path"
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
PAD_TOKENS = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")
TRAINED_SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]
# The kinds of tokenizer trained on the fly: the causal LM's, and the encoders' (which need [CLS], [SEP], [MASK]).
BPE, WORDPIECE = "byte-level-bpe", "wordpiece"
WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MASK_TOKENS = ("[MASK]", "<mask>")
# Per kind, bumped when the way it is trained changes, so that cached tokenizers and data are not reused.
# WordPiece 2: trained deterministically (_train_wordpiece).
TRAINER_VERSIONS = {BPE: 1, WORDPIECE: 2}


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


def trained_name(vocab_size: int, kind: str) -> str:
    """`bpe<vocab>` or `wordpiece<vocab>`: how a tokenizer of `kind` (BPE, WORDPIECE) trained on the fly is named."""
    return f"{'bpe' if kind == BPE else 'wordpiece'}{vocab_size}"


def tokenizer_name(settings: DataSettings, kind: str = BPE) -> str:
    """The readable name in the cache folder's name: configured, else from the path, else `bpe<vocab>` (or
    `wordpiece<vocab>`)."""
    if settings.tokenizer_name:
        return settings.tokenizer_name
    if settings.tokenizer_path is None:
        return trained_name(settings.vocab_size, kind)
    path = Path(settings.tokenizer_path)
    name = path.parent.name if path.name == "tokenizer.json" else path.stem if path.suffix == ".json" else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "tokenizer"


def tokenizer_identity(settings: DataSettings, kind: str = BPE) -> dict:
    """What identifies the tokenizer before it exists: the content of a file, a hub name, or how it is trained (a
    tokenizer of `kind`)."""
    if settings.tokenizer_path is None:
        return {"trained": kind, "vocab_size": settings.vocab_size, "version": TRAINER_VERSIONS[kind]}
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


def train_tokenizer(documents: Dataset, column: str, vocab_size: int, readable: str, kind: str = BPE) -> Tokenizer:
    """A tokenizer of `kind` trained on the documents' texts, or the cached one trained on the same texts."""
    from tokenizers import Tokenizer

    # The BPE's key predates the WordPiece: unchanged, so that tokenizers cached before stay valid.
    kind_suffix = "" if kind == BPE else f"-{kind}"
    text_hash = _text_hash(documents, column)
    key = hashlib.sha256(f"{text_hash}-{vocab_size}-{TRAINER_VERSIONS[kind]}{kind_suffix}".encode()).hexdigest()
    cached = cache_root() / "tokenizers" / f"{readable}_{key[:8]}.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    def batches() -> Iterator[list[str]]:
        return (batch[column] for batch in documents.iter(batch_size=1000))

    train = _train_byte_level_bpe if kind == BPE else _train_wordpiece
    tokenizer = train(batches, vocab_size, len(documents))
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tokenizer.save(str(partial))
    os.replace(partial, cached)
    return tokenizer


def _train_byte_level_bpe(batches: Callable[[], Iterator[list[str]]], vocab_size: int, length: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TRAINED_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(batches(), trainer=trainer, length=length)
    return tokenizer


# Where the stand-ins for continuation characters start: Unicode's supplementary private use area A.
PRIVATE_USE = 0xF0000


def _train_wordpiece(batches: Callable[[], Iterator[list[str]]], vocab_size: int, length: int) -> Tokenizer:
    """BERT's tokenizer, cased: split on whitespace and punctuation, then WordPiece with `##` continuations.

    Trained as `tokenizers`' WordPieceTrainer does it, a BPE over words whose characters after the first are
    symbols of their own (`##c`), but with the same result on every run: that trainer numbers the `##c` symbols in
    hash-map order, which changes from run to run, and breaks ties between equally frequent merges by those
    numbers, so the same texts gave other vocabularies (5-10 tokens of 869 on the synthetic stories). Here each
    `##c` is a private-use character, so that a plain BPE, which is deterministic, learns the merges; its tokens
    are then spelled back with `##`. Every character seen stays in the alphabet in both forms, as in the original.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()

    seen = set()
    for batch in batches():
        for text in batch:
            seen.update(tokenizer.normalizer.normalize_str(text))
    alphabet = sorted(char for char in seen if not char.isspace())
    # BERT's normalizer drops the texts' own private-use characters (clean_text): no stand-in can meet one.
    stand_ins = {ord(char): chr(PRIVATE_USE + i) for i, char in enumerate(alphabet)}
    # The words as BertPreTokenizer cuts them: runs of what is neither whitespace nor punctuation (ASCII
    # punctuation and Unicode's P categories), and each punctuation character alone.
    punctuation = "".join(re.escape(char) for char in alphabet if _is_bert_punctuation(char))
    words = re.compile(rf"[^\s{punctuation}]+|[{punctuation}]" if punctuation else r"\S+")
    # Most words recur: each is spelled with its stand-ins once.
    spellings: dict[str, str] = {}

    def with_stand_ins(word: str) -> str:
        spelling = spellings.get(word)
        if spelling is None:
            spelling = spellings[word] = word[0] + word[1:].translate(stand_ins)
        return spelling

    def texts_with_stand_ins() -> Iterator[list[str]]:
        for batch in batches():
            yield [
                " ".join([with_stand_ins(word) for word in words.findall(tokenizer.normalizer.normalize_str(text))])
                for text in batch
            ]

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(texts_with_stand_ins(), trainer=trainer, length=length)

    originals = {stand_in: chr(code) for code, stand_in in stand_ins.items()}

    def spelled(token: str) -> str:
        prefix = "##" if token[0] in originals else ""
        return prefix + "".join(originals.get(char, char) for char in token)

    vocab = {token if token in WORDPIECE_SPECIAL_TOKENS else spelled(token): i for token, i in bpe.get_vocab().items()}
    tokenizer.model = models.WordPiece(vocab, unk_token="[UNK]")
    tokenizer.add_special_tokens(WORDPIECE_SPECIAL_TOKENS)
    # The post-processor refers to the ids that training gave the special tokens.
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


def _is_bert_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def special_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids of the tokenizer's special tokens ([CLS], [SEP], [PAD], [MASK], ...), sorted."""
    return sorted(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)


def mask_token_id(tokenizer: Tokenizer, where: str) -> int:
    """The id of [MASK] or <mask>; masked language modelling cannot do without one."""
    mask = next((tokenizer.token_to_id(t) for t in MASK_TOKENS if tokenizer.token_to_id(t) is not None), None)
    if mask is None:
        raise RafaleError(f"{KEY}: {where} has no mask token ({', '.join(MASK_TOKENS)}), which MLM needs; use an "
                          f"encoder's tokenizer or leave {KEY} unset to train one")
    return mask


def wrapping_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens the post-processor puts around one text ([CLS] and [SEP], <s> and </s>,
    or none)."""
    encoding = tokenizer.encode("a", add_special_tokens=True)
    special = encoding.special_tokens_mask
    first = special.index(0)
    last = len(special) - special[::-1].index(0)
    return encoding.ids[:first], encoding.ids[last:]


# The tokens that play each part, by the names transformers' tokenizer_config.json gives the parts.
ROLE_TOKENS = {
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>"),
    "unk_token": ("[UNK]", "<unk>", "<|unk|>"),
    "cls_token": ("[CLS]", "<s>"),
    "sep_token": ("[SEP]", "</s>"),
    "mask_token": MASK_TOKENS,
}
DECODER_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
ENCODER_ROLES = ("cls_token", "sep_token", "mask_token", "pad_token", "unk_token")


def hf_tokenizer_config(tokenizer: Tokenizer, eos_id: int, pad_id: int, encoder: bool, max_length: int) -> dict:
    """tokenizer_config.json for an exported model: transformers' AutoTokenizer then uses tokenizer.json as it is
    (rather than rebuilding, say, a BertTokenizer from its vocabulary, which would lower-case), and knows which
    token plays which part. A decoder's BOS is the EOS where the tokenizer has no BOS of its own (GPT-NeoX)."""
    found = {role: next((t for t in names if tokenizer.token_to_id(t) is not None), None)
             for role, names in ROLE_TOKENS.items()}
    found["eos_token"] = tokenizer.id_to_token(eos_id)
    found["pad_token"] = tokenizer.id_to_token(pad_id)
    if not found["bos_token"]:
        found["bos_token"] = found["eos_token"]
    roles = {role: found[role] for role in (ENCODER_ROLES if encoder else DECODER_ROLES) if found[role]}
    # Segment ids only where the post-processor gives a pair's second text its own (BERT's, not RoBERTa's).
    segments = encoder and 1 in tokenizer.encode("a", "b").type_ids
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if segments else ["input_ids", "attention_mask"]
    return {"tokenizer_class": "PreTrainedTokenizerFast", **roles, "model_max_length": max_length,
            "model_input_names": inputs, "clean_up_tokenization_spaces": False}


def truncating_copy(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """A copy that truncates to `max_length` tokens, special tokens included (the longer text first in a pair);
    the original stays without truncation, as it is saved and exported."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.enable_truncation(max_length=max_length, strategy="longest_first")
    return copy
