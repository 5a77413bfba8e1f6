"""Is the run overfitting, underfitting or healthy? The train/validation gap, read from metrics records.

This automates the diagnosis of the BEHRT troubleshooting guide for the
end-of-run summary. It reads the records a run writes to metrics.jsonl
(training records with `loss`, evaluation records with `eval_loss`; event
records and non-finite values are skipped), so it works the same on a live
run, a finished one and a killed one.

Training loss "at" an evaluation is the evaluation record's own `train_loss`
when it has one (the loop's mean over every step since the previous
evaluation), else the mean training `loss` over the logged
steps since the previous evaluation, (previous eval step, eval step]: the
model changed over that stretch, and a single step's loss is too noisy to
compare with a held-out loss. The first evaluation has no previous one; its
window is the later half of the stretch before it (as wide as half the
interval to the next evaluation), because the loss falls fastest at the start
and a mean reaching back to the random initialisation would lag far behind the
model the evaluation measured, hiding a plateau. A window without a logged
step takes the nearest earlier one. Evaluations before any training record
(a baseline at step 0) measure the initialisation, not training, and are left
out. A step logged twice (resume, rollback) counts once: the last record wins.

The rules, in order:

- undetermined: the evaluations were made on different held-out sets. Each
  evaluation record names its set (`held_out`, a fingerprint of the rows
  evaluated; `ava.data.batches.SequenceBatches.fingerprint`), and a run
  resumed with other data settings can evaluate on another one; a loss that
  falls across the change may only mean easier rows, so no verdict compares
  them, and the reason says where the set changed. (Records without the key,
  from an older Ava, are taken to share their neighbours' set.)
- undetermined: fewer than `min_evaluations` evaluations with a finite loss.
  Two points cannot tell a trend from noise.
- overfitting: the last evaluation loss is above the best by more than
  max(2% of |best|, 0.01) AND the training loss at the last evaluation is
  below the training loss at the best one. Validation getting worse alone
  could be noise or a bad learning-rate phase; validation worse while training
  keeps improving is the model memorising its training data.
- underfitting: training loss improved by less than 5% (relative) from the
  first evaluation to the last, AND the evaluation loss did too, AND the two
  stay close (|gap| < 10% of the last training loss). Both flat and together
  means the model is not learning what it could, not that it fails to
  generalise.
- healthy: anything else; the reason gives the gap and the trend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

OVERFIT_RELATIVE_RISE = 0.02  # last eval above best by more than this share of |best| ...
OVERFIT_ABSOLUTE_RISE = 0.01  # ... and by more than this, so a near-zero loss is not judged on noise
FLAT_IMPROVEMENT = 0.05       # relative improvement below which a loss counts as flat
CLOSE_GAP = 0.10              # |gap| below this share of the training loss counts as close

_OVERFIT_ADVICE = ("Use the best checkpoint (checkpoints/best), stop earlier (training.early_stopping_patience), "
                   "add regularisation (model.hidden_dropout, model.attention_dropout, training.weight_decay) "
                   "or more data; with LoRA, a lower training.lora.rank.")
_UNDERFIT_ADVICE = ("Try a higher training.learning_rate, longer training or a larger model; with LoRA from "
                    "scratch, check that training.lora.train_embeddings and training.lora.train_head are on.")


@dataclass(frozen=True)
class FitVerdict:
    """The diagnosis, the sentence that explains it, and the numbers it rests on."""

    verdict: str               # "overfitting" | "underfitting" | "healthy" | "undetermined"
    reason: str                # one or two sentences with the numbers and what to do
    train_loss: float | None   # training loss around the last evaluation
    eval_loss: float | None    # last evaluation loss
    gap: float | None          # eval_loss - train_loss

    def as_dict(self) -> dict:
        """Plain JSON-ready dict, for summary.json."""
        return asdict(self)

    def line(self) -> str:
        """One console line: `fit: overfitting -- validation loss rose from ...`."""
        return f"fit: {self.verdict} -- {self.reason}"


@dataclass(frozen=True)
class _Point:
    step: int
    eval_loss: float
    train_loss: float


def diagnose_fit(records: Iterable[dict], min_evaluations: int = 3) -> FitVerdict:
    """The fit verdict of a run from its metrics records (see the module docstring for the rules)."""
    records = list(records)
    evals = _finite_by_step(records, "eval_loss")
    # lm_loss is what evaluation measures; the total `loss` adds an MoE model's router losses.
    train = _finite_by_step(records, "lm_loss") or _finite_by_step(records, "loss")
    points = _points(evals, train, dict(_finite_by_step(records, "train_loss")))
    changed = _held_out_changes(records, [p.step for p in points])
    if changed is not None:
        last = points[-1]
        return FitVerdict("undetermined", changed, last.train_loss, last.eval_loss, last.eval_loss - last.train_loss)
    if len(points) < max(min_evaluations, 1):
        return _undetermined(len(evals), points, min_evaluations, bool(train))
    first, last = points[0], points[-1]
    best = min(points, key=lambda p: p.eval_loss)  # the earliest of equal bests
    gap = last.eval_loss - last.train_loss

    def verdict(kind: str, reason: str) -> FitVerdict:
        return FitVerdict(kind, reason, last.train_loss, last.eval_loss, gap)

    rise = last.eval_loss - best.eval_loss
    if rise > max(OVERFIT_RELATIVE_RISE * abs(best.eval_loss), OVERFIT_ABSOLUTE_RISE) \
            and last.train_loss < best.train_loss:
        return verdict("overfitting", (
            f"validation loss rose from {_n(best.eval_loss)} (step {best.step}) to {_n(last.eval_loss)} "
            f"(step {last.step}) while training loss fell from {_n(best.train_loss)} to {_n(last.train_loss)} "
            f"(gap {_n(gap)}): the model is memorising its training data. {_OVERFIT_ADVICE}"))
    train_gain = _relative_improvement(first.train_loss, last.train_loss)
    eval_gain = _relative_improvement(first.eval_loss, last.eval_loss)
    if train_gain < FLAT_IMPROVEMENT and eval_gain < FLAT_IMPROVEMENT and abs(gap) < CLOSE_GAP * abs(last.train_loss):
        return verdict("underfitting", (
            f"training loss barely moved ({_n(first.train_loss)} to {_n(last.train_loss)}, {train_gain:.1%}) "
            f"and validation loss too ({_n(first.eval_loss)} to {_n(last.eval_loss)}, {eval_gain:.1%}) "
            f"between steps {first.step} and {last.step}, and they stay close (gap {_n(gap)}): "
            f"the model is not learning what it could. {_UNDERFIT_ADVICE}"))
    return verdict("healthy", (
        f"validation loss {_n(first.eval_loss)} to {_n(last.eval_loss)} and training loss "
        f"{_n(first.train_loss)} to {_n(last.train_loss)} between steps {first.step} and {last.step}; "
        f"gap {_n(gap)} at the last evaluation (best validation loss {_n(best.eval_loss)} at step {best.step})."))


def _held_out_changes(records: list[dict], steps: list[int]) -> str | None:
    """Why the evaluations at `steps` cannot be compared (they span held-out sets), or None when they can."""
    named: dict[int, str] = {}
    for record in records:  # the last record wins a repeated step, as for the losses
        if type(record.get("step")) is int and "eval_loss" in record and isinstance(record.get("held_out"), str):
            named[record["step"]] = record["held_out"]
    runs: list[tuple[str, int, int]] = []  # (fingerprint, first step, last step), in step order
    for step in steps:
        held_out = named.get(step)
        if held_out is None:
            continue
        if runs and runs[-1][0] == held_out:
            runs[-1] = (held_out, runs[-1][1], step)
        else:
            runs.append((held_out, step, step))
    if len({held_out for held_out, _, _ in runs}) < 2:
        return None
    spans = ", ".join(f"{h[:12]} at step{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}" for h, a, b in runs)
    return (f"the evaluations were made on {len({h for h, _, _ in runs})} different held-out sets ({spans}), "
            "so their losses cannot be compared and there is no train/validation verdict. The held-out set "
            "changes when a resume changes the data settings (the data, data.max_eval_examples, "
            "data.eval_batch_size, data.shuffle_seed): resume with the settings the run started with, or judge "
            "a run evaluated on one set throughout.")


def _finite_by_step(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of one key, finite numbers only, sorted by step; the last record wins a repeated step."""
    by_step: dict[int, float] = {}
    for record in records:
        step, value = record.get("step"), record.get(key)
        if type(step) is int and isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value):
            by_step[step] = float(value)
    return sorted(by_step.items())


