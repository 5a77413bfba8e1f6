"""Run the configured RLHF stages in order, each from the right starting model, and keep what each produces.

Each stage writes `<output_dir>/<stage>/model/` (an Ava model directory with
the tokenizer it read, `tokenizer.json` + `special_tokens.json`; the reward
stage adds its scalar head) and `<stage>/summary.json`. A policy stage
starts from `init_from` -- an earlier stage's policy or a model directory --
or else from the policy the previous policy stage produced, or
`rlhf.policy_path`, or a freshly initialised model. A stage whose summary says
it completed is not run again by `--resume`: the pipeline picks up at the
first stage that did not finish.
"""

from __future__ import annotations

import copy
import gc
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ava.config.schema import AvaConfig
from ava.data.model_tokens import ModelTokens, read_model_tokens
from ava.data.tokenizer import ByteTokenizer, Tokenizer, check_vocab, load_tokenizer
from ava.errors import UserError
from ava.model import AvaForCausalLM
from ava.model.lora import ADAPTER_FILE, apply_lora, merge_for_export, parameter_report, save_adapters
from ava.rlhf.engines import RoleEngine, full_state_dict
from ava.rlhf.models import check_model_dir, disable_dropout, load_policy, model_dir, save_policy, save_value_model
from ava.rlhf.rewards import Scorer, make_scorer, task_reward
from ava.rlhf.stage import StageEnv, StageFailed, StageResult
from ava.rlhf.tasks import Task, make_task
from ava.train.checkpoint.resume import check_resumable
from ava.train.checkpoint.store import latest_complete, read_state
from ava.train.runtime.distributed import ProcessInfo
from ava.train.runtime.faults import FaultPlan
from ava.train.runtime.preemption import PreemptionFlag

SUMMARY = "summary.json"


@dataclass
class PipelineResult:
    stages: list[dict[str, Any]] = field(default_factory=list)
    status: str = "completed"


def rlhf_tokenizer(cfg: AvaConfig) -> Tokenizer:
    """The tokenizer the policy reads: a `tokenizer.json`, else the one `rlhf.policy_path` holds, else bytes.

    Never trained here. A policy written by Ava (or imported with
    `ava model import-hf`) carries its tokenizer, so null takes that one: the
    byte tokenizer would fit inside a BPE model's vocabulary and feed it
    ids it never learned.
    """
    name = cfg.data.tokenizer_name
    policy = _policy_tokenizer(cfg.rlhf.policy_path) if name is None and cfg.rlhf is not None else None
    if policy is not None:
        tokenizer: Tokenizer = policy
    elif name is None:
        tokenizer = ByteTokenizer()
    elif name == "bpe":
        raise UserError("data.tokenizer_name: bpe trains a tokenizer on a pre-training corpus; RLHF must use "
                        "the tokenizer the policy was trained with",
                        "set data.tokenizer_name to that tokenizer.json (Ava caches trained ones under "
                        "~/.cache/ava), or null for bytes")
    else:
        tokenizer = load_tokenizer(name)
    check_vocab(tokenizer, cfg.model.vocab_size, "data.tokenizer_name")
    return tokenizer


def _policy_tokenizer(policy_path: str | None) -> Tokenizer | None:
    """The tokenizer saved beside the starting policy, or None when it has none (or there is no policy_path)."""
    if policy_path is None or not Path(policy_path).exists():
        return None  # a missing policy_path is reported, with its fix, where the policy is loaded
    tokens = read_model_tokens(model_dir(policy_path, "rlhf.policy_path"))
    return tokens.tokenizer if tokens is not None else None


