"""Span corruption rows (T5): packed encoder/decoder examples with random noise spans.

An example is a piece of one document (span_plan.py: its length, and which pieces share a row).
Its noise and non-noise lengths are each a random partition into `spans` positive parts,
alternating non-noise, noise, starting with non-noise (T5's `random_spans_noise_mask`), drawn from
a generator seeded by (seed, split, source, piece id) alone. Encoder input: the non-noise tokens
with each noise span replaced by one sentinel (sentinel i for the i-th span), then eos. Targets:
each noise span preceded by its sentinel, then eos; decoder inputs: the targets shifted right
within the example, starting with the decoder start id (pad, as in T5). Example k of a row has
segment id k (1-based) on both sides and positions restarting at 0; after the last example the
row is padding (pad id, segment 0, loss_mask 0).
"""
from __future__ import annotations

import numpy as np

from jaxlm.data.packing import PackedDataset, SyntheticDataset, check_rows, field_specs, \
    seeded_rng
from jaxlm.data.span_plan import SpanLengths, cut_pieces, example_lengths, noise_counts, \
    pack_rows
from jaxlm.data.special_ids import SpecialIds

SPAN_TAG = 0x7370616E  # keeps the span draws apart from every other seeded stream
ENCODER_FIELDS = ("inputs", "positions", "segment_ids")
DECODER_FIELDS = ("decoder_inputs", "targets", "decoder_positions", "decoder_segment_ids",
                  "loss_mask")


def _exclusive_cumsum(x_N: np.ndarray) -> np.ndarray:
    return np.cumsum(x_N) - x_N


def _ranges(first_N: np.ndarray, count_N: np.ndarray) -> np.ndarray:
    """Concatenated aranges [first_N[n], first_N[n] + count_N[n])."""
    return np.repeat(first_N - _exclusive_cumsum(count_N), count_N) + np.arange(count_N.sum())


class StreamPieces:
    """Pieces of the documents of a packed token stream, packed greedily into rows."""
    iid_rows = False

    def __init__(self, rows: PackedDataset, lengths: SpanLengths, eos_id: int):
        tokens_N, starts_D = rows.tokens_N, rows.doc_starts_D
        ends_D = np.append(starts_D[1:], len(tokens_N)).astype(np.int64)
        raw_len_D = ends_D - starts_D
        if len(ends_D):  # documents end in eos (a token file's last one may not)
            raw_len_D -= np.asarray(tokens_N[np.maximum(ends_D - 1, 0)]) == eos_id
        self.tokens_N = tokens_N
        self.start_P, self.length_P = cut_pieces(starts_D, raw_len_D, lengths.piece_len)
        enc_P, dec_P = example_lengths(self.length_P, lengths.noise_density, lengths.mean_span)
        self.row_first_R1 = pack_rows(enc_P, dec_P, lengths.seq_len, lengths.target_len)
        self.num_rows = len(self.row_first_R1) - 1

    def take(self, rows_B: np.ndarray):
        """(piece ids, batch row of each, raw lengths, raw tokens concatenated) of the rows."""
        first_B = self.row_first_R1[rows_B]
        count_B = self.row_first_R1[rows_B + 1] - first_B
        pid_Q = _ranges(first_B, count_B)
        length_Q = self.length_P[pid_Q]
        tokens_X = np.asarray(self.tokens_N[_ranges(self.start_P[pid_Q], length_Q)], np.int32)
        return pid_Q, np.repeat(np.arange(len(rows_B)), count_B), length_Q, tokens_X


class SyntheticPieces:
    """One full-length piece of random tokens per row (piece id = row id), for benchmarks."""
    iid_rows = True

    def __init__(self, rows: SyntheticDataset, lengths: SpanLengths):
        self.rows = SyntheticDataset(rows.vocab_size, lengths.piece_len - 1, rows.seed,
                                     rows.split, rows.num_rows, rows.reserved_top)
        self.num_rows, self.piece_len = rows.num_rows, lengths.piece_len

    def take(self, rows_B: np.ndarray):
        B = len(rows_B)
        return (rows_B, np.arange(B), np.full(B, self.piece_len, np.int64),
                self.rows.tokens(rows_B).reshape(-1))