def _points(evals: list[tuple[int, float]], train: list[tuple[int, float]],
            own: dict[int, float]) -> list[_Point]:
    """Each evaluation with the training loss at it; evaluations before any training record are dropped.

    An evaluation record that carries its own `train_loss` (the loop's mean over
    every step since the previous evaluation, not only the logged ones) is
    taken at its word, except the first, whose own mean reaches back to the
    random initialisation.
    """
    points = []
    for i, (step, eval_loss) in enumerate(evals):
        if step in own and (i > 0 or not train):
            points.append(_Point(step, eval_loss, own[step]))
            continue
        if i > 0:
            start = evals[i - 1][0]
        else:  # the later half of the stretch before the first evaluation (see the module docstring)
            interval = evals[1][0] - step if len(evals) > 1 else step
            start = step - max(interval // 2, 1)
        train_loss = _train_loss_in(train, start, step)
        if train_loss is not None:
            points.append(_Point(step, eval_loss, train_loss))
    return points


def _train_loss_in(train: list[tuple[int, float]], start: int, end: int) -> float | None:
    """Mean training loss over steps in (start, end], else the nearest earlier one, else None."""
    window = [loss for step, loss in train if start < step <= end]
    if window:
        return sum(window) / len(window)
    earlier = [loss for step, loss in train if step <= start]
    return earlier[-1] if earlier else None


def _relative_improvement(first: float, last: float) -> float:
    return (first - last) / abs(first) if first else 0.0


def _undetermined(finite_evals: int, points: list[_Point], needed: int, has_train: bool) -> FitVerdict:
    """Too little to judge; still carries the last evaluation's numbers when there are any."""
    last = points[-1] if points else None
    numbers = (last.train_loss, last.eval_loss, last.eval_loss - last.train_loss) if last else (None, None, None)
    if finite_evals and not has_train:
        return FitVerdict("undetermined", f"{finite_evals} evaluation(s) but no finite training loss to "
                          "compare them with.", *numbers)
    counted = (f"only {len(points)} evaluation(s) with a finite loss after training began, {needed} needed"
               if finite_evals else "no evaluation with a finite loss")
    return FitVerdict("undetermined", f"{counted}: evaluate more often (lower training.eval_steps) to get a "
                      "train/validation verdict.", *numbers)


def _n(value: float) -> str:
    """A loss to four significant digits, at least two decimals where that adds no false precision: 7.00, 6.926."""
    short = format(value, ".4g")
    return f"{value:.2f}" if float(short) == round(value, 2) else short
