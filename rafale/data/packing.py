"""Packing whole documents into rows: best-fit decreasing, and the rows it makes.

A row of `capacity` token slots holds whole documents (a document never spans two rows), each tagged with its
document id (1, 2, ... within the row; 0 is padding), so that attention stays inside a document and positions
restart at each one (models/masks.py) and no label predicts across a boundary (tasks/causal_lm.py). Best-fit
decreasing: the documents, longest first (ties by their order), each go to the row whose free space fits them most
tightly, or to a new row. The same lengths give the same rows on every machine.

A build packs a split `packing_window_documents` documents at a time (`packed_windows`): each window of documents,
in the split's order, is packed on its own, so that memory follows that setting and not the corpus. A split that
fits in one window is packed exactly as a whole; a larger one leaves at most a few partly filled rows per window.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

if TYPE_CHECKING:
    from rafale.data.cache import PreparedData

# The column of packed rows that numbers each token's document (1, 2, ... in the row; 0 is padding).
DOCUMENT_IDS = "document_ids"


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The documents (by index) that each row holds, in the order they were placed; every length <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # (free space, row index) of every row, sorted: the tightest row that fits is the first with enough space.
    free: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"document {index} has {length} tokens, more than a row's {capacity}")
        at = bisect.bisect_left(free, (length, -1))
        if at == len(free):
            rows.append([index])
            bisect.insort(free, (capacity - length, len(rows) - 1))
            continue
        space, row = free.pop(at)
        rows[row].append(index)
        bisect.insort(free, (space - length, row))
    return rows


def packed_rows(ids: list[list[int]], capacity: int, labels: Optional[list[list[int]]] = None) -> dict[str, list]:
    """Rows of whole documents: {"input_ids", "document_ids"[, "labels"]}, each row at most `capacity` long."""
    rows: dict[str, list] = {"input_ids": [], DOCUMENT_IDS: []}
    if labels is not None:
        rows["labels"] = []
    for members in best_fit_decreasing([len(document) for document in ids], capacity):
        rows["input_ids"].append([token for i in members for token in ids[i]])
        rows[DOCUMENT_IDS].append([number for number, i in enumerate(members, start=1) for _ in ids[i]])
        if labels is not None:
            rows["labels"].append([label for i in members for label in labels[i]])
    return rows


def packed_windows(documents: Iterable[tuple[list[int], Optional[list[int]]]], capacity: int, window: int
                   ) -> Iterator[dict[str, list[int]]]:
    """Rows of whole documents ({"input_ids", "document_ids"[, "labels"]} each) from (ids, labels or None) pairs,
    best-fit decreasing within each window of `window` documents, the windows' rows one after the other."""
    held: list[tuple[list[int], Optional[list[int]]]] = []

    def rows() -> Iterator[dict[str, list[int]]]:
        labels = [document_labels for _, document_labels in held] if held[0][1] is not None else None
        packed = packed_rows([ids for ids, _ in held], capacity, labels)
        for i in range(len(packed["input_ids"])):
            yield {name: column[i] for name, column in packed.items()}

    for document in documents:
        held.append(document)
        if len(held) == window:
            yield from rows()
            held = []
    if held:
        yield from rows()


def efficiency_lines(prepared: PreparedData) -> list[str]:
    """The summary's line on packing: how full the train rows are (real tokens over row slots)."""
    packing = prepared.meta.get("packing")
    if not packing:
        return []
    train = prepared.summary["train"]
    share = train["tokens"] / max(1, train["blocks"] * packing["row_length"])
    return [f"  packing    {packing['mode']}: {100 * share:.1f}% of the train rows' slots hold tokens"]
