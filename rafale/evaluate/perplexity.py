"""Perplexity of a causal LM over documents, with the figures lm-evaluation-harness reports for `wikitext`.

Each document is encoded as training encoded it (no special tokens) and scored after a prefix token, the
end-of-text token that precedes every document in rafale's training stream (or the folder's BOS): the prefix is
context only, so every token of the document is predicted exactly once. Long documents are cut into windows of at
most `window` inputs. Disjoint windows (the default, stride = window) are lm-eval's `loglikelihood_rolling`; a
smaller stride is the overlapping variant of transformers' perplexity guide, each window scoring only the tokens
no earlier window scored. The last window of a document ends at its end and reaches back as far as the window
allows, so its tokens never see less context than they would in a fresh window.

Over all documents, with LL the summed log-likelihood (natural log):
token perplexity exp(-LL / predicted tokens), word perplexity exp(-LL / words) with words =
len(re.split(r"\\s+", document)), byte perplexity exp(-LL / UTF-8 bytes), bits per byte -LL / (bytes * ln 2).
Token perplexity depends on the tokenizer; the byte and word figures compare models across tokenizers.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from rafale.errors import RafaleError
from rafale.models.loss import IGNORE_INDEX

DATA_KEY = "--data"
# Rows per matmul of the LM head, as bytes of their fp32 logits. On a CPU the logits go into one buffer reused for
# every chunk and the log-softmax works in place: at pythia-14m's 50k vocabulary, 64 MB (about 330 rows) costs
# the head's matmul plus 5-10%, where fresh 32 MB chunks and torch.logsumexp's temporaries cost plus 40%
# (page faults and extra passes over memory; bench/RESULTS.md). Fewer rows make the matmul itself slower.
HEAD_CHUNK_BYTES = {"cuda": 256 << 20}
DEFAULT_HEAD_CHUNK_BYTES = 64 << 20

@dataclass(frozen=True)
class Window:
    """Inputs `tokens[begin:end]` of document `document` (its prefix included), scoring the targets
    `tokens[scored_from + 1 : end + 1]`, the positions from `scored_from - begin` of the window's outputs."""

    document: int
    begin: int
    end: int
    scored_from: int


def rolling_windows(document: int, length: int, window: int, stride: int) -> list[Window]:
    """The windows over a sequence of `length` ids (prefix included) that predict each of ids 1.. exactly once."""
    if not 0 < stride <= window:
        raise RafaleError(f"--stride: must be between 1 and the window ({window}); got {stride}")
    predicted = length - 1
    windows, scored, start = [], 0, 0
    while scored < predicted:
        begin = min(start, max(0, predicted - window))
        end = min(begin + window, predicted)
        windows.append(Window(document, begin, end, scored))
        scored, start = end, start + stride
    return windows


@dataclass
class Perplexity:
    """What `rafale eval` prints: the settings that shape the figures, the counts and the figures."""

    window: int
    stride: int
    prefix_token: str | None
    documents: int
    tokens: int
    bytes: int
    words: int
    log_likelihood: float
    token_perplexity: float
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        prefix = self.prefix_token if self.prefix_token is not None else "none (first token is context only)"
        kind = "disjoint" if self.stride == self.window else "overlapping"
        return [
            f"window {self.window}, stride {self.stride} ({kind}), prefix token {prefix}",
            f"documents {self.documents:,}, predicted tokens {self.tokens:,}, bytes {self.bytes:,}, "
            f"words {self.words:,}",
            f"log-likelihood   {self.log_likelihood:.4f}",
            f"token perplexity {self.token_perplexity:.4f}",
            f"word perplexity  {self.word_perplexity:.4f}",
            f"byte perplexity  {self.byte_perplexity:.4f}",
            f"bits per byte    {self.bits_per_byte:.4f}",
        ]


def count_words(document: str) -> int:
    """lm-eval's word count: the pieces between runs of whitespace."""
    return len(re.split(r"\s+", document))


def leading_documents(documents, max_bytes: int) -> list[str]:
    """The first non-empty documents, whole, while they total at most `max_bytes` of UTF-8; a first document
    longer than that is cut to it (on a character boundary)."""
    chosen, size = [], 0
    for document in documents:
        if not isinstance(document, str) or not document.strip():
            continue
        length = len(document.encode("utf-8"))
        if size + length > max_bytes:
            if not chosen:
                chosen.append(document.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))
            break
        chosen.append(document)
        size += length
    return chosen


def figures(log_likelihood: float, tokens: int, documents: list[str], **settings) -> Perplexity:
    """The figures of a summed log-likelihood over `documents` that predicted `tokens` tokens."""
    words = sum(count_words(document) for document in documents)
    size = sum(len(document.encode("utf-8")) for document in documents)
    return Perplexity(
        documents=len(documents), tokens=tokens, bytes=size, words=words, log_likelihood=log_likelihood,
        token_perplexity=math.exp(-log_likelihood / tokens), word_perplexity=math.exp(-log_likelihood / words),
        byte_perplexity=math.exp(-log_likelihood / size), bits_per_byte=-log_likelihood / (size * math.log(2)),
        **settings)