class SpanCorruptionDataset:
    """Encoder fields inputs, positions, segment_ids [B, S]; decoder fields decoder_inputs,
    targets, decoder_positions, decoder_segment_ids, loss_mask [B, T]."""

    def __init__(self, base: PackedDataset | SyntheticDataset, lengths: SpanLengths,
                 specials: SpecialIds, seed: int, split: int, source: int = 0):
        if len(specials.sentinel_ids_K) < lengths.max_spans:
            raise ValueError(f"span corruption needs {lengths.max_spans} sentinel ids")
        self.pieces = (SyntheticPieces(base, lengths) if isinstance(base, SyntheticDataset)
                       else StreamPieces(base, lengths, specials.eos_id))
        self.lengths, self.specials, self.key = lengths, specials, (seed, SPAN_TAG, split, source)
        self.seq_len, self.target_len = lengths.seq_len, lengths.target_len
        self.num_rows, self.iid_rows = self.pieces.num_rows, self.pieces.iid_rows
        self.fields = {**field_specs(ENCODER_FIELDS, self.seq_len),
                       **field_specs(DECODER_FIELDS, self.target_len)}

    def __len__(self) -> int:
        return self.num_rows

    def noise_spans(self, pid_Q: np.ndarray, length_Q: np.ndarray, noise_Q: np.ndarray,
                    spans_Q: np.ndarray) -> np.ndarray:
        """Interleaved span lengths (non-noise, noise, non-noise, ...) of every piece,
        concatenated: [2 * spans_Q.sum()]; piece q's from its own seeded generator."""
        lengths_2K = np.empty(2 * int(spans_Q.sum()), np.int64)
        at = 0
        for pid, n, noise, k in zip(pid_Q.tolist(), length_Q.tolist(), noise_Q.tolist(),
                                    spans_Q.tolist()):
            rng = seeded_rng(*self.key, pid)
            lengths_2K[at + 1:at + 2 * k:2] = _partition(rng, noise, k)
            lengths_2K[at:at + 2 * k:2] = _partition(rng, n - noise, k)
            at += 2 * k
        return lengths_2K

    def get(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        rows_B = check_rows(row_ids, self.num_rows)
        pid_Q, b_Q, length_Q, tokens_X = self.pieces.take(rows_B)
        L, sp = self.lengths, self.specials
        noise_Q, spans_Q = noise_counts(length_Q, L.noise_density, L.mean_span)
        enc_Q, dec_Q = length_Q - noise_Q + spans_Q + 1, noise_Q + spans_Q + 1
        # Each example's slot in its row and where it starts there (rows hold consecutive ones).
        row_first_Q = np.searchsorted(b_Q, b_Q)
        slot_Q = np.arange(len(b_Q)) - row_first_Q
        enc_at_Q = _exclusive_cumsum(enc_Q)
        enc_at_Q -= enc_at_Q[row_first_Q]
        dec_at_Q = _exclusive_cumsum(dec_Q)
        dec_at_Q -= dec_at_Q[row_first_Q]

        # Per raw token: its piece, whether it is noise, and its noise span's index in the piece.
        q_X = np.repeat(np.arange(len(pid_Q)), length_Q)
        span_X = np.repeat(np.arange(2 * int(spans_Q.sum())),
                           self.noise_spans(pid_Q, length_Q, noise_Q, spans_Q))
        noise_X = span_X % 2 == 1
        first_X = noise_X & (span_X != np.roll(span_X, 1))  # token 0 of a piece is never noise
        span_i_X = span_X // 2 - _exclusive_cumsum(spans_Q)[q_X]
        sentinel_X = sp.sentinel_ids_K[span_i_X]

        B, S, T = len(rows_B), self.seq_len, self.target_len
        out = {k: np.zeros((B, n), dt) for k, (n, dt) in self.fields.items()}
        for k in ("inputs", "targets", "decoder_inputs"):
            out[k][:] = sp.pad_id

        # Encoder: kept tokens (non-noise, or a span's first token, which becomes its sentinel)
        # at their rank among the piece's kept tokens; eos last.
        keep_X = ~noise_X | first_X
        rank_X = np.cumsum(keep_X) - 1 - _exclusive_cumsum(enc_Q - 1)[q_X]
        enc_row_Q = b_Q * S + enc_at_Q
        out["inputs"].flat[(enc_row_Q[q_X] + rank_X)[keep_X]] = \
            np.where(first_X, sentinel_X, tokens_X)[keep_X]
        out["inputs"].flat[enc_row_Q + enc_Q - 1] = sp.eos_id
        _label(out["segment_ids"], out["positions"], enc_row_Q, enc_Q, slot_Q)

        # Decoder: each noise token after the noise before it and the sentinels up to its own;
        # a span's sentinel just before its first token; eos last.
        rank_X = np.cumsum(noise_X) - 1 - _exclusive_cumsum(noise_Q)[q_X] + span_i_X + 1
        dest_X = (b_Q * T + dec_at_Q)[q_X] + rank_X
        targets = out["targets"].reshape(-1)
        targets[dest_X[noise_X]] = tokens_X[noise_X]
        targets[dest_X[first_X] - 1] = sentinel_X[first_X]
        dec_row_Q = b_Q * T + dec_at_Q
        targets[dec_row_Q + dec_Q - 1] = sp.eos_id
        dest_D, within_D = _label(out["decoder_segment_ids"], out["decoder_positions"],
                                  dec_row_Q, dec_Q, slot_Q)
        out["decoder_inputs"].flat[dest_D] = np.where(within_D == 0, sp.pad_id,
                                                      targets[dest_D - 1])
        out["loss_mask"][:] = out["decoder_segment_ids"] > 0
        return out


def _label(segment_ids_BxN, positions_BxN, row_at_Q, length_Q, slot_Q):
    """Segment id slot + 1 and positions 0.. over each example's span of its row; returns the
    flat destinations and positions written."""
    q_E = np.repeat(np.arange(len(length_Q)), length_Q)
    within_E = np.arange(len(q_E)) - _exclusive_cumsum(length_Q)[q_E]
    dest_E = row_at_Q[q_E] + within_E
    segment_ids_BxN.flat[dest_E] = slot_Q[q_E] + 1
    positions_BxN.flat[dest_E] = within_E
    return dest_E, within_E


def _partition(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """A uniformly random composition of `total` into `parts` positive parts (T5's
    _random_segmentation: a random subset of the total - 1 gaps starts a new part)."""
    if parts == 1:
        return np.array([total])
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
    return np.diff(cuts, prepend=0, append=total)
