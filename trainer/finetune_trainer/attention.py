"""Document-causal attention for `packingStrategy: documents` on sdpa: each document of a packed
row attends only to itself, computed as one causal sdpa call per document instead of one call
over the whole row through a dense block-diagonal mask.

Why: with position ids restarting per document and no attention mask, transformers builds a
block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`) and sdpa attends the
whole row through it. An explicit mask costs sdpa its causal fast path (on CPU its backward is
the slow part), and the masked-out blocks are still computed. Split per document, the work is
the sum of the squares of the document lengths, not the square of the row, and every call is a
plain `is_causal` one. The result is the same attention (tested against the masked sdpa and
against each document evaluated alone).

How: `document_causal_sdpa` is registered with transformers' AttentionInterface under
`DOCUMENT_SDPA`, and transformers' sdpa mask under the same name, so the mask is still built.
The function falls back to plain masked sdpa whenever it cannot read the documents from the
call: a model whose attention is not handed `position_ids` (GPT-2), a sliding window, softcap,
a position bias or any other argument it does not know, a key/value cache, a non-causal module.
So a model can only get slower than the split, never different. `use_document_attention` moves
a model from "sdpa" to it; flash attention keeps its own variable-length kernel; eager and flex
are left alone. Not saved with the model: transformers does not serialise the implementation.
One code path for CPU and GPU.

Called by `train` for the trained model and the baselines when the packing mode is
`documents`. Imports torch and transformers (the trainer's side only).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

log = logging.getLogger(__name__)

DOCUMENT_SDPA = "sdpa_documents"
# Arguments the split passes on to sdpa as they are, and those it can only honour unset (None or
# False); with any other argument the call goes to plain sdpa.
_PASSED_ON = frozenset({"dropout", "scaling", "use_cache", "cache_position"})
_UNSET_ONLY = frozenset({"output_attentions", "sliding_window", "softcap", "position_bias", "cache", "s_aux"})


def document_causal_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [batch, heads, length, dim], key and value
    [batch, kv heads, length, dim]; returns [batch, length, heads, dim] like sdpa_attention_forward."""
    if not _splittable(module, query, key, position_ids, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    assert position_ids is not None
    kwargs.pop("is_causal", None)
    rows = document_bounds(position_ids, query.shape[0])
    if all(len(bounds) == 2 for bounds in rows):  # one document a row: one causal call
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    outputs = []
    for row, bounds in enumerate(rows):
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
        pieces = [
            sdpa_attention_forward(
                module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, is_causal=True, **kwargs
            )[0]
            for a, b in itertools.pairwise(bounds)
        ]
        outputs.append(torch.cat(pieces, dim=1))
    return torch.cat(outputs, dim=0), None


def _splittable(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    position_ids: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> bool:
    if position_ids is None or position_ids.ndim != 2 or not getattr(module, "is_causal", True):
        return False
    if query.shape[2] != key.shape[2] or position_ids.shape[-1] != query.shape[2]:
        return False  # a cache (generation), or positions of another length
    if kwargs.get("is_causal") is False:
        return False
    return all(
        name == "is_causal"
        or name in _PASSED_ON
        or (name in _UNSET_ONLY and (value is None or value is False))
        for name, value in kwargs.items()
    )


_last_bounds: tuple[weakref.ref[torch.Tensor], int, list[tuple[int, ...]]] | None = None


def document_bounds(position_ids: torch.Tensor, batch: int) -> list[tuple[int, ...]]:
    """Per row, the offsets where a document begins (where the position does not follow the one
    before: transformers' own rule) and the row's length. Computed once per forward pass: every
    layer gets the same position_ids tensor."""
    global _last_bounds
    if _last_bounds is not None:
        ref, version, bounds = _last_bounds
        if ref() is position_ids and version == position_ids._version and len(bounds) == batch:
            return bounds
    rows = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    length = rows.shape[-1]
    begins = torch.ones_like(rows, dtype=torch.bool)
    begins[:, 1:] = rows[:, 1:] != rows[:, :-1] + 1
    starts = begins.nonzero().tolist()
    bounds_lists: list[list[int]] = [[] for _ in range(batch)]
    for row, offset in starts:
        bounds_lists[row].append(offset)
    bounds = [(*b, length) for b in bounds_lists]
    _last_bounds = (weakref.ref(position_ids), position_ids._version, bounds)
    return bounds


def register() -> None:
    """Make `DOCUMENT_SDPA` a name transformers knows (idempotent)."""
    AttentionInterface.register(DOCUMENT_SDPA, document_causal_sdpa)
    AttentionMaskInterface.register(DOCUMENT_SDPA, sdpa_mask)


def use_document_attention(model: Any) -> bool:
    """Move `model` from sdpa to document-causal sdpa; True if it now uses it. Other
    implementations are kept (flash attention has its own variable-length kernel), and a model
    that cannot change its implementation (no AttentionInterface) keeps sdpa's dense mask."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    try:
        model.set_attn_implementation(DOCUMENT_SDPA)
    except (ValueError, ImportError) as exc:
        log.info("document-causal sdpa not used for %s: %s", type(model).__name__, exc)
        return False
    return bool(model.config._attn_implementation == DOCUMENT_SDPA)
