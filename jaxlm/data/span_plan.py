"""Span corruption (T5) before any random draw: example lengths, the piece length, and the plan of
which pieces go into which row.

An example's noise token count and noise span count depend only on its raw length L (T5's
`random_spans_noise_mask`): noise = round(L * density) clipped to [1, L - 1], spans =
max(1, round(noise / mean_span)) (also kept <= L - noise, so every non-noise part is non-empty
where T5 would emit empty ones). Its encoder input is L - noise + spans + 1 tokens (a sentinel per
span, eos), its target noise + spans + 1. So the whole packing plan is computed once, vectorised,
when a dataset is built; reading a batch only draws where the spans fall.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxlm.config import ConfigError

MIN_PIECE = 2  # a piece needs a noise and a non-noise token; shorter ones are dropped
WALK_CHUNK = 1 << 20  # pieces per step of the row walk (bounds its Python-list memory)


def noise_counts(length_P: np.ndarray, density: float, mean_span: float):
    """(noise tokens, noise spans) of examples of raw length length_P (>= 2), as T5 rounds."""
    length_P = np.asarray(length_P, np.int64)
    noise_P = np.clip(np.rint(length_P * density).astype(np.int64), 1, length_P - 1)
    spans_P = np.clip(np.rint(noise_P / mean_span).astype(np.int64), 1, length_P - noise_P)
    return noise_P, spans_P


def example_lengths(length_P: np.ndarray, density: float, mean_span: float):
    """(encoder, decoder) lengths of examples of raw length length_P, eos included."""
    noise_P, spans_P = noise_counts(length_P, density, mean_span)
    return np.asarray(length_P) - noise_P + spans_P + 1, noise_P + spans_P + 1


@dataclass(frozen=True)
class SpanLengths:
    seq_len: int      # S: encoder length of a row
    target_len: int   # T: decoder length of a row
    piece_len: int    # L: the longest raw piece whose encoder input fits S
    max_spans: int    # noise spans of a full piece: the sentinels an example can need
    noise_density: float
    mean_span: float


def span_lengths(seq_len: int, target_len: int, density: float, mean_span: float) -> SpanLengths:
    """L is the largest raw length whose encoder input fits seq_len (T5's random_spans_helper);
    target_len 0 means the decoder length of such a full piece (512 -> 114 at 0.15 and 3)."""
    # enc(L) >= L * (1 - density) + 1.5, so no L beyond this bound fits; enc is non-decreasing
    length_L = np.arange(MIN_PIECE, int(seq_len / (1 - density)) + 3)
    enc_L, dec_L = example_lengths(length_L, density, mean_span)
    fits_L = enc_L <= seq_len
    settings = f"data.noise_density={density}, data.mean_noise_span_length={mean_span}"
    if not fits_L.any():
        raise ConfigError(f"data.seq_len={seq_len} is too small for span corruption: the "
                          f"shortest example ({MIN_PIECE} tokens) needs {enc_L[0]} encoder tokens "
                          f"({settings})")
    last = int(np.flatnonzero(fits_L)[-1])
    piece_len, full_dec = int(length_L[last]), int(dec_L[last])
    if target_len and target_len < full_dec:
        raise ConfigError(f"data.target_len={target_len} is too small: a full piece of "
                          f"{piece_len} tokens (the longest whose encoder input fits "
                          f"data.seq_len={seq_len} at {settings}) needs {full_dec} decoder "
                          f"tokens; set data.target_len >= {full_dec}, or 0 to derive it")
    _, spans = noise_counts(np.array([piece_len]), density, mean_span)
    return SpanLengths(seq_len, target_len or full_dec, piece_len, int(spans[0]), density,
                       mean_span)


def cut_pieces(doc_starts_D: np.ndarray, raw_len_D: np.ndarray, piece_len: int):
    """(start_P, length_P) of each document cut into consecutive pieces of piece_len tokens (the
    last one shorter), in stream order; pieces under MIN_PIECE tokens are dropped."""
    raw_len_D = np.asarray(raw_len_D, np.int64)
    count_D = -(-raw_len_D // piece_len)
    doc_P = np.repeat(np.arange(len(raw_len_D)), count_D)
    first_P = np.repeat(np.cumsum(count_D) - count_D, count_D)
    offset_P = (np.arange(len(doc_P)) - first_P) * piece_len
    start_P = np.asarray(doc_starts_D, np.int64)[doc_P] + offset_P
    length_P = np.minimum(piece_len, raw_len_D[doc_P] - offset_P)
    keep_P = length_P >= MIN_PIECE
    return start_P[keep_P], length_P[keep_P]


def pack_rows(enc_P: np.ndarray, dec_P: np.ndarray, seq_len: int, target_len: int) -> np.ndarray:
    """Greedy packing of consecutive examples into rows whose encoder side fits seq_len and
    decoder side target_len. Returns row_first_R1: row r holds pieces
    [row_first_R1[r], row_first_R1[r + 1])."""
    num = len(enc_P)
    cum_enc = np.concatenate([[0], np.cumsum(enc_P, dtype=np.int64)])
    cum_dec = np.concatenate([[0], np.cumsum(dec_P, dtype=np.int64)])
    # next_P[p]: the first piece of the following row, were a row to start at p (> p: every
    # piece fits a row on its own)
    next_P = np.minimum(np.searchsorted(cum_enc, cum_enc[:-1] + seq_len, side="right"),
                        np.searchsorted(cum_dec, cum_dec[:-1] + target_len, side="right")) - 1
    if num and (next_P <= np.arange(num)).any():
        raise ValueError("a piece does not fit a row on its own")
    firsts, p = [], 0
    for lo in range(0, num, WALK_CHUNK):  # the chain of row starts only moves forward
        nxt = next_P[lo:lo + WALK_CHUNK].tolist()
        while p < lo + len(nxt):
            firsts.append(p)
            p = nxt[p - lo]
    return np.array(firsts + [num], dtype=np.int64)
