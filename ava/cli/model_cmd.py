"""`ava model summary | import-hf | export-hf | export-checkpoint`.

Every import and export carries the model's tokenizer and special ids along
(`ava.data.model_tokens`, `ava.hf.tokenizer`): import-hf copies the Hugging
Face directory's tokenizer.json and ids into the Ava model directory, and the
exports write them beside the weights.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ava.cli.args import add_stack_arguments, new_parser, stack_from
from ava.config import load_config
from ava.errors import UserError

if TYPE_CHECKING:
    from ava.data.model_tokens import ModelTokens


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def summary(argv: Sequence[str]) -> int:
    parser = new_parser("ava model summary",
                        "Parameters (total, active per token, trainable, per component) and FLOPs per token.")
    add_stack_arguments(parser)
    parser.add_argument("--seq_len", type=int, default=None,
                        help="sequence length for the attention FLOPs (default: data.max_length)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    ns, extras = parser.parse_known_args(argv)
    stack = stack_from(ns, extras)
    resolved = load_config(stack.files, stack.overrides, stack.world)
    from ava.model.summary import summarise_config

    model_cfg = resolved.config.model
    seq = ns.seq_len or resolved.config.data.max_length
    s = summarise_config(model_cfg, seq)
    from ava.cli.stack_report import memory_verdict, model_shape_notice

    notices = model_shape_notice(resolved, with_parameters=True)
    memory = memory_verdict(resolved)
    if ns.json:
        print(json.dumps({**s.as_dict(), "model_shape_notices": notices,
                          "memory": {**memory.estimate.as_dict(), "memory_gb": memory.memory_gb, "fits": memory.fits}},
                         indent=2))
        return 0
    top_k = 1 if model_cfg.router_type == "switch" else model_cfg.num_experts_per_token
    kind = (f"MoE: {model_cfg.num_experts} experts, top-{top_k} ({model_cfg.router_type})"
            if model_cfg.is_moe else "dense (monolith)")
    rows = [("total parameters", s.total), ("active per token", s.active_per_token),
            ("trainable", s.trainable)]
    print(f"Model from {stack.files.config}: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, {kind}")
    for line in notices:
        print(f"  note: {line}")
    for name, value in rows:
        print(f"  {name:<28}{value:>16,}  ({_human(value)})")
    print("  by component:")
    for name, value in sorted(s.components.items(), key=lambda kv: -kv[1]):
        print(f"    {name:<26}{value:>16,}  {100 * value / s.total:5.1f}%")
    print(f"  FLOPs per token at seq {seq}:")
    print(f"    {'forward':<26}{s.forward_flops_per_token:>16,}  ({_human(s.forward_flops_per_token)})")
    print(f"    {'training (fwd+bwd)':<26}{s.training_flops_per_token:>16,}  ({_human(s.training_flops_per_token)})")
    if s.features:
        print("  enhanced features:")
        for name, text in s.features.items():
            print(f"    {name:<26}{text}")
    b = resolved.batch
    print(f"training at micro batch {b.micro} x {resolved.config.data.max_length} tokens on {b.world.size} rank(s) "
          f"[{b.world.source}], {resolved.config.training.mixed_precision}, ZeRO stage "
          f"{resolved.config.deepspeed.zero_stage}:")
    print("\n".join("  " + line for line in memory.table()))
    if memory.warning():
        print(f"  WARNING: {memory.warning()}")
    return 0


def import_hf_cmd(argv: Sequence[str]) -> int:
    parser = new_parser("ava model import-hf", "Convert a local Hugging Face Llama, Mixtral or GPT-2 checkpoint "
                        "into an Ava model directory (ava_model.yaml + model.safetensors).")
    parser.add_argument("source", help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="Ava model directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    ns = parser.parse_args(argv)
    from pathlib import Path

    from ava.hf import import_hf
    from ava.hf.tokenizer import read_hf_tokens
    from ava.model.store import save_model_dir
    from ava.model.summary import summarise_model

    model = import_hf(ns.source)
    try:
        tokens = read_hf_tokens(Path(ns.source))
    except UserError as exc:  # the weights are still worth having: say what stayed behind
        tokens = None
        print(f"warning: the tokenizer was not brought along: {exc.message} ({exc.fix})", file=sys.stderr)
    save_model_dir(model, ns.out, overwrite=ns.overwrite)
    if tokens is not None:
        tokens.save(ns.out)
    s = summarise_model(model, model.config.max_position_embeddings)
    print(f"wrote {ns.out}: {_human(s.total)} parameters; its model: section is in {ns.out}/ava_model.yaml")
    print(f"tokenizer: {tokens.describe()}" if tokens is not None
          else f"tokenizer: none ({ns.source} holds no tokenizer.json and no special token ids)")
    return 0


def export_hf_cmd(argv: Sequence[str]) -> int:
    parser = new_parser("ava model export-hf", "Write an Ava model directory as a Hugging Face checkpoint "
                        "that transformers' from_pretrained loads.")
    parser.add_argument("source", help="Ava model directory (ava_model.yaml + model.safetensors)")
    parser.add_argument("--out", required=True, help="Hugging Face directory to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    ns = parser.parse_args(argv)
    import torch

    from ava.data.model_tokens import read_model_tokens
    from ava.hf import export_hf
    from ava.model.store import load_model_dir

    model = load_model_dir(ns.source)
    tokens = read_model_tokens(ns.source)
    family = export_hf(model, ns.out, dtype=getattr(torch, ns.dtype), overwrite=ns.overwrite, tokens=tokens)
    if model.config.is_moe and model.config.expert_capacity_factor:
        print(f"note: the model was trained with expert_capacity_factor {model.config.expert_capacity_factor}; "
              "Mixtral routes without a capacity limit, so its outputs differ where Ava dropped tokens",
              file=sys.stderr)
    print(f"wrote {ns.out} as {family}; {_tokens_line(tokens)}")
    return 0


def _tokens_line(tokens: ModelTokens | None) -> str:
    """What an export says about the tokenizer it wrote (or could not)."""
    if tokens is None:
        return "no tokenizer: the source holds no tokenizer.json or special_tokens.json, so eos/bos/pad are null"
    return f"tokenizer: {tokens.describe()}"


def export_checkpoint_cmd(argv: Sequence[str]) -> int:
    parser = new_parser("ava model export-checkpoint", "Consolidate a training checkpoint (any ZeRO stage) into "
                        "an Ava model directory, or a Hugging Face checkpoint with --hf.")
    parser.add_argument("source", help="a run directory, its checkpoints/ directory, or one checkpoints/stepNNNNNNNN")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--best", action="store_true",
                        help="from a run: the checkpoint with the lowest eval loss (default: the latest)")
    parser.add_argument("--hf", action="store_true", help="write a Hugging Face checkpoint (Llama/Mixtral/GPT-2)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load the checkpoint even though its pickles reference objects beyond tensors and "
                        "DeepSpeed's optimizer state (they could run code); only for checkpoints you trust")
    ns = parser.parse_args(argv)
    from pathlib import Path

    import torch

    from ava.train.checkpoint.export import (
        export_checkpoint,
        resolve_checkpoint,
        run_frozen_base,
        run_lora_scaling,
        run_model_config,
        run_tokens,
    )
    from ava.train.checkpoint.trust import check_checkpoint

    source = Path(ns.source)
    if not source.is_dir():
        raise UserError(f"{source} is not a directory", "point at a run directory written by train.py")
    point = resolve_checkpoint(source, "best" if ns.best else "latest")
    run_dir = point.parent.parent
    check_checkpoint(point, trusted=ns.trust_checkpoint)
    tokens = run_tokens(run_dir)
    written = export_checkpoint(point, run_model_config(run_dir), Path(ns.out), hf=ns.hf,
                                dtype=getattr(torch, ns.dtype), overwrite=ns.overwrite,
                                lora_scaling=run_lora_scaling(run_dir), frozen_base=run_frozen_base(run_dir),
                                tokens=tokens)
    print(f"wrote {ns.out} from {point} as {written}; {_tokens_line(tokens)}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "summary": summary, "import-hf": import_hf_cmd, "export-hf": export_hf_cmd,
    "export-checkpoint": export_checkpoint_cmd}
