"""RLHF data: prompt/response, preference and prompt files (or a task's generated ones), as token tensors.

Every example is `prompt + response + eos`; the prompt's tokens are context,
never a training target. Files are jsonl, one object per line; a malformed
line is reported with its number and what it lacks, never skipped silently.

An example longer than data.max_length is cut to it when data.truncation is
on (`fit_length`: the response loses its end, eos first; the prompt, which
every response token is predicted from, stays whole), else left out; either
way the stage says how many.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ava.data.tokenizer import Tokenizer
from ava.errors import UserError
from ava.model.transformer import IGNORE_INDEX
from ava.rlhf.tasks import Task, preference_pairs, sft_examples


@dataclass(frozen=True)
class Prompt:
    text: str
    answer: str | None = None  # a reference answer, for rewards that check one


def read_jsonl(path: str | Path, fields: Sequence[str], setting: str, optional: Sequence[str] = ()) -> list[dict]:
    """The objects of a jsonl file, each with string `fields` (and, if present, string `optional` ones)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{setting}: {p} does not exist",
                        f"point {setting} at a jsonl file with keys {', '.join(fields)}, or set it to null "
                        "to generate data from rlhf.task")
    rows = []
    with p.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{setting}: {p} line {number} is not valid JSON ({exc.msg})",
                                "write one JSON object per line") from None
            missing = [k for k in fields if not isinstance(row, dict) or not isinstance(row.get(k), str)]
            if missing:
                raise UserError(f"{setting}: {p} line {number} has no text field(s) {', '.join(missing)}",
                                f"give every line string values for {', '.join(fields)}")
            bad = [k for k in optional if row.get(k) is not None and not isinstance(row[k], str)]
            if bad:
                raise UserError(f"{setting}: {p} line {number}: {', '.join(bad)} must be text",
                                "write it as a JSON string, or leave it out")
            rows.append(row)
    if not rows:
        raise UserError(f"{setting}: {p} holds no examples", "add at least one JSON object per line")
    return rows


def split_holdout(items: list, holdout: int, setting: str) -> tuple[list, list]:
    """The last `holdout` items are held out for evaluation; at least one item must remain for training."""
    if holdout >= len(items):
        raise UserError(f"{setting}: {len(items)} examples cannot spare {holdout} for evaluation",
                        "provide more examples, or lower eval_examples")
    return (items[:-holdout], items[-holdout:]) if holdout else (items, [])


def sft_data(path: str | None, task: Task | None, num: int, holdout: int, seed: int, setting: str,
             error_rate: float = 0.0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) prompt/response pairs from a file or from the task.

    With `error_rate`, that share of the generated training demonstrations
    carries a corrupted answer; held-out pairs are always correct.
    """
    if path is not None:
        pairs = [(r["prompt"], r["response"]) for r in read_jsonl(path, ("prompt", "response"), setting)]
    elif task is not None:
        examples = sft_examples(task, num + holdout, seed)
        noise = random.Random(seed + 104729)
        pairs = [(e.prompt, task.corrupt(e, noise) if i < num and noise.random() < error_rate else e.answer)
                 for i, e in enumerate(examples)]
    else:
        raise UserError(f"{setting} is not set and there is no task to generate examples from",
                        f"set {setting} to a jsonl file of prompt/response objects, or set rlhf.task")
    return split_holdout(pairs, holdout, setting)


def preference_data(path: str | None, task: Task | None, num: int, holdout: int, seed: int,
                    setting: str) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(train, held-out) prompt/chosen/rejected triples from a file or from the task."""
    if path is not None:
        rows = read_jsonl(path, ("prompt", "chosen", "rejected"), setting)
        triples = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    elif task is not None:
        triples = preference_pairs(task, num + holdout, seed)
    else:
        raise UserError(f"{setting} is not set and there is no task to generate pairs from",
                        f"set {setting} to a jsonl file of prompt/chosen/rejected objects, or set rlhf.task")
    return split_holdout(triples, holdout, setting)


EncodedPair = tuple[tuple[list[int], int], tuple[list[int], int]]


@dataclass
class EncodedPreferences:
    train: list[EncodedPair]
    held: list[EncodedPair]
    dropped: int  # pairs left out: too long (without truncation), or nothing left to compare once cut
    truncated: int = 0  # pairs kept with a sequence cut to max_length (data.truncation)
    truncate: bool = False  # whether too long pairs were cut (else left out)

    def notes(self, stage: str, max_length: int) -> list[str]:
        """What the stage says about the pairs longer than data.max_length."""
        return length_notes(stage, "pair", self.dropped, self.truncated, max_length, self.truncate)


