"""summary.json and the end-of-run report: how the run ended, its losses, the checks a smoke test relies on.

The run's model is exported here too (`model/`: consolidated weights from the
final checkpoint, or the best one under `save_strategy: best`, with the run's
tokenizer and special ids, `ava.data.model_tokens`), since the checks include
that it was. The train/validation verdict and the MoE
expert-utilisation report are computed from the whole metrics.jsonl, so a
resumed run is judged on its full history; the first loss, tokens and speed
are this process's, and `step_range` says which steps those cover
("steps 5-8 (resumed from step 4)").
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ava.data.model_tokens import tokens_for_data
from ava.train.checkpoint.export import export_checkpoint
from ava.train.checkpoint.store import best_tag
from ava.train.report.expert_usage import expert_usage
from ava.train.report.fit_verdict import FitVerdict, diagnose_fit
from ava.train.report.perplexity import perplexity
from ava.train.report.plots import read_metrics
from ava.train.runtime.run_info import peak_memory


def build_summary(result: Any, data: Any, out_dir: Path, started: float, cfg: Any,
             frozen_base: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: how the run ended, its losses, and the checks a smoke test relies on."""
    evaluates = cfg.training.eval_strategy != "no"
    best = best_tag(out_dir / "checkpoints")
    # save_strategy best: the model a fine-tuning run hands over is its best one, not its last.
    exported = out_dir / "checkpoints" / best if best and cfg.training.save_strategy == "best" else result.checkpoint
    model_dir = None
    tokens = tokens_for_data(cfg.data, getattr(data, "tokenizer", None))
    if exported is not None:
        model_dir = out_dir / "model"
        export_checkpoint(exported, result.model.config, model_dir, overwrite=True, lora_scaling=result.lora_scaling,
                          frozen_base=frozen_base, tokens=tokens)
    first, final = (result.losses[0], result.losses[-1]) if result.losses else (None, None)
    sample = None
    if result.sample is not None:
        prompt, generated = result.sample
        sample = {"prompt_ids": prompt, "continuation_ids": generated}
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:
            sample.update(prompt=tokenizer.decode(prompt), continuation=tokenizer.decode(generated))
    skipped_nonfinite = (result.health or {}).get("counts", {}).get("nonfinite_gradient", 0)
    checks = {
        "steps_completed": result.steps == result.planned_steps or result.status == "early_stopped",
        # A NaN loss the health monitor caught (its update skipped) is handled, not a failure.
        "loss_finite": not result.losses or math.isfinite(result.losses[-1])
        and sum(not math.isfinite(v) for v in result.losses) <= skipped_nonfinite,
        "evaluated": result.evaluations > 0 if evaluates and data.eval is not None else None,
        "checkpoint_saved": result.checkpoint is not None,
        "checkpoint_reloads_exactly": result.checkpoint_reload_ok,
        "model_exported": model_dir is not None and (model_dir / "model.safetensors").is_file(),
    }
    return {
        "status": result.status, "steps": result.steps, "planned_steps": result.planned_steps,
        # first_loss, tokens, tokens_per_s and the times cover the steps this process ran, not a resumed run's past
        "step_range": step_range(result.start_step, result.steps),
        **({"failure": result.failure} if result.failure else {}),
        "precision": result.precision.as_dict() if result.precision is not None else None,
        "gradient_health": result.health,
        "first_loss": first, "final_loss": final,
        "eval_loss": result.eval_loss,
        "eval_perplexity": perplexity(result.eval_loss) if result.eval_loss is not None else None,
        "best_eval_loss": result.best_eval_loss, "best_step": result.best_step,
        "best_checkpoint": str(out_dir / "checkpoints" / best) if best else None,
        "final_checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "model_dir": str(model_dir) if model_dir else None,
        "exported_checkpoint": str(exported) if exported else None,
        "init_from": cfg.training.init_from,
        "tokenizer": tokens.as_dict(model_dir),
        "parameters": result.parameters.as_dict() if result.parameters is not None else None,
        "warnings": [*data.warnings, *result.warnings],
        "tokens": result.tokens, "seconds": time.perf_counter() - started,
        "tokens_per_s": result.tokens / result.seconds if result.seconds else None, "output_dir": str(out_dir),
        "first_step_seconds": result.first_step_seconds,
        "entropy_rate": data.entropy_rate, "sample": sample, "held_out": held_out_record(data.eval),
        **peak_memory(),
        "checks": checks, "checks_passed": all(v is not False for v in checks.values()),
    }


