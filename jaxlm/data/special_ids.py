"""The special token ids an objective emits (mask, sentinels, pad, eos), the regular ids it may
select, noise or draw at random, and the check that the model's vocab covers every id emitted.

With a tokenizer they come from it (ByteTokenizer: extra ids above its 259 byte ids; a tokenizer
file: its [MASK]/<mask> and <extra_id_i> tokens, one ConfigError naming the file if missing). With
only synthetic sources there is no tokenizer: they are the top of the model vocab (mask V-1,
sentinel i V-2-i), and the synthetic rows draw their tokens below them (`reserved_top`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxlm.config import ConfigError

SYNTHETIC_SPECIALS = 3  # synthetic rows: ids 0-2 are pad, bos, eos, as for the byte tokenizer


@dataclass(frozen=True)
class SpecialIds:
    pad_id: int                # padding, and T5's decoder start id
    eos_id: int                # ends every span-corruption example (both sides)
    mask_id: int | None        # None unless the objective masks
    sentinel_ids_K: np.ndarray  # sentinel i is sentinel_ids_K[i] (K: the most an example needs)
    is_regular_V: np.ndarray   # bool over the model vocab: ids that may be selected or noised
    regular_ids_R: np.ndarray  # the regular ids, for BERT's random replacement
    reserved_top: int          # top ids of the vocab synthetic rows must not draw


def special_ids(tokenizer, vocab_size: int, objective: str, mask: bool,
                num_sentinels: int) -> SpecialIds:
    """The ids `objective` needs: a mask token if `mask`, and `num_sentinels` sentinels."""
    if tokenizer is None:
        return _top_of_vocab(vocab_size, objective, mask, num_sentinels)
    mask_id = tokenizer.mask_id if mask else None
    sentinels_K = np.array([tokenizer.sentinel_id(i) for i in range(num_sentinels)], np.int64)
    emitted = {f"the mask token of the {tokenizer.name} tokenizer": mask_id} if mask else {}
    if num_sentinels:
        emitted[f"sentinel {int(np.argmax(sentinels_K))} of the {tokenizer.name} tokenizer "
                f"({num_sentinels} sentinels needed)"] = int(sentinels_K.max())
    what, top = max(emitted.items(), key=lambda kv: kv[1])
    if top >= vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} does not cover id {top}, {what}, which "
                          f"the {objective} objective emits; set model.vocab_size >= {top + 1}")
    special = set(tokenizer.special_ids()) | set(sentinels_K.tolist())
    special |= {mask_id} if mask_id is not None else set()
    regular_R = np.setdiff1d(np.arange(tokenizer.vocab_size), sorted(special))
    return _assemble(tokenizer.pad_id, tokenizer.eos_id, mask_id, sentinels_K, regular_R,
                     vocab_size, reserved_top=0)


def _top_of_vocab(vocab_size: int, objective: str, mask: bool,
                  num_sentinels: int) -> SpecialIds:
    """No tokenizer: mask V-1, sentinel i V-2-i; the regular ids are those between the three
    low specials (pad 0, bos 1, eos 2) and the reserved top."""
    reserved = 1 + num_sentinels if (mask or num_sentinels) else 0
    if vocab_size - reserved <= SYNTHETIC_SPECIALS:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for synthetic "
                          f"{objective} data: ids 0-2 are pad, bos and eos and the top "
                          f"{reserved} are its special tokens, leaving no regular ids; set "
                          f"model.vocab_size >= {reserved + SYNTHETIC_SPECIALS + 1}")
    sentinels_K = vocab_size - 2 - np.arange(num_sentinels, dtype=np.int64)
    regular_R = np.arange(SYNTHETIC_SPECIALS, vocab_size - reserved)
    return _assemble(0, 2, vocab_size - 1 if mask else None, sentinels_K, regular_R, vocab_size,
                     reserved_top=reserved)


def _assemble(pad_id, eos_id, mask_id, sentinels_K, regular_R, vocab_size, reserved_top):
    is_regular_V = np.zeros(vocab_size, bool)
    is_regular_V[regular_R] = True
    return SpecialIds(int(pad_id), int(eos_id), None if mask_id is None else int(mask_id),
                      sentinels_K, is_regular_V, regular_R.astype(np.int32), reserved_top)