def encoded_preferences(tokenizer: Tokenizer, stage_cfg: Any, task: Task | None, seed: int, setting: str,
                        max_length: int, truncate: bool = False) -> EncodedPreferences:
    """The (chosen, rejected) sequences of a preference stage (reward model or DPO), as ids.

    A sequence longer than `max_length` (data.max_length) is cut to it with
    `truncate` (data.truncation; `fit_length`); the shared prompt stays whole,
    so both answers are still judged in the same context, and a pair whose
    answers no longer differ once cut is left out. Without `truncate` a pair
    with a sequence too long is left out, as SFT does: fed to the model it
    would stop the run. Either way the pairs are counted.
    """
    train, held = preference_data(stage_cfg.data_path, task, stage_cfg.num_examples, stage_cfg.eval_examples, seed,
                                  setting)
    truncated = 0

    def fitting(triples: list[tuple[str, str, str]]) -> list[EncodedPair]:
        nonlocal truncated
        kept = []
        for p, c, r in triples:
            chosen, rejected = encode(tokenizer, p, c), encode(tokenizer, p, r)
            cut_chosen, cut_rejected = (fit_length(chosen, max_length, truncate),
                                        fit_length(rejected, max_length, truncate))
            if cut_chosen is None or cut_rejected is None:
                continue
            cut = cut_chosen is not chosen or cut_rejected is not rejected
            if cut and cut_chosen[0] == cut_rejected[0]:  # they differed only in what was cut off
                continue
            truncated += cut
            kept.append((cut_chosen, cut_rejected))
        return kept

    kept_train, kept_held = fitting(train), fitting(held)
    if not kept_train:
        raise UserError(f"{setting}: every preference pair is longer than data.max_length = {max_length} tokens"
                        + (" (or its prompt fills it, or its answers agree within it)" if truncate else ""),
                        "raise data.max_length (up to model.max_position_embeddings), or shorten the pairs")
    return EncodedPreferences(kept_train, kept_held, len(train) + len(held) - len(kept_train) - len(kept_held),
                              truncated, truncate)


def fit_length(example: tuple[list[int], int], max_length: int, truncate: bool) -> tuple[list[int], int] | None:
    """An encoded example that fits in `max_length` tokens, or None: it is to be left out.

    Longer, it is cut to its first `max_length` tokens with `truncate`: the
    response loses its end (its eos first), the prompt stays whole, so every
    response token kept is predicted from the same context as before. A prompt
    that leaves no room for one response token cannot be cut that way: None.
    """
    ids, n_prompt = example
    if len(ids) <= max_length:
        return example
    if not truncate or n_prompt >= max_length:
        return None
    return ids[:max_length], n_prompt


def length_notes(stage: str, unit: str, dropped: int, truncated: int, max_length: int, truncate: bool) -> list[str]:
    """A stage's notes on its examples longer than data.max_length: how many were cut, how many left out."""
    notes = []
    if truncated:
        notes.append(f"{stage}: {truncated} {unit}(s) longer than data.max_length = {max_length} cut to it "
                     "(data.truncation: the response loses its end, the prompt stays whole)")
    if dropped and truncate:
        why = "no room for a response token after the prompt" + (", or answers that agree once cut"
                                                                   if unit == "pair" else "")
        notes.append(f"{stage}: {dropped} {unit}(s) left out ({why}, at data.max_length = {max_length})")
    elif dropped:
        notes.append(f"{stage}: {dropped} {unit}(s) longer than data.max_length = {max_length} left out "
                     "(data.truncation: true would keep them, cut)")
    return notes


def prompt_data(path: str | None, task: Task | None, holdout: int, seed: int, setting: str, rank: int = 0,
                world: int = 1) -> tuple[PromptSource, list[Prompt]]:
    """This rank's source of training prompts, and the held-out prompts, from a file or from the task.

    A file's training prompts are shared out between the ranks (every
    `world`-th from the `rank`-th), so ranks never answer the same prompt in
    one epoch; every rank evaluates all held-out prompts.
    """
    if path is not None:
        rows = read_jsonl(path, ("prompt",), setting, optional=("answer",))
        train, held = split_holdout([Prompt(r["prompt"], r.get("answer")) for r in rows], holdout, setting)
        if len(train) < world:
            raise UserError(f"{setting}: {len(train)} training prompts cannot be shared by {world} ranks",
                            "provide at least one training prompt per rank, or lower eval_prompts")
        return PromptSource(fixed=train[rank::world]), held
    if task is None:
        raise UserError(f"{setting} is not set and there is no task to generate prompts from",
                        f"set {setting} to a jsonl file of {{\"prompt\": ...}} objects, or set rlhf.task")
    rng = random.Random(seed + 7919)  # held-out prompts: their own stream, never the training draws
    held = [Prompt(e.prompt, e.answer) for e in (task.sample(rng) for _ in range(holdout))]
    return PromptSource(task=task), held