def head_chunks(hidden: torch.Tensor, head: torch.nn.Module):
    """(start, end, fp32 logits of rows start:end) of hidden states [N, H] under the LM head, a chunk of rows at a
    time so that the [N, vocab] logits never exist at once. An fp32 nn.Linear head writes every chunk into the same
    buffer, which the caller may overwrite (and must not keep); any other head runs its own forward."""
    vocab = head.weight.shape[0]
    rows = max(1, HEAD_CHUNK_BYTES.get(hidden.device.type, DEFAULT_HEAD_CHUNK_BYTES) // (4 * vocab))
    plain = type(head) is torch.nn.Linear and head.weight.dtype == hidden.dtype == torch.float32
    buffer = hidden.new_empty(min(rows, len(hidden)), vocab) if plain else None
    for start in range(0, len(hidden), rows):
        chunk = hidden[start:start + rows]
        if buffer is None:
            yield start, start + len(chunk), head(chunk).float()
            continue
        logits = buffer[:len(chunk)]
        if head.bias is None:
            torch.mm(chunk, head.weight.t(), out=logits)
        else:
            torch.addmm(head.bias, chunk, head.weight.t(), out=logits)
        yield start, start + len(chunk), logits


def target_log_probs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                     greedy: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target) [N] in fp32 for hidden states [N, H] under the LM head; `greedy` [N] (bool), when given, is
    filled with whether each target is the most likely token."""
    log_probs = torch.empty(len(targets), device=hidden.device)
    for start, end, logits in head_chunks(hidden, head):
        target = targets[start:end]
        chosen = logits.gather(-1, target[:, None])[:, 0]
        if greedy is None:
            top = logits.amax(-1)
        else:
            top, best = logits.max(-1)
            greedy[start:end] = best == target
        # log-softmax in place: the chunk's logits are not needed after this.
        log_probs[start:end] = chosen - top - logits.sub_(top[:, None]).exp_().sum(-1).log()
    return log_probs


@torch.inference_mode()
def document_log_likelihoods(model, sequences: list[list[int]], window: int, stride: int, batch_size: int,
                             progress: Callable[[int, int], None] | None = None,
                             context_lengths: list[int] | None = None) -> tuple[list[float], list[int]]:
    """(summed log-likelihood, predicted tokens) of each id sequence, its first id context only (its first
    `context_lengths[i]` ids, where given: a prompt whose answer is scored), scored in batches of right-padded
    windows (causal attention: padding after a window's ids never reaches them); the sums add fp32 log-probs in
    fp64."""
    device = model.lm_head.weight.device
    windows = [w for i, ids in enumerate(sequences) for w in rolling_windows(i, len(ids), window, stride)]
    # Longest first, so that each batch pads little and the first batch shows the peak memory.
    windows.sort(key=lambda w: w.end - w.begin, reverse=True)
    sums = torch.zeros(len(sequences), dtype=torch.float64)
    if progress is not None:
        progress(0, len(windows))
    counts = [0] * len(sequences)
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        width = batch[0].end - batch[0].begin
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, w in enumerate(batch):
            ids = torch.tensor(sequences[w.document][w.begin:w.end + 1])
            inputs[row, :w.end - w.begin] = ids[:-1]
            # Targets before the first one to score (a context's) are predicted by the window but not scored.
            first_target = context_lengths[w.document] if context_lengths is not None else 1
            skip = max(w.scored_from, first_target - 1) - w.begin
            labels[row, skip:w.end - w.begin] = ids[skip + 1:]
            counts[w.document] += max(0, w.end - w.begin - skip)
        labels = labels.to(device)
        scored = labels != IGNORE_INDEX
        # Only the scored positions go through the head: not the padding, nor an overlapping window's context.
        log_probs = target_log_probs(model.hidden_states(inputs.to(device))[scored], model.lm_head, labels[scored])
        rows = torch.tensor([w.document for w in batch], device=device)[:, None].expand_as(labels)[scored]
        sums.index_add_(0, rows.cpu(), log_probs.double().cpu())
        if progress is not None:
            progress(min(first + batch_size, len(windows)), len(windows))
    return sums.tolist(), counts


def prefix_id(folder: Path, tokenizer, prefix: str | None) -> tuple[int | None, str | None]:
    """(id, token) of the prefix: `prefix` itself ("none": no prefix), else the folder's BOS token
    (tokenizer_config.json; rafale's exports name the end-of-text token), else the end-of-text token."""
    import json

    from rafale.models.generate import find_eos

    if prefix == "none":
        return None, None
    if prefix is None:
        config_file = folder / "tokenizer_config.json"
        settings = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        bos = settings.get("bos_token")
        prefix = bos.get("content") if isinstance(bos, dict) else bos
    if prefix is None:
        eos = find_eos(tokenizer)
        if eos is None:
            raise RafaleError(f"{folder}: the tokenizer has no BOS or end-of-text token; name one with --prefix, "
                              f"or --prefix none")
        return eos, tokenizer.id_to_token(eos)
    token_id = tokenizer.token_to_id(prefix)
    if token_id is None:
        raise RafaleError(f"--prefix: {prefix!r} is not a token of {folder / 'tokenizer.json'}")
    return token_id, prefix


def read_documents(data: str, column: str, split: str | None) -> tuple[list[str], str]:
    """(non-empty documents, the split they came from) of a text/jsonl/json/parquet file, a folder of such files,
    a `save_to_disk` folder, a hub name or a bundled corpus (`synthetic:stories`), read as training reads them
    (rafale/data/sources.py: a .txt file's documents are separated by blank lines)."""
    import tempfile

    import datasets

    from rafale.config import DataSettings
    from rafale.data import sources

    # datasets' progress bars would interleave with the scoring's own progress line.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="rafale-eval-") as work_dir:
        try:
            raw = sources.load_raw(DataSettings(name="eval", dataset_path=data), Path(work_dir))
        except RafaleError as error:
            # The sources name the run file's key; here the same path came from the command line.
            raise RafaleError(str(error).replace(sources.KEY, DATA_KEY)) from None
        if split is None:
            split = next((name for name in ("test", "validation", "train") if name in raw), next(iter(raw)))
        if split not in raw:
            raise RafaleError(f"--split: {data} has no split {split!r}; splits: {', '.join(raw)}")
        names = raw[split].column_names
        if column not in names:
            raise RafaleError(f"--column: no column {column!r} in {data}; columns: {', '.join(names)}")
        documents = [text for text in raw[split][column] if isinstance(text, str) and text.strip()]
    if not documents:
        raise RafaleError(f"{DATA_KEY}: no documents in {data} (split {split!r}, column {column!r})")
    return documents, split


def progress_line() -> Callable[[int, int], None]:
    """A progress callback: one line on stderr, rewritten at most twice a second, ended after the last batch; the
    clock starts at the call for 0 done."""
    started = shown = time.monotonic()

    def show(done: int, total: int) -> None:
        nonlocal started, shown
        now = time.monotonic()
        if done == 0:
            started = now
        if 0 < done < total and now - shown < 0.5:
            return
        shown = now
        print(f"\rscoring: {done}/{total} windows, {now - started:.1f} s", end="\n" if done == total else "",
              file=sys.stderr, flush=True)

    return show


def checked_window(model, window: int | None) -> int:
    """The window (default: the model's max_position_embeddings), once the model is known to be a causal LM that
    has positions for it."""
    from rafale.models.decoder import Decoder

    if not isinstance(model, Decoder):
        raise RafaleError("eval: perplexity needs a causal LM (a Pythia or Llama folder), not an encoder")
    positions = model.config.max_position_embeddings
    if window is not None and window > positions:
        raise RafaleError(f"--window: {window} is more than the model's max_position_embeddings ({positions})")
    return window or positions


def evaluate_perplexity(model, tokenizer, documents: list[str], prefix: int | None, prefix_token: str | None,
                        window: int | None = None, stride: int | None = None, batch_size: int = 8,
                        progress: Callable[[int, int], None] | None = None,
                        contexts: list[str] | None = None) -> Perplexity:
    """The figures of `documents` under a decoder and its tokenizer; `window` defaults to the model's positions.
    With `contexts` (one per document: a prompt), each document is scored after its context, encoded on its own,
    which is context only: the figures are those of the documents given their contexts."""
    window = checked_window(model, window)
    stride = stride or window
    encoded = [encoding.ids for encoding in tokenizer.encode_batch_fast(documents, add_special_tokens=False)]
    before = [[prefix] if prefix is not None else [] for _ in documents]
    if contexts is not None:
        encoded_contexts = tokenizer.encode_batch_fast(contexts, add_special_tokens=False)
        before = [ids + encoding.ids for ids, encoding in zip(before, encoded_contexts)]
    sequences = [context + ids for context, ids in zip(before, encoded)]
    context_lengths = [max(1, len(context)) for context in before]
    sums, counts = document_log_likelihoods(model, sequences, window, stride, batch_size, progress, context_lengths)
    tokens = sum(counts)
    if tokens == 0:
        raise RafaleError(f"{DATA_KEY}: nothing to predict (every document is one token and there is no prefix)")
    return figures(sum(sums), tokens, documents, window=window, stride=stride, prefix_token=prefix_token)


def evaluate_folder(path: str | Path, data: str, column: str = "text", split: str | None = None,
                    prefix: str | None = None, window: int | None = None, stride: int | None = None,
                    batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> tuple[Perplexity, str]:
    """(figures, split) of `data` under the model of a Hugging Face folder or a run folder (`rafale eval`)."""
    from rafale.models.generate import load_folder

    if window is not None and window < 1 or stride is not None and stride < 1 or batch_size < 1:
        raise RafaleError("--window, --stride and --batch-size must be positive")
    folder, model, tokenizer = load_folder(path)
    # Every check that needs only the model comes before the documents are read, which may take long.
    checked_window(model, window)
    prefix_ids = prefix_id(folder, tokenizer, prefix)
    documents, split = read_documents(data, column, split)
    return evaluate_perplexity(model, tokenizer, documents, *prefix_ids, window, stride, batch_size, progress), split