def step_range(start_step: int, last_step: int) -> dict[str, Any]:
    """The steps this process ran, which the summary's first loss, tokens and speed cover.

    `start_step`: the checkpoint a resumed run continued from (0: a fresh run).
    `text` says it in words: "steps 5-8 (resumed from step 4)".
    """
    first = start_step + 1
    text = f"steps {first}-{last_step}" if last_step >= first else "no steps"
    if start_step:
        text += f" (resumed from step {start_step})"
    return {"first": first, "last": last_step, "resumed_from": start_step or None, "text": text}


def held_out_record(eval_batches: Any) -> dict[str, Any] | None:
    """Which held-out set the run evaluated on: the fingerprint its evaluation records carry, and its shape.

    Two runs' (or one run's) evaluation losses are comparable only on the same
    fingerprint; None when nothing was held out.
    """
    if eval_batches is None:
        return None
    return {"fingerprint": eval_batches.fingerprint(), "sequences": eval_batches.covered,
            "max_length": int(eval_batches.sequences.shape[1])}


def add_diagnosis(summary: dict[str, Any], metrics_path: Path, cfg: Any) -> Any:
    """The fit verdict, for MoE the expert-utilisation report, and the quantized evaluation, from metrics.jsonl.

    Read from metrics.jsonl rather than this process's records so that a
    resumed run is judged on its full history.
    """
    records = read_metrics(metrics_path)
    summary["fit"] = diagnose_fit(records).as_dict() if cfg.training.eval_strategy != "no" else None
    usage = expert_usage(records, cfg.model.expert_capacity_factor) if cfg.model.is_moe else None
    summary["experts"] = usage.as_dict() if usage is not None else None
    summary["quantization"] = quantized_evaluation(records)
    if usage is not None:
        summary["warnings"] = summary["warnings"] + list(usage.warnings)
    return usage


def print_diagnosis(summary: dict[str, Any], usage: Any, console: Any) -> None:
    """The verdict line, the expert table and every warning again, last, where the user looks."""
    if summary.get("fit"):
        console.note(FitVerdict(**summary["fit"]).line())
    if usage is not None:
        console.expert_table(usage)
    if summary.get("quantization"):
        console.note(f"quantization: {summary['quantization']['line']}")
    for warning in summary["warnings"]:
        console.warn(warning)


def quantized_evaluation(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last `quantized_evaluation` event (`quantization:`): both held-out losses, what was converted; or None."""
    events = [r for r in records if r.get("event") == "quantized_evaluation" and isinstance(r.get("quantization"), dict)]
    return {**events[-1]["quantization"], "line": events[-1]["reason"]} if events else None


def print_checks(summary: dict[str, Any]) -> None:
    labels = {"steps_completed": "all planned steps ran",
              "loss_finite": "every loss finite (or its update skipped by the gradient-health monitor)",
              "evaluated": "held-out evaluation ran", "checkpoint_saved": "checkpoint saved",
              "checkpoint_reloads_exactly": "checkpoint reloads to the same loss",
              "model_exported": "consolidated weights exported (model/)"}
    print("run checks:")
    for key, ok in summary["checks"].items():
        mark = "skip" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {mark:<4}  {labels[key]}")
    memory = ", ".join(f"{k.removeprefix('memory/')} {v:.2f} GB" for k, v in summary.items()
                       if k.startswith("memory/"))
    losses = (f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
              if summary["first_loss"] is not None else "no steps run")
    covered = summary.get("step_range") or {}
    if covered.get("resumed_from"):  # the losses, tokens and times are this process's: say which steps those are
        losses = f"{covered['text']}: {losses}"
    print(f"{'PASSED' if summary['checks_passed'] else 'FAILED'}: {summary['status']}, {summary['steps']} steps, "
          f"{losses}, best eval loss {_number(summary['best_eval_loss'])}, {summary['seconds']:.1f} s "
          f"({summary['first_step_seconds']:.1f} s to the first step), memory {memory or 'n/a'}")
    if summary.get("failure"):
        print(f"run failed: {summary['failure']}")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
