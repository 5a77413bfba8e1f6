"""The guide's loss penalties: unlikelihood terms that push down tokens a model should not produce.

Three terms, each `-log(1 - p(c))` summed over its candidate tokens `c` at a
position (token-level unlikelihood training: Welleck et al., 2019, "Neural
Text Generation with Unlikelihood Training"), averaged over the positions that
carry a next-token label (the denominator of the language-model loss, so a
penalty is on the same per-token scale) and multiplied by its weight:

- **repetition** (`training.repetition_penalty_weight`): the candidates at
  position t are the distinct tokens among the last `repetition_penalty_window`
  tokens up to and including t *of the same document*, less the true next
  token. Welleck et al. use the whole prefix; a window bounds the cost at
  (batch, seq, window) and is where repetition loops live.
- **immediate repetition** (`training.immediate_repetition_weight`): the one
  candidate is the current token (repeating it next), where the true next
  token is not a repeat.
- **early end** (`training.eos_penalty_weight`, `training.min_sequence_length`):
  the candidate is the end-of-document token, at positions where the document
  has fewer than `min_sequence_length` tokens so far, never where the true next
  token is the end. "So far" counts the tokens that carry a label: the whole
  document in pre-training, the response (not the prompt) in SFT, which is what
  a sampler generates.

Documents are the `segments` of a row (equal ids); a position whose next token
lies in another document (the end of a packed document, the last position of a
row) has no penalty. In a packed pre-training row the first document usually
began in an earlier row, so its length is unknown: `known_start` says which
positions belong to a document that started inside the row, and only those get
the early-end term.

`p(c)` is read as `exp(logit_c - logsumexp(logits))`, so the (batch, seq,
vocab) probabilities are never materialised beyond what the log-sum-exp needs;
`1 - p` is clamped at 1e-5 (as in the paper's code) so a confident wrong token
gives a large, finite loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ava.config.schema import TrainingConfig
from ava.errors import UserError
from ava.model.transformer import IGNORE_INDEX

_FLOOR = 1e-5  # the smallest 1 - p a term is computed at


def _unlikelihood(p: torch.Tensor) -> torch.Tensor:
    """-log(1 - p), finite for p up to 1."""
    return -torch.clamp(1.0 - p, min=_FLOOR).log()


@dataclass(frozen=True)
class LossPenalties:
    """The active penalties of a run (a weight of 0 turns a term off; `from_training` gives None for no term)."""

    repetition_weight: float = 0.0
    repetition_window: int = 64
    immediate_weight: float = 0.0
    eos_weight: float = 0.0
    min_length: int = 0
    eos_id: int | None = None

    @classmethod
    def from_training(cls, training: TrainingConfig, eos_id: int | None) -> LossPenalties | None:
        """The penalties `training` asks for, or None when every weight is 0 (then the loss is exactly the LM loss).

        The early-end term needs an end-of-document id; without one (token files
        with no `data.eos_token_id`) it is a user error.
        """
        eos_weight = training.eos_penalty_weight if training.min_sequence_length > 0 else 0.0
        if eos_weight > 0 and eos_id is None:
            raise UserError("training.eos_penalty_weight penalises the end-of-document token, but this data has none "
                            "(the built-in Markov corpus is one endless chain; token files need data.eos_token_id)",
                            "train on documents (the built-in stdlib corpus or your data_dir), set data.eos_token_id "
                            "to the id that ends each document in your token files, or set training.eos_penalty_weight: 0")
        if training.repetition_penalty_weight == 0 and training.immediate_repetition_weight == 0 and eos_weight == 0:
            return None
        return cls(repetition_weight=training.repetition_penalty_weight,
                   repetition_window=training.repetition_penalty_window,
                   immediate_weight=training.immediate_repetition_weight, eos_weight=eos_weight,
                   min_length=training.min_sequence_length, eos_id=eos_id)

    @property
    def names(self) -> list[str]:
        """The logged names of the active terms, in the order `__call__` returns them."""
        return [name for name, weight in (("repetition_loss", self.repetition_weight),
                                          ("immediate_repetition_loss", self.immediate_weight),
                                          ("eos_loss", self.eos_weight)) if weight > 0]

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                 segments: torch.Tensor, known_start: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each active term, weighted, as a scalar: add their sum to the loss and log them by name.

        `logits` (batch, seq, vocab) from the forward; `input_ids` and `labels`
        (batch, seq) as given to it (labels aligned with the inputs, -100 = no
        label; position t predicts label t+1); `segments` (batch, seq) document
        ids; `known_start` (batch, seq) True where the token's document started
        within the row.
        """
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        same_next = F.pad(segments[:, 1:] == segments[:, :-1], (0, 1), value=False)
        valid = (targets != IGNORE_INDEX) & same_next
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        log_norm = torch.logsumexp(logits.float(), dim=-1, keepdim=True)

        def probability(tokens: torch.Tensor) -> torch.Tensor:
            return (logits.gather(-1, tokens).float() - log_norm).exp()

        terms: dict[str, torch.Tensor] = {}
        if self.repetition_weight > 0:
            terms["repetition_loss"] = self.repetition_weight * self._repetition(
                probability, input_ids, targets, segments, valid) / count
        if self.immediate_weight > 0:
            keep = valid & (targets != input_ids)
            p = probability(input_ids.unsqueeze(-1)).squeeze(-1)
            terms["immediate_repetition_loss"] = self.immediate_weight * (_unlikelihood(p) * keep).sum() / count
        if self.eos_weight > 0:
            assert self.eos_id is not None
            length = _length_so_far(labels != IGNORE_INDEX, segments)
            keep = valid & known_start & (length < self.min_length) & (targets != self.eos_id)
            p = probability(torch.full_like(input_ids, self.eos_id).unsqueeze(-1)).squeeze(-1)
            terms["eos_loss"] = self.eos_weight * (_unlikelihood(p) * keep).sum() / count
        return terms

    def _repetition(self, probability, input_ids: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
        """The summed unlikelihood of the distinct earlier tokens of each position's window and document."""
        window = min(self.repetition_window, input_ids.shape[1])  # a longer window sees nothing more
        before = F.pad(input_ids, (window - 1, 0), value=-1).unfold(1, window, 1)  # (batch, seq, window)
        their_segment = F.pad(segments, (window - 1, 0), value=torch.iinfo(segments.dtype).min).unfold(1, window, 1)
        candidates = torch.where(their_segment == segments.unsqueeze(-1), before, -1)
        candidates = candidates.masked_fill(candidates == targets.unsqueeze(-1), -1)
        # Sorted, a token's second and later copies sit right after its first: each counts once.
        candidates = candidates.sort(dim=-1).values
        repeat = F.pad(candidates[..., 1:] == candidates[..., :-1], (1, 0), value=False)
        keep = (candidates >= 0) & ~repeat & valid.unsqueeze(-1)
        return (_unlikelihood(probability(candidates.clamp(min=0))) * keep).sum()


def _length_so_far(counted: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(batch, seq): how many `counted` tokens of its document are at or before each position."""
    running = counted.long().cumsum(dim=1)
    starts = F.pad(segments[:, 1:] != segments[:, :-1], (1, 0), value=True)
    # The running count just before each document's start, carried along the document (it never decreases).
    offset = torch.where(starts, running - counted.long(), torch.zeros_like(running)).cummax(dim=1).values
    return running - offset


def segments_from_eos(input_ids: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids of packed rows (a document ends with, and includes, its end token) and where they are known.

    The first document of a row may have started in an earlier row, so its
    start is unknown; every later one starts inside the row. Without an end
    id a row is one document of unknown start.
    """
    if eos_id is None:
        segments = torch.zeros_like(input_ids)
    else:
        ends = input_ids == eos_id
        segments = ends.long().cumsum(dim=1) - ends.long()
    return segments, segments > 0
