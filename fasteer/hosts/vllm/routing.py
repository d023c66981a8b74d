"""Per-token slots from a vLLM runner's batch view, once per engine step.

vLLM flattens a step's tokens request after request: request ``i`` owns tokens
``query_start_loc[i] : query_start_loc[i + 1]``, and its first scheduled token sits at
position ``num_computed[i]`` of its sequence. A token is a *prompt* token while its
position is below the request's prompt length (the last one is the *last prompt* token)
and a *generated* token after that -- which is right under chunked prefill too, where a
prompt arrives over several steps. Its slot is ``lut[lut_row[i], class]``.

This is plain numpy on host arrays the runner already keeps (no device reads, no sync);
the result is copied into the preallocated slot buffer the carriers read, in place, so a
compiled or captured model sees new routing without a recompile or re-capture.

Two batch views are supported: vLLM's V1 runner (requests in batch order, arrays indexed
by batch row) and the V2 runner's (``idx_mapping``: batch row -> request-state index, the
arrays indexed by request-state index); `token_slots` takes the already-gathered arrays,
`gather_v2` does the V2 gather.
"""
from __future__ import annotations

import numpy as np

from fasteer.plan import CLASS_GENERATED, CLASS_LAST_PROMPT, CLASS_PROMPT


def token_classes(query_start_loc: np.ndarray, num_computed: np.ndarray,
                  prompt_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(request index, class) of every scheduled token, int64 [T] each.

    ``query_start_loc`` [R + 1] (cumulative token counts, starting at 0),
    ``num_computed`` [R] (tokens of the request already in its KV cache), ``prompt_len``
    [R]."""
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    counts = np.diff(qsl)
    if (counts < 0).any():
        raise ValueError("query_start_loc: must be non-decreasing")
    n_req = counts.shape[0]
    req = np.repeat(np.arange(n_req, dtype=np.int64), counts)
    offset = np.arange(int(qsl[-1] - qsl[0]), dtype=np.int64) - (qsl[req] - qsl[0])
    pos = np.asarray(num_computed, dtype=np.int64)[req] + offset
    plen = np.asarray(prompt_len, dtype=np.int64)[req]
    cls = np.where(pos >= plen, CLASS_GENERATED,
                   np.where(pos == plen - 1, CLASS_LAST_PROMPT, CLASS_PROMPT))
    return req, cls


def token_slots(lut: np.ndarray, lut_row: np.ndarray, query_start_loc: np.ndarray,
                num_computed: np.ndarray, prompt_len: np.ndarray) -> np.ndarray:
    """Slot of every scheduled token, int32 [T]: ``lut[lut_row[request], class]``.

    ``lut`` int32 [rows, >= 3] (the plan's lookup table, a last row of -1 for unsteered
    requests); ``lut_row`` [R]: each request's row."""
    req, cls = token_classes(query_start_loc, num_computed, prompt_len)
    rows = np.asarray(lut_row, dtype=np.int64)[req]
    return np.ascontiguousarray(np.asarray(lut)[rows, cls], dtype=np.int32)


def gather_v2(idx_mapping: np.ndarray, num_computed_by_state: np.ndarray,
              prompt_len_by_state: np.ndarray, lut_row_by_state: np.ndarray):
    """V2 runner: per-state arrays -> per-batch-row arrays (num_computed, prompt_len,
    lut_row), in the batch order ``idx_mapping`` gives."""
    idx = np.asarray(idx_mapping, dtype=np.int64)
    return (np.asarray(num_computed_by_state)[idx], np.asarray(prompt_len_by_state)[idx],
            np.asarray(lut_row_by_state)[idx])
