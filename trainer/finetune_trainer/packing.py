"""Sequences cut from memory-mapped token shards: the map-style dataset the loop reads and its
collator (the loop's order of them is `loop.step_indices`).

Called by `data` (which builds them) and by the training loop and `evaluation` (which read
them). The three packing modes (`dataset.packing`, `dataset.packingStrategy`):

- `concatenate` (packing: true, strategy concatenate): documents are concatenated (each ends
  with EOS) and cut into blocks of sequenceLength tokens; a block attends across the documents
  in it, and the first token of a document is predicted from the previous document's EOS.
- `documents` (packing: true, strategy documents): the same blocks, but position ids restart at
  every document (and at every block start), the first token of each document carries no loss,
  and the collator sends no attention mask, so transformers builds a block-diagonal causal mask
  (eager, flex) or uses the varlen kernel (flash attention, with `flatten=True`); on sdpa the
  trainer gives each document its own causal call (`attention.document_causal_sdpa`): no token
  attends across a document boundary. The loss of a block equals the token-weighted loss of its
  documents evaluated alone.
- `none` (packing: false): one document per sequence, a document longer than sequenceLength
  split into several, never truncated. Training batches are length-grouped (`loop.step_indices`)
  and padded, except where the attention has a variable-length kernel (flash attention,
  `collator_for`): there the collator lays a batch's sequences end to end in one row with
  restarting position ids, so no compute is spent on pads. Both have the same loss.

Sequences with no trained token are dropped (they carry no loss). The index of a dataset is
two arrays (start, length) over the selected documents; the tokens are read on access, so a
process's memory does not grow with the corpus.

Numpy only at import; torch is imported by the collator when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from finetune_trainer.shards import TokenStore

IGNORE = -100
PackingMode = Literal["concatenate", "documents", "none"]


@dataclass(frozen=True)
class SequenceIndex:
    """Where each sequence lies in the virtual token stream of the selected documents."""

    starts: np.ndarray[Any, Any]  # int64, virtual token offset
    lengths: np.ndarray[Any, Any]  # int64
    trained: np.ndarray[Any, Any]  # int64, tokens that carry loss (targets), per sequence


class TokenDataset:
    """A map-style dataset (torch's Dataset protocol) of the sequences of some documents of a
    token store. Item i is {"input_ids", "labels", "position_ids"} as int64 numpy arrays."""

    def __init__(
        self, store: TokenStore, documents: np.ndarray[Any, Any], *, length: int, mode: PackingMode
    ) -> None:
        self.store = store
        self.mode: PackingMode = mode
        self.length = length
        self.doc_ids = np.asarray(documents, dtype=np.int64)
        selected = store.doc_lengths[self.doc_ids]
        self.virtual_starts = np.zeros(len(selected) + 1, dtype=np.int64)
        np.cumsum(selected, out=self.virtual_starts[1:])
        self.index = self._build_index(selected)

    @property
    def documents(self) -> int:
        return len(self.doc_ids)

    def __len__(self) -> int:
        return len(self.index.starts)

    def trained_tokens(self) -> int:
        return int(self.index.trained.sum())

    def total_tokens(self) -> int:
        return int(self.index.lengths.sum())

    def __getitem__(self, index: int) -> dict[str, np.ndarray[Any, Any]]:
        start = int(self.index.starts[index])
        ids, labels, pieces = self._read(start, start + int(self.index.lengths[index]))
        if self.mode == "documents":
            labels[pieces] = IGNORE  # the first token of a document is not predicted from another
            positions = _restarting_positions(pieces, len(ids))
        else:
            positions = np.arange(len(ids), dtype=np.int64)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    # ---- internals ---------------------------------------------------------------------------
    def _read(
        self, start: int, end: int
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Ids, labels and the offsets where each document piece begins, of virtual [start, end)."""
        d = int(np.searchsorted(self.virtual_starts, start, side="right")) - 1
        ids_parts, label_parts, pieces = [], [], []
        position = start
        while position < end:
            doc_end = int(self.virtual_starts[d + 1])
            take_end = min(end, doc_end)
            physical = int(self.store.doc_starts[self.doc_ids[d]]) + (position - int(self.virtual_starts[d]))
            ids, mask = self.store.span(physical, physical + (take_end - position))
            pieces.append(position - start)
            ids_parts.append(ids)
            label_parts.append(ids.copy() if mask is None else np.where(mask, ids, IGNORE))
            position = take_end
            d += 1
        return np.concatenate(ids_parts), np.concatenate(label_parts), np.asarray(pieces, dtype=np.int64)

    def _build_index(self, selected: np.ndarray[Any, Any]) -> SequenceIndex:
        total = int(self.virtual_starts[-1])
        length = self.length
        if self.mode == "none":
            chunks = -(-selected // length)
            doc_of_chunk = np.repeat(np.arange(len(selected)), chunks)
            first_chunk = np.repeat(np.cumsum(chunks) - chunks, chunks)
            within = (np.arange(len(doc_of_chunk)) - first_chunk) * length
            starts = self.virtual_starts[:-1][doc_of_chunk] + within
            lengths = np.minimum(length, selected[doc_of_chunk] - within)
            pieces = np.ones(len(starts), dtype=np.int64)
        else:
            starts = np.arange(0, total, length, dtype=np.int64)
            lengths = np.minimum(length, total - starts)
            if self.mode == "documents":
                # documents that begin inside each block, plus the block's own first piece
                begins = np.searchsorted(
                    self.virtual_starts[:-1], starts + lengths, side="left"
                ) - np.searchsorted(self.virtual_starts[:-1], starts, side="right")
                pieces = begins + 1
            else:
                pieces = np.ones(len(starts), dtype=np.int64)
        if self.store.masked:
            trained = np.asarray(self._masked_trained(starts, lengths), dtype=np.int64)
        else:
            trained = (lengths - pieces).astype(np.int64)
        keep = trained > 0
        return SequenceIndex(starts[keep], lengths[keep].astype(np.int64), trained[keep])

    def _masked_trained(self, starts: np.ndarray[Any, Any], lengths: np.ndarray[Any, Any]) -> list[int]:
        """Trained targets per sequence when some tokens are masked: read once, sequence by sequence."""
        out = []
        for start, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            _, labels, pieces = self._read(start, start + n)
            if self.mode == "documents":
                labels[pieces] = IGNORE
            out.append(int((labels[1:] != IGNORE).sum()))
        return out


def _restarting_positions(pieces: np.ndarray[Any, Any], total: int) -> np.ndarray[Any, Any]:
    """0, 1, … restarting at each offset in `pieces` (sorted, starting with 0)."""
    positions = np.arange(total, dtype=np.int64)
    bounds = np.append(pieces, total)
    restarting: np.ndarray[Any, Any] = positions - np.repeat(pieces, np.diff(bounds))
    return restarting


@dataclass
class Collator:
    """Makes a batch of `input_ids`, `labels` (IGNORE where no loss) and, by mode:

    - concatenate: padded to the longest sequence, with `attention_mask`;
    - documents: padded, with `position_ids` restarting per document and no attention mask (the
      padding is one more document, carrying no loss); `flatten=True` lays the rows end to end in
      one row (what flash attention's varlen path needs);
    - none: padding-free, the sequences end to end in one row with restarting `position_ids`;
      `padded=True` pads instead (the reference the padding-free loss is compared with).

    Every key is meant for the model: the loop passes the batch through as is."""

    pad_id: int
    mode: PackingMode = "concatenate"
    padded: bool = False
    flatten: bool = False

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        items = [{k: np.asarray(v, dtype=np.int64) for k, v in item.items()} for item in batch]
        for item in items:
            if "position_ids" not in item:
                item["position_ids"] = np.arange(len(item["input_ids"]), dtype=np.int64)
        if (self.mode == "none" and not self.padded) or (self.mode == "documents" and self.flatten):
            ids = np.concatenate([i["input_ids"] for i in items])
            labels = np.concatenate([_first_ignored(i["labels"]) for i in items])
            positions = np.concatenate([i["position_ids"] for i in items])
            return {
                "input_ids": torch.from_numpy(ids)[None],
                "labels": torch.from_numpy(labels)[None],
                "position_ids": torch.from_numpy(positions)[None],
            }
        width = max(len(i["input_ids"]) for i in items)
        ids_t = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels_t = torch.full((len(items), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        positions_t = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids_t[row, :n] = torch.from_numpy(item["input_ids"])
            labels_t[row, :n] = torch.from_numpy(item["labels"])
            mask[row, :n] = 1
            positions_t[row, :n] = torch.from_numpy(item["position_ids"])
            positions_t[row, n:] = torch.arange(width - n)
        if self.mode == "documents":
            return {"input_ids": ids_t, "labels": labels_t, "position_ids": positions_t}
        return {"input_ids": ids_t, "labels": labels_t, "attention_mask": mask}


def collator_for(pad_id: int, mode: PackingMode, attention: str | None) -> Collator:
    """The collator the trainer uses for a model whose attention implementation is `attention`
    (`config._attn_implementation`): `packing: false` batches are laid end to end in one row
    only for flash attention, which has a variable-length kernel. sdpa, eager and flex attend
    such a row through a dense block-diagonal mask over the whole row — attention work quadratic
    in the row, not in each sequence — so length-grouped padded rows cost less there (measured in
    bench/data_bench.py)."""
    varlen = attention is not None and attention.startswith("flash_attention")
    return Collator(pad_id, mode=mode, padded=not varlen)


def _first_ignored(labels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Labels of a sequence laid after another in one row: its first token is no target there
    (in its own row it never was one)."""
    out = labels.copy()
    out[0] = IGNORE
    return out