def _stage_summary(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def stage_complete(stage_dir: Path) -> dict[str, Any] | None:
    summary = _stage_summary(stage_dir)
    if summary is None:
        return None
    return summary if summary.get("status") == "completed" and (stage_dir / "model").is_dir() else None


@dataclass
class PipelinePlan:
    """What every stage shares, resolved and checked before any process group or model exists."""

    config: AvaConfig
    tokenizer: Tokenizer
    task: Task
    scorer: Scorer | None


def prepare_pipeline(cfg: AvaConfig) -> PipelinePlan:
    """Resolve the tokenizer, task and reward, and open every file a stage will read.

    Everything a later stage reads is checked now, so a typo in a path fails
    in seconds, not after hours of SFT; any problem is a UserError.
    """
    r = cfg.rlhf
    assert r is not None
    tokenizer = rlhf_tokenizer(cfg)
    task = make_task(r.task.name, r.task.length)
    scorer = make_scorer(r.reward_function, task)
    preflight(cfg, tokenizer, task)
    return PipelinePlan(cfg, tokenizer, task, scorer)


def run_pipeline(plan: PipelinePlan, out_dir: Path, process: ProcessInfo, log: Callable[[dict], None],
                 note: Callable[[str], None], resume: bool = False,
                 preemption: PreemptionFlag | None = None, trust_checkpoint: bool = False,
                 faults: FaultPlan | None = None) -> PipelineResult:
    """Run the plan's stages in order under `out_dir`.

    `resume` skips the stages that completed and continues the first one that
    did not from its latest in-stage checkpoint, if it wrote one (a stage that
    failed starts over: continuing would repeat the failure). A stop signal
    (`preemption`) checkpoints the running stage and ends the pipeline with
    status "preempted". `faults` injects faults for tests (`ava.train.runtime.faults`).
    """
    cfg, tokenizer, task, scorer = plan.config, plan.tokenizer, plan.task, plan.scorer
    r = cfg.rlhf
    assert r is not None
    seed = cfg.data.shuffle_seed
    policies: dict[str, Path] = {}  # stage -> the policy it wrote
    latest = model_dir(r.policy_path, "rlhf.policy_path") if r.policy_path else None
    reward_model = model_dir(r.reward_model_path, "rlhf.reward_model_path") if r.reward_model_path else None
    result = PipelineResult()
    for stage in r.stages:
        stage_dir = out_dir / stage
        done = stage_complete(stage_dir) if resume else None
        if done is not None:
            _same_settings(done, _settings(r, stage), stage, stage_dir)
            note(f"{stage}: already completed in {stage_dir} (resume): using its model")
            result.stages.append(done)
        else:
            point = _stage_checkpoint(stage_dir) if resume else None
            if point is not None:
                stopped = _stage_summary(stage_dir)
                if stopped is not None:
                    _same_settings(stopped, _settings(r, stage), stage, stage_dir)
                check_resumable(point, process.world_size, trusted=trust_checkpoint, exact=True)
                note(f"{stage}: resuming inside the stage from {point}")
            elif resume and _failed(stage_dir):
                _clear_checkpoints(stage_dir, process)
                note(f"{stage}: failed before; starting it over")
            env = StageEnv(cfg, process, tokenizer, task, stage_dir, seed, log, note, preemption, point, faults)
            start = _start_model(r, stage, policies, latest)
            ppo_reward = _ppo_reward(r, reward_model, out_dir, task, scorer) if stage == "ppo" else None
            try:
                stage_result, engine, scaling = _run_stage(env, stage, start, scorer, ppo_reward)
            except StageFailed as exc:
                stage_result, engine, scaling = StageResult(stage, status="failed", failure=str(exc)), None, None
            if engine is not None and stage_result.status == "completed":
                _save(engine, stage_dir / "model", stage, scaling, process, start, ModelTokens.of(tokenizer))
                stage_result.model_dir = stage_dir / "model"
            summary = _write_summary(stage_result, stage_dir, process, start, _settings(r, stage))
            result.stages.append(summary)
            del engine
            gc.collect()
            if stage_result.status == "preempted":
                result.status = "preempted"
                note(f"{stage} stopped by a signal at step {stage_result.steps}: its checkpoint is in "
                     f"{stage_dir / 'checkpoints'}; --resume continues inside the stage")
                break
            if stage_result.status != "completed":
                result.status = "failed"
                note(f"{stage} failed: {stage_result.failure}")
                break
            _clear_checkpoints(stage_dir, process)  # the stage's model is written: they have done their job
        if stage == "reward":
            reward_model = stage_dir / "model"
        else:
            policies[stage] = latest = stage_dir / "model"
    return result


def forget_unsaved_records(metrics: Path, out_dir: Path, stages: list[str]) -> None:
    """Before a resume: drop what the stages to run again logged beyond their checkpoints (they log it again).

    A stage that completed keeps its records; one resumed from an in-stage
    checkpoint keeps those up to its step (its step-0 evaluation included);
    one that starts over loses them all. Health events are numbered by their
    engine's update, so they are compared with the updates the checkpoint holds.
    """
    if not metrics.is_file():
        return
    keep_until: dict[str, int] = {}
    updates: dict[tuple[str, str], int] = {}  # (stage, role) -> the updates its checkpoint holds
    for stage in stages:
        if stage_complete(out_dir / stage) is None:
            point = _stage_checkpoint(out_dir / stage)
            keep_until[stage] = int(point.name.removeprefix("step")) if point is not None else -1
            if point is not None:
                for saved in read_state(point / "ava_state_rank0.pt")["data"].get("updaters", []):
                    updates[(stage, saved.get("role", ""))] = int(saved["updates"])
    kept = []
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        stage = record.get("stage", "")
        limit = keep_until.get(stage)
        if "event" in record and "update" in record:  # a health event: numbered by its engine's update
            saved_updates = updates.get((stage, record.get("role", "")), -1 if limit is not None else None)
            keep = saved_updates is None or record["update"] <= saved_updates
        else:
            keep = limit is None or record.get("step", 0) <= limit
        if keep:
            kept.append(line)
    tmp = metrics.with_name(metrics.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(metrics)


def _failed(stage_dir: Path) -> bool:
    summary = _stage_summary(stage_dir)
    return summary is not None and summary.get("status") == "failed"


def _stage_checkpoint(stage_dir: Path) -> Path | None:
    """The latest complete in-stage checkpoint of a stage to continue (stopped, or killed), if it wrote one."""
    if _failed(stage_dir):
        return None
    tag = latest_complete(stage_dir / "checkpoints")
    return stage_dir / "checkpoints" / tag if tag is not None else None


def _clear_checkpoints(stage_dir: Path, process: ProcessInfo) -> None:
    """Remove a stage's checkpoints (rank 0), once the others have looked at them."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if process.rank == 0:
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _run_stage(env: StageEnv, stage: str, start: Path | None, scorer: Scorer | None, ppo_reward: PPOReward | None
               ) -> tuple[StageResult, RoleEngine, float | None]:
    """Build the stage's starting model(s) and run it; returns the result, the engine to save, LoRA's scaling."""
    from ava.rlhf.dpo import run_dpo
    from ava.rlhf.grpo import run_grpo
    from ava.rlhf.ppo import run_ppo
    from ava.rlhf.reward_model import run_reward
    from ava.rlhf.sft import run_sft

    cfg, r = env.config, env.rlhf
    policy = _load_or_fresh(cfg, start, env.seed, env.note, stage)
    if stage == "reward":
        result, engine = run_reward(env, policy)
        return result, engine, None
    if r.disable_dropout:
        disable_dropout(policy)
    reference = copy.deepcopy(policy) if stage != "sft" else None  # the frozen start DPO, PPO, GRPO stay near
    scaling = _lora(cfg, policy, env.note, stage)
    if stage == "sft":
        result, engine = run_sft(env, policy, scorer)
    elif stage == "dpo":
        result, engine = run_dpo(env, policy, reference)
    elif stage == "ppo":
        assert ppo_reward is not None
        result, engine = run_ppo(env, policy, reference, scorer, ppo_reward.scorer, ppo_reward.model)
    else:
        result, engine = run_grpo(env, policy, reference, scorer)
    return result, engine, scaling


def preflight(cfg: AvaConfig, tokenizer: Tokenizer, task: Task) -> None:
    """Open every model directory and data file the stages will read; any problem is a UserError now."""
    from ava.rlhf.data import read_jsonl

    r = cfg.rlhf
    assert r is not None
    if r.policy_path:
        check_model_dir(r.policy_path, "rlhf.policy_path")
    if r.reward_model_path:
        check_model_dir(r.reward_model_path, "rlhf.reward_model_path", value=True)
    files = {"sft": ("data_path", ("prompt", "response"), ()), "reward": ("data_path", ("prompt", "chosen", "rejected"), ()),
             "dpo": ("data_path", ("prompt", "chosen", "rejected"), ())}
    for stage in r.stages:
        section = getattr(r, stage)
        if section.init_from is not None and section.init_from not in ("sft", "reward", "dpo", "ppo", "grpo"):
            check_model_dir(section.init_from, f"rlhf.{stage}.init_from")
        if stage in files and getattr(section, files[stage][0]) is not None:
            key, fields, optional = files[stage]
            read_jsonl(getattr(section, key), fields, f"rlhf.{stage}.{key}", optional)
        elif stage in ("ppo", "grpo"):
            _check_prompts(cfg, stage, tokenizer, task)


def _check_prompts(cfg: AvaConfig, stage: str, tokenizer: Tokenizer, task: Task) -> None:
    """Every prompt an RL stage will answer fits the context with its response, and has an answer if scored by one."""
    from ava.rlhf.data import read_jsonl

    r = cfg.rlhf
    assert r is not None
    path = getattr(r, stage).prompts_path
    setting = f"rlhf.{stage}.prompts_path"
    rows = (read_jsonl(path, ("prompt",), setting, ("answer",)) if path is not None
            else [{"prompt": task.sample(random.Random(0)).prompt, "answer": ""}])
    limit, new = cfg.model.max_position_embeddings, r.generation.max_new_tokens
    for number, row in enumerate(rows, 1):
        length = len(tokenizer.encode(row["prompt"]))
        if length + new > limit:
            where = f"{path} line {number}: a {length}-token prompt" if path else f"a {length}-token '{task.name}' prompt"
            raise UserError(f"rlhf.generation.max_new_tokens = {new} after {where} exceeds "
                            f"model.max_position_embeddings = {limit}",
                            f"set rlhf.generation.max_new_tokens <= {limit - length}, or shorten the prompts")
    if path is not None and _scored_by_task(r, stage):
        unanswered = [n for n, row in enumerate(rows, 1) if row.get("answer") is None]
        if unanswered:
            raise UserError(f"{setting}: {path} line {unanswered[0]} (and {len(unanswered) - 1} more) has no "
                            f"\"answer\", but the rewards come from the '{task.name}' task's scorer, which "
                            "compares with it", "add an \"answer\" to every prompt, or set rlhf.reward_function "
                            "(or a reward model) to score without one")


def _scored_by_task(r: Any, stage: str) -> bool:
    """Whether the stage's rollouts are scored by the task's scorer (which needs each prompt's answer)."""
    if stage == "grpo":
        return r.reward_function is None
    source = r.ppo.reward_source
    has_model = r.reward_model_path is not None or ("reward" in r.stages
                                                    and r.stages.index("reward") < r.stages.index("ppo"))
    return source == "task" or (source == "auto" and r.reward_function is None and not has_model)


def _start_model(r: Any, stage: str, policies: dict[str, Path], latest: Path | None) -> Path | None:
    origin = getattr(r, stage).init_from
    if origin is None:
        return latest
    if origin in policies:
        return policies[origin]
    return model_dir(origin, f"rlhf.{stage}.init_from")


def _load_or_fresh(cfg: AvaConfig, start: Path | None, seed: int, note: Callable[[str], None],
                   stage: str) -> AvaForCausalLM:
    if start is not None:
        note(f"{stage}: starting from {start}")
        return load_policy(start, f"rlhf.{stage}.init_from")
    if stage in ("ppo", "grpo", "dpo"):
        note(f"warning: {stage} starts from a freshly initialised model: run sft first, or set rlhf.policy_path, "
             "for rewards that can move")
    torch.manual_seed(seed)  # the same weights on every rank (DeepSpeed also broadcasts rank 0's)
    return AvaForCausalLM(cfg.model)


def _lora(cfg: AvaConfig, policy: AvaForCausalLM, note: Callable[[str], None], stage: str) -> float | None:
    lora = cfg.rlhf.lora if cfg.rlhf is not None else None
    if lora is None or not lora.enabled:
        return None
    scaling = apply_lora(policy, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    note(f"{stage}: LoRA r={lora.rank} alpha={lora.alpha:g} on {', '.join(lora.target_modules)}; "
         + parameter_report(policy).line())
    return scaling


@dataclass
class PPOReward:
    """What PPO's rollouts are scored with: a reward model directory, or else a scorer."""

    model: Path | None
    scorer: Scorer | None


def _ppo_reward(r: Any, given: Path | None, out_dir: Path, task: Task, scorer: Scorer | None) -> PPOReward:
    """`reward_source` resolved: auto takes the reward function, else a reward model, else the task's scorer."""
    source = r.ppo.reward_source
    trained = out_dir / "reward" / "model" if "reward" in r.stages[: r.stages.index("ppo")] else None
    model = trained or given
    if source == "model" or (source == "auto" and r.reward_function is None and model is not None):
        return PPOReward(model, None)
    if source == "task":
        return PPOReward(None, Scorer(task_reward(task), f"the {task.name} task's scorer", needs_answers=True))
    return PPOReward(None, scorer)


def _save(engine: RoleEngine, directory: Path, stage: str, lora_scaling: float | None, process: ProcessInfo,
          start: Path | None, tokens: ModelTokens) -> None:
    """Consolidate the trained weights (collective) and write them, with the tokenizer, on rank 0.

    With LoRA, the adapters come from the optimizer's fp32 master copy and the
    frozen base weights from the starting model's file: the engine's copy of
    the base may have been cast to bf16, and merging onto it would round a
    model nobody trained.
    """
    state = full_state_dict(engine, keep=process.rank == 0)
    if process.rank != 0:
        return
    config = engine.model_config
    tokens.save(directory)  # every stage's model leaves with the tokenizer it read
    if stage == "reward":
        save_value_model(state, config, directory)
        return
    adapter_file = directory / ADAPTER_FILE
    if lora_scaling is not None:
        base = load_policy(start, "the stage's starting model").state_dict() if start is not None else None
        state, adapters = merge_for_export(state, lora_scaling, base)
        save_adapters(directory, adapters)
    elif adapter_file.exists():
        adapter_file.unlink()  # from an earlier LoRA attempt at this stage: it does not belong to this model
    save_policy(state, config, directory)


def _settings(r: Any, stage: str) -> dict[str, Any]:
    """What a completed stage's model depends on, beside its starting model: compared on --resume."""
    return {stage: getattr(r, stage).model_dump(), "task": r.task.model_dump(), "lora": r.lora.model_dump(),
            "generation": r.generation.model_dump(), "reward_function": r.reward_function}


def _same_settings(done: dict[str, Any], now: dict[str, Any], stage: str, stage_dir: Path) -> None:
    before = done.get("settings")
    if before is None or before == now:
        return
    changed = []
    for section, values in now.items():
        old = before.get(section)
        if isinstance(values, dict) and isinstance(old, dict):
            changed += [f"{section}.{k}: {old.get(k)!r} -> {v!r}" for k, v in values.items() if old.get(k) != v]
        elif old != values:
            changed.append(f"{section}: {old!r} -> {values!r}")
    if not changed:  # only keys added since (a newer Ava), at their defaults
        return
    what = "completed" if done.get("status") == "completed" else "was checkpointed"
    raise UserError(f"--resume: the {stage} stage in {stage_dir} {what} with other settings "
                    f"(rlhf.{'; rlhf.'.join(changed)}), so its model is not what this config asks for",
                    "resume with the settings it ran with, or start a new --output_dir")


def _write_summary(result: StageResult, stage_dir: Path, process: ProcessInfo, start: Path | None,
                   settings: dict[str, Any]) -> dict[str, Any]:
    summary = {"stage": result.stage, "status": result.status, "steps": result.steps, "seconds": result.seconds,
               "settings": settings,
               "started_from": str(start) if start else "a fresh model",
               "model_dir": str(result.model_dir) if result.model_dir else None,
               **({"failure": result.failure} if result.failure else {}),
               "summary": result.summary, "gradient_health": result.health}
    if process.rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(stage_dir / SUMMARY)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary
