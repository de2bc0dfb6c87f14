"""The model objective's view of a source: its row datasets turned into that objective's batches.

causal_lm reads the packed rows as they are; mlm masks them (mlm.py); seq2seq cuts the documents
into span-corruption examples (span_plan.py, span_corruption.py). Each source of a mixture is
transformed on its own (its index keys the random draws), so the iterator, its plan and its
resumable position are the same for every objective.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.mlm import MaskedLMDataset
from jaxlm.data.span_corruption import SpanCorruptionDataset
from jaxlm.data.span_plan import SpanLengths, span_lengths
from jaxlm.data.special_ids import SpecialIds, special_ids

DATA_OBJECTIVES = ("causal_lm", "mlm", "seq2seq")


@dataclass(frozen=True)
class Transform:
    objective: str
    cfg: DataConfig
    special_ids: SpecialIds | None  # None for causal_lm
    span_lengths: SpanLengths | None  # seq2seq only

    @property
    def reserved_top(self) -> int:
        """Top vocab ids synthetic rows must not draw (special ids taken from the top)."""
        return self.special_ids.reserved_top if self.special_ids else 0

    def apply(self, rows, split: int, source: int):
        """The objective's dataset over a source's rows (split 0 train, 1 eval)."""
        if self.objective == "mlm":
            return MaskedLMDataset(rows, self.special_ids, self.cfg.mlm_probability,
                                   self.cfg.seed, split, source)
        if self.objective == "seq2seq":
            return SpanCorruptionDataset(rows, self.span_lengths, self.special_ids,
                                         self.cfg.seed, split, source)
        return rows

    def fingerprint(self, corpus_fingerprint: str) -> str:
        """The corpus fingerprint, plus the objective's settings where they shape the rows."""
        if self.objective == "causal_lm":
            return corpus_fingerprint
        c = self.cfg
        settings = (f"{corpus_fingerprint} {self.objective} p={c.mlm_probability}"
                    if self.objective == "mlm" else
                    f"{corpus_fingerprint} {self.objective} {self.span_lengths}")
        return hashlib.sha256(settings.encode()).hexdigest()[:16]


def objective_transform(cfg: DataConfig, objective: str, tokenizer, vocab_size: int
                        ) -> Transform:
    """The transform for `objective`, with its special ids checked against the model vocab."""
    if objective not in DATA_OBJECTIVES:
        raise ConfigError(f"model objective {objective!r} has no data transform; the data "
                          f"side knows: {', '.join(DATA_OBJECTIVES)}")
    if objective == "causal_lm":
        return Transform(objective, cfg, None, None)
    if objective == "mlm":
        return Transform(objective, cfg, special_ids(tokenizer, vocab_size, objective, True, 0),
                         None)
    lengths = span_lengths(cfg.seq_len, cfg.target_len, cfg.noise_density,
                           cfg.mean_noise_span_length)
    return Transform(objective, cfg,
                     special_ids(tokenizer, vocab_size, objective, False, lengths.max_spans),
                     lengths)