class PromptSource:
    """Training prompts: freshly generated by a task, or drawn (shuffled, epoch after epoch) from a file."""

    def __init__(self, task: Task | None = None, fixed: list[Prompt] | None = None) -> None:
        self.task, self.fixed = task, fixed
        self._order: list[int] = []

    def batch(self, n: int, rng: random.Random) -> list[Prompt]:
        if self.task is not None:
            return [Prompt(e.prompt, e.answer) for e in (self.task.sample(rng) for _ in range(n))]
        assert self.fixed is not None
        out: list[Prompt] = []
        while len(out) < n:
            if not self._order:
                self._order = list(range(len(self.fixed)))
                rng.shuffle(self._order)
            out.append(self.fixed[self._order.pop()])
        return out

    def state_dict(self) -> dict[str, list[int]]:
        """The prompts of the current epoch not yet drawn (a file's); the draws themselves come from the stage's RNG."""
        return {"order": list(self._order)}

    def load_state_dict(self, state: Mapping[str, list[int]]) -> None:
        self._order = [int(i) for i in state["order"]]


def encode(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """`prompt + response + eos` as ids, and how many of them are the prompt."""
    p = tokenizer.encode(prompt)
    if not p:
        raise UserError(f"an empty prompt (response {response[:40]!r}): the first response token would have "
                        "nothing to be predicted from", "give every example a non-empty prompt")
    return p + tokenizer.encode(response) + [tokenizer.eos_id], len(p)


@dataclass
class SFTRows:
    """Training rows: ids, labels (-100 on prompts and padding) and document ids for attention."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    dropped: int  # examples longer than a row, left out
    truncated: int = 0  # examples longer than a row, cut to it (data.truncation)
    truncate: bool = False  # whether too long examples were cut (else left out)

    def notes(self, stage: str, max_length: int) -> list[str]:
        """What the stage says about the examples longer than data.max_length."""
        return length_notes(stage, "example", self.dropped, self.truncated, max_length, self.truncate)


def sft_rows(examples: Sequence[tuple[list[int], int]], max_length: int, pad_id: int, packing: bool,
             truncate: bool = False) -> SFTRows:
    """Rows of `max_length` tokens: several examples each when `packing` (next fit, in order), else one.

    Each example keeps its own segment id, so the model attends within it only
    and every packed token sees exactly what it would alone. An example longer
    than a row is cut to it with `truncate` (`fit_length`), else left out.
    """
    rows: list[list[tuple[list[int], int]]] = []
    dropped = truncated = 0
    for example in examples:
        fitted = fit_length(example, max_length, truncate)
        if fitted is None:
            dropped += 1
            continue
        truncated += fitted is not example
        ids, n_prompt = fitted
        if packing and rows and sum(len(x) for x, _ in rows[-1]) + len(ids) <= max_length:
            rows[-1].append((ids, n_prompt))
        else:
            rows.append([(ids, n_prompt)])
    width = max_length if packing else max((sum(len(x) for x, _ in r) for r in rows), default=1)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, (ids, n_prompt) in enumerate(row):
            input_ids[r, at:at + len(ids)] = torch.tensor(ids)
            labels[r, at + n_prompt:at + len(ids)] = torch.tensor(ids[n_prompt:])
            segments[r, at:at + len(ids)] = s
            at += len(ids)
        segments[r, at:] = len(row)  # padding: a document of its own, never attended to by the others
    return SFTRows(input_ids, labels, segments, dropped, truncated, truncate)


def rank_batches(n_rows: int, batch: int, rank: int, world: int, seed: int) -> RankBatches:
    """Row indices of this rank's micro batches, forever: an epoch is a fresh shuffle shared by all ranks."""
    per_step = batch * world
    if n_rows < per_step:
        raise UserError(f"{n_rows} training rows are fewer than one step's {batch} x {world} rank(s)",
                        "provide more examples, or lower the stage's batch_size")
    return RankBatches(n_rows, batch, rank, world, seed)


class RankBatches:
    """An iterator of this rank's row indices that remembers where it is (`state_dict`), for resuming a stage."""

    def __init__(self, n_rows: int, batch: int, rank: int, world: int, seed: int) -> None:
        self.n_rows, self.batch, self.rank, self.world, self.seed = n_rows, batch, rank, world, seed
        self.epoch, self.start = 0, 0
        self._order: list[int] | None = None

    def __iter__(self) -> RankBatches:
        return self

    def __next__(self) -> list[int]:
        per_step = self.batch * self.world
        if self.start > self.n_rows - per_step:
            self.epoch, self.start, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = list(range(self.n_rows))
            random.Random(self.seed * 1000003 + self.epoch).shuffle(self._order)
        first = self.start + self.rank * self.batch
        self.start += per_step
        return self._order[first:first + self.batch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.start, self._order = int(state["epoch"]), int(state["start"]), None


@dataclass
class SequenceBatch:
    """Right-padded sequences with their response masks, for log-probs and scores."""

    input_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T-1): position t predicts a response token t+1
    last_index: torch.Tensor  # (B,): each sequence's last real token (its eos)

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(self.input_ids.to(device), self.response_mask.to(device), self.last_index.to(device))


def sequence_batch(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> SequenceBatch:
    """Pad encoded `prompt + response + eos` sequences on the right (exact for a causal model)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width - 1), dtype=torch.bool)
    last = torch.zeros(len(encoded), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, n_prompt - 1:len(ids) - 1] = True
        last[i] = len(ids) - 1
    return SequenceBatch(input_ids, mask, last)
