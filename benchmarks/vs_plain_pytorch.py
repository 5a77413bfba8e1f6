"""A whole `train.py` run against the simplest thing a user could write instead: a plain PyTorch loop.

    python benchmarks/vs_plain_pytorch.py [--shapes small,tiny] [--small_steps 2000] [--tiny_steps 100]
        [--rounds 2] [--json out.json]

The question a new user asks is not "how fast is Ava's step" but "would a
60-line nanoGPT-style script have finished sooner, and learned as much?".  So
both contestants are whole processes timed from outside, start-up to exit, on
the same data, model, optimizer settings, steps, evaluation and checkpoint
cadence:

- **ava**: `python train.py --config configs/gpu/tiny.yaml --hardware_config
  configs/hardware/cpu.yaml --data.data_dir D ...` exactly as a user types it,
  with everything it does by default at the end (final checkpoint, reload
  check, model export, plots, sample, summary).
- **plain**: this file run with `--plain` (see `plain_loop`): torch AdamW with
  nanoGPT's decay groups (matrices decayed, 1-D tensors not), the same
  warmup + cosine schedule, `clip_grad_norm_`, a per-step `loss.item()`, an
  evaluation on the held-out rows every `eval_steps`, and `torch.save` of the
  model and optimizer at every `save_steps` and at the end.  It reuses Ava's
  model class only so that the two train the very same network from the same
  initialisation; its loop, batching and optimizer are its own.

Data: this Python's standard library as bytes (char-level), written once as
nanoGPT-layout `train.bin` / `val.bin`, so neither side pays for corpus
preparation the other skips.  Both take packed rows of `max_length` tokens in
the same seeded order (numpy `default_rng([seed, epoch])` permutations, as
`ava.data.batches` does), and evaluate on the same 64 held-out rows.

Shapes: `small`, the 0.8M-parameter GPT of issue 22 (4 layers, 4 heads, width
128, context 64, batch 12, dense GELU MLP, LayerNorm, learned positions,
fp32), 2,000 steps, evaluating every 250; `tiny`, `configs/gpu/tiny.yaml`
as shipped (13M-parameter MoE, context 128, batch 8), 100 steps, evaluating
every 25.  Rounds alternate the order of the two contestants; each one's
fastest round is reported (on a shared machine noise only adds time).

Reported per contestant: whole-run wall time (outside), launch to the end of
the first optimizer step, steady-state tokens/s (median over logging
windows), end-of-run time (last step to exit) and the final held-out loss.
Targets (issue 22): Ava's wall time <= 0.8x plain at `small`, <= 1.0x at
`tiny`, with held-out loss equal or lower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
EVAL_ROWS = 64
TRAIN_TOKENS = 2_000_000
BYTE_EOS = 256
TARGETS = {"small": 0.8, "tiny": 1.0}


@dataclass(frozen=True)
class Shape:
    name: str
    overrides: tuple[str, ...]  # train.py overrides on top of tiny.yaml + cpu.yaml
    max_length: int
    steps: int
    eval_steps: int
    save_steps: int
    logging_steps: int
    warmup_steps: int


SMALL_MODEL = ("--hidden_size", "128", "--num_layers", "4", "--num_attention_heads", "4", "--intermediate_size", "512",
               "--vocab_size", "257", "--max_position_embeddings", "64", "--model.num_experts=1",
               "--model.activation=gelu", "--model.norm_type=layernorm", "--model.position_embedding_type=learned",
               "--max_length", "64", "--batch_size", "12")


def shapes(small_steps: int, tiny_steps: int) -> dict[str, Shape]:
    return {
        "small": Shape("small", SMALL_MODEL, 64, small_steps, max(1, small_steps // 8), max(1, small_steps // 8), 10,
                       min(100, small_steps // 10)),
        "tiny": Shape("tiny", (), 128, tiny_steps, max(1, tiny_steps // 4), tiny_steps, 10, min(10, tiny_steps // 10)),
    }


def write_data(directory: Path, max_length: int) -> None:
    """train.bin / val.bin (uint16, nanoGPT layout): stdlib sources as bytes, documents ended by id 256."""
    import numpy as np

    from ava.data.builtin import stdlib_documents

    directory.mkdir(parents=True, exist_ok=True)
    pieces: list[np.ndarray] = []
    total = 0
    for text in stdlib_documents():
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        pieces.extend([ids, np.array([BYTE_EOS], dtype=np.uint16)])
        total += ids.size + 1
        if total >= TRAIN_TOKENS + EVAL_ROWS * max_length:
            break
    tokens = np.concatenate(pieces)
    held = EVAL_ROWS * max_length
    tokens[:-held].tofile(directory / "train.bin")
    tokens[-held:].tofile(directory / "val.bin")


# ----------------------------------------------------------------------------------------------------------------
# The plain loop: what a user writes instead of a toolkit.


def plain_loop(args: argparse.Namespace) -> dict[str, Any]:
    """nanoGPT-style training of Ava's model on `args.data`; returns times (since `args.t0`) and losses."""
    import numpy as np
    import torch

    from ava.config.model_file import load_model_config
    from ava.model import AvaForCausalLM

    train = np.fromfile(Path(args.data) / "train.bin", dtype=np.uint16).astype(np.int64)
    val = np.fromfile(Path(args.data) / "val.bin", dtype=np.uint16).astype(np.int64)
    length = args.max_length
    train_rows = train[: train.size // length * length].reshape(-1, length)
    val_rows = val[: val.size // length * length].reshape(-1, length)

    torch.manual_seed(args.seed)
    model = AvaForCausalLM(load_model_config(args.model_config))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
        return args.lr_end + (args.lr - args.lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def batches():
        epoch = 0
        while True:
            order = np.random.default_rng([args.seed, epoch]).permutation(len(train_rows))
            for start in range(0, len(order) - args.batch + 1, args.batch):
                yield torch.from_numpy(train_rows[order[start:start + args.batch]])
            epoch += 1

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = [model(torch.from_numpy(val_rows[i:i + args.eval_batch]),
                        labels=torch.from_numpy(val_rows[i:i + args.eval_batch])).lm_loss.item()
                  for i in range(0, len(val_rows) - args.eval_batch + 1, args.eval_batch)]
        model.train()
        return sum(losses) / len(losses)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamps: list[float] = []
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    model.train()
    for step, batch in zip(range(args.steps), batches(), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        losses.append(loss.item())
        done = step + 1
        if done % args.logging_steps == 0 or done == args.steps:
            print(f"step {done} loss {losses[-1]:.4f}", flush=True)
        stamps.append(time.time() - args.t0)
        if done % args.eval_steps == 0 or done == args.steps:
            evals.append((done, evaluate()))
        if done % args.save_steps == 0 or done == args.steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done},
                       out / "ckpt.pt")
    return {"stamps": stamps, "losses": losses, "evals": evals}


# ----------------------------------------------------------------------------------------------------------------
# Running and timing both.


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _stream(cmd: list[str], first_prefix: str | None) -> tuple[float, dict[str, float], list[str]]:
    """Run `cmd`, returning its wall time, when lines starting with a milestone arrived, and its output."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen: dict[str, float] = {}
    lines: list[str] = []
    for line in proc.stdout:
        now = time.time() - start
        if first_prefix and "outputs" not in seen and line.startswith(first_prefix):
            seen["outputs"] = now
        if line.startswith("step "):
            seen["last_step_line"] = now
        lines.append(line)
    proc.wait()
    wall = time.time() - start
    if proc.returncode != 0:
        sys.stdout.write("".join(lines[-40:]))
        raise SystemExit(f"{cmd[1]} failed (exit code {proc.returncode})")
    return wall, seen, lines


def run_ava(shape: Shape, data: Path, work: Path) -> dict[str, Any]:
    out = work / "ava"
    cmd = [sys.executable, "train.py", "--config", "configs/gpu/tiny.yaml", "--hardware_config",
           "configs/hardware/cpu.yaml", *shape.overrides, "--data.data_dir", str(data), "--max_steps", str(shape.steps),
           "--eval_steps", str(shape.eval_steps), "--save_steps", str(shape.save_steps), "--logging_steps",
           str(shape.logging_steps), "--warmup_steps", str(shape.warmup_steps), "--output_dir", str(out)]
    wall, seen, _ = _stream(cmd, "outputs:")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r.get("step", 0) > shape.logging_steps]
    first = seen["outputs"] + float(summary["first_step_seconds"]) if "outputs" in seen else float("nan")
    return {"command": " ".join(cmd[1:-1]) + " TMP", "wall_s": wall, "first_step_s": first,
            "tokens_per_s": statistics.median(rates) if rates else float("nan"),
            "end_s": wall - seen.get("last_step_line", wall), "eval_loss": float(summary["eval_loss"]),
            "model_config": str(out / "model" / "ava_model.yaml")}


def run_plain(shape: Shape, data: Path, work: Path, model_config: Path) -> dict[str, Any]:
    import yaml

    resolved = yaml.safe_load((work / "ava" / "config.yaml").read_text())
    t, d = resolved["training"], resolved["data"]
    result_file = work / "plain.json"
    t0 = time.time()
    cmd = [sys.executable, __file__, "--plain", "--t0", repr(t0), "--data", str(data), "--model_config",
           str(model_config), "--out", str(work / "plain"), "--result", str(result_file),
           "--max_length", str(shape.max_length), "--batch", str(t["batch_size"]), "--eval_batch",
           str(d["eval_batch_size"]), "--steps", str(shape.steps), "--eval_steps", str(shape.eval_steps),
           "--save_steps", str(shape.save_steps), "--logging_steps", str(shape.logging_steps),
           "--warmup_steps", str(shape.warmup_steps), "--lr", str(t["learning_rate"]), "--lr_end", str(t["lr_end"]),
           "--beta1", str(t["beta1"]), "--beta2", str(t["beta2"]), "--eps", str(t["eps"]),
           "--weight_decay", str(t["weight_decay"]), "--clip", str(t["max_gradient_norm"]),
           "--seed", str(d["shuffle_seed"])]
    wall, _, _ = _stream(cmd, None)
    result = json.loads(result_file.read_text())
    stamps, tokens = result["stamps"], shape.max_length * int(t["batch_size"])
    windows = [(stamps[i + shape.logging_steps] - stamps[i]) for i in range(shape.logging_steps, len(stamps) -
                                                                         shape.logging_steps, shape.logging_steps)]
    rate = statistics.median(shape.logging_steps * tokens / w for w in windows) if windows else float("nan")
    return {"wall_s": wall, "first_step_s": stamps[0], "tokens_per_s": rate, "end_s": wall - stamps[-1],
            "eval_loss": result["evals"][-1][1]}


def compare(shape: Shape, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"vs_plain_{shape.name}_") as tmp:
        data = Path(tmp) / "data"
        write_data(data, shape.max_length)
        runs: dict[str, list[dict[str, Any]]] = {"ava": [], "plain": []}
        model_config = None
        for round_index in range(rounds):
            # Ava first in even rounds: the plain loop needs its resolved config, and noise hits both alike.
            order = ["ava", "plain"] if round_index % 2 == 0 or model_config is None else ["plain", "ava"]
            for who in order:
                work = Path(tmp) / f"{who}{round_index}"
                if who == "ava":
                    ava_work = work
                    result = run_ava(shape, data, work)
                    if model_config is None:
                        model_config = Path(tmp) / "model"
                        model_config.mkdir()
                        (model_config / "ava_model.yaml").write_text(Path(result["model_config"]).read_text())
                        config_run = work
                else:
                    work.mkdir(parents=True)
                    (work / "ava").mkdir()
                    (work / "ava" / "config.yaml").write_text((config_run / "ava" / "config.yaml").read_text())
                    result = run_plain(shape, data, work, model_config)
                print(f"  {shape.name} round {round_index + 1} {who}: wall {result['wall_s']:.1f} s, held-out loss "
                      f"{result['eval_loss']:.4f}", flush=True)
                runs[who].append(result)
        del ava_work
    best = {who: min(rs, key=lambda r: r["wall_s"]) for who, rs in runs.items()}
    ratio = best["ava"]["wall_s"] / best["plain"]["wall_s"]
    return {"shape": shape.name, "steps": shape.steps, "ava": best["ava"], "plain": best["plain"],
            "rounds": runs, "wall_ratio": ratio, "eval_loss_delta": best["ava"]["eval_loss"] - best["plain"]["eval_loss"],
            "target_ratio": TARGETS[shape.name],
            "target_met": ratio <= TARGETS[shape.name] and best["ava"]["eval_loss"] <= best["plain"]["eval_loss"] + 1e-3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="small,tiny")
    parser.add_argument("--small_steps", type=int, default=2000)
    parser.add_argument("--tiny_steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    plain = parser.add_argument_group("the plain loop's own process (internal)")
    plain.add_argument("--plain", action="store_true")
    for name, kind in (("t0", float), ("data", str), ("model_config", str), ("out", str), ("result", str),
                       ("max_length", int), ("batch", int), ("eval_batch", int), ("steps", int), ("eval_steps", int),
                       ("save_steps", int), ("logging_steps", int), ("warmup_steps", int), ("lr", float),
                       ("lr_end", float), ("beta1", float), ("beta2", float), ("eps", float), ("weight_decay", float),
                       ("clip", float), ("seed", int)):
        plain.add_argument(f"--{name}", type=kind)
    ns = parser.parse_args(argv)
    if ns.plain:
        result = plain_loop(ns)
        Path(ns.result).write_text(json.dumps(result))
        return 0

    sys.path.insert(0, str(REPO))
    from benchmarks.timing import print_table, write_json

    chosen = shapes(ns.small_steps, ns.tiny_steps)
    results = []
    for name in ns.shapes.split(","):
        print(f"== {name}: {chosen[name].steps} steps, {ns.rounds} round(s)", flush=True)
        results.append(compare(chosen[name], ns.rounds))
    rows = []
    for r in results:
        for who in ("ava", "plain"):
            x = r[who]
            rows.append([f"{r['shape']} ({r['steps']} steps)", who, x["wall_s"], x["first_step_s"], x["tokens_per_s"],
                         x["end_s"], x["eval_loss"]])
    print_table(["shape", "loop", "wall s", "launch -> first step s", "steady tokens/s", "end of run s",
                 "held-out loss"], rows)
    for r in results:
        verdict = "met" if r["target_met"] else "NOT met"
        print(f"{r['shape']}: ava / plain wall = {r['wall_ratio']:.2f} (target <= {r['target_ratio']}), held-out "
              f"loss ava - plain = {r['eval_loss_delta']:+.4f} (target <= 0): {verdict}")
    write_json(ns.json, {"results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
