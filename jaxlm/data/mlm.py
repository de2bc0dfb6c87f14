"""Masked LM rows (BERT): the causal LM's packed rows, cut to seq_len tokens, with a seeded
selection of tokens to predict.

A row is the first seq_len tokens of the packed row with the same id, so documents (each ending
in eos), per-document positions and segment ids come from packing unchanged. Each regular token
(never pad, bos, eos, mask or a sentinel, never padding) is selected with probability p; of the
selected, 80% become the mask id, 10% a random regular id and 10% stay as they are. The draws come
from a generator seeded by (seed, split, source, row id) alone, so a row's masks never depend on
which batch, process or resume reads it.
"""
from __future__ import annotations

import numpy as np

from jaxlm.data.packing import RowDataset, seeded_rng
from jaxlm.data.special_ids import SpecialIds

MLM_TAG = 0x6D6C6D  # keeps the mask draws apart from every other seeded stream
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the rest stay unchanged
FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class MaskedLMDataset:
    """inputs (masked ids), targets (the original ids at every position), positions,
    segment_ids (as the base rows: synthetic rows, one document each, leave them out) and
    loss_mask (1.0 exactly at the selected positions); all [B, seq_len]."""

    def __init__(self, base: RowDataset, specials: SpecialIds, probability: float, seed: int,
                 split: int, source: int = 0):
        if specials.mask_id is None:
            raise ValueError("masked LM needs special ids with a mask id")
        self.base, self.specials, self.probability = base, specials, probability
        self.key = (seed, MLM_TAG, split, source)
        self.seq_len, self.num_rows, self.iid_rows = base.seq_len, base.num_rows, base.iid_rows
        self.fields = {k: v for k, v in base.fields.items() if k in FIELDS}

    def __len__(self) -> int:
        return self.num_rows

    def get(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        rows = self.base.get(row_ids)
        tokens_BxS, segment_ids_BxS = rows["inputs"], rows["segment_ids"]
        sp = self.specials
        eligible_BxS = sp.is_regular_V[tokens_BxS] & (segment_ids_BxS > 0)
        select_u_BxS, action_u_BxS, pick_BxS = self._draws(np.asarray(row_ids).reshape(-1))
        selected_BxS = eligible_BxS & (select_u_BxS < self.probability)
        to_mask_BxS = selected_BxS & (action_u_BxS < MASK_SHARE)
        to_random_BxS = selected_BxS & ~to_mask_BxS & (action_u_BxS < MASK_SHARE + RANDOM_SHARE)
        inputs_BxS = np.where(to_random_BxS, sp.regular_ids_R[pick_BxS], tokens_BxS)
        inputs_BxS[to_mask_BxS] = sp.mask_id
        return {"inputs": inputs_BxS.astype(np.int32), "targets": tokens_BxS,
                "segment_ids": segment_ids_BxS, "positions": rows["positions"],
                "loss_mask": selected_BxS.astype(np.float32)}

    def _draws(self, rows_B: np.ndarray):
        """Per row: a uniform for selection, one for the 80/10/10 action, a random regular id
        index; each [B, seq_len], row b's from its own seeded generator."""
        B, S, R = len(rows_B), self.seq_len, len(self.specials.regular_ids_R)
        u_Bx2xS = np.empty((B, 2, S))
        pick_BxS = np.empty((B, S), np.int64)
        for b, row in enumerate(rows_B):
            rng = seeded_rng(*self.key, row)
            u_Bx2xS[b] = rng.random((2, S))
            pick_BxS[b] = rng.integers(0, R, S)
        return u_Bx2xS[:, 0], u_Bx2xS[:, 1], pick_BxS
