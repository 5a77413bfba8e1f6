"""Scaling: tokens/s and memory of a training step as sequence, batch, experts and layers double, against prediction.

    python benchmarks/scaling.py [--config configs/gpu/tiny.yaml] [--batch 8] [--seq 128]
        [--seqs 128,256,512,1024] [--batches 4,8,16,32] [--experts 2,4,8,16] [--layers 3,6,12,24] [--json out.json]

One throughput number at one size cannot show that costs grow as designed;
a curve can. From a base point (the config's model, --batch x --seq tokens)
one axis at a time is doubled and each point's training step (forward, loss,
backward, AdamW step, as in model_step.py) is timed, the points of an axis
interleaved so that machine noise hits them alike.

Predicted time: the FLOPs of a step, `training_flops_per_token` of
ava.model.summary (3 x forward: 2 per multiply-accumulate of every matmul a
token passes through, so 6 x the active matmul parameters, plus attention's
QK^T and AV, 12 x layers x seq x heads*head_dim per token, the full square)
times batch x seq tokens. The attention term is the only part quadratic in
sequence length; its share is the summary at seq minus the summary at seq 0.
Each point shows predicted and measured time as multiples of the axis's first
point, and measured / predicted: 1.00 everywhere means time grows exactly as
the FLOPs. What the FLOP count leaves out shows up as drift: elementwise work
(norms, softmax, routing), the AdamW step (linear in *total* parameters, so it
grows along the experts axis while the FLOPs stay flat), and causal attention
kernels that skip the masked half of the square the count includes.

Memory. On CUDA: torch.cuda.max_memory_allocated over one step, less what was
allocated before the point's model was built. Everywhere: activations are
the bytes of the tensors autograd saves for backward during one forward
(saved_tensors_hooks; storages de-duplicated, so views count once; parameters
excluded), split into those saved inside the transformer blocks and the rest
(embedding, final norm, output head, loss); state is the bytes of parameters,
gradients and AdamW's moments after a real step, against 16 bytes per
parameter in fp32 (weight 4, gradient 4, m and v 8). Predicted activations:
the block part linear in tokens x layers and flat in experts (top-k fixed),
the rest linear in tokens, both from the first point's measured split; a
measured / predicted of 1.00 means no hidden S x S (or other superlinear)
buffer is kept for backward.

Beside them, the estimate `ava config validate` and the dry run hold a run
to (`ava.model.memory_estimate`), computed from the config alone: its bytes
saved for backward (activations + the fp32 log-softmax) against the measured
activations, and its weights + gradients + optimizer state against the
measured state. Like with like: the estimate's other terms (the loss's
backward working set, DeepSpeed buffers, the margin) are not measured here.
With --dtype bf16 the autocast weight copies count as activations, which a
DeepSpeed bf16 run (bf16 weights, no autocast) does not keep, so the estimate
is compared for fp32 only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ava.model import AvaForCausalLM  # noqa: E402
from ava.model.memory_estimate import TrainingSetup, count_parameters, estimate_memory  # noqa: E402
from ava.model.summary import summarise_model  # noqa: E402
from ava.train.engine.host_memory import keep_freed_memory  # noqa: E402
from benchmarks.model_step import _model_config, _train_step, loss_forward  # noqa: E402
from benchmarks.timing import interleaved, print_table, synchronised, write_json  # noqa: E402

AXES = ("seq", "batch", "experts", "layers")
STATE_BYTES_PER_PARAMETER = 16  # fp32 AdamW: weight, gradient, exp_avg, exp_avg_sq
ESTIMATE_TARGET = 0.15  # the memory estimate within 15% of what is measured
MiB = 2**20

Forward = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Point:
    """One model size and batch shape."""

    seq: int
    batch: int
    experts: int
    layers: int


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _axis_points(base: Point, values: dict[str, list[int]]) -> dict[str, list[Point]]:
    """Each axis: the base point with that one dimension set to each of its values."""
    return {axis: [replace(base, **{axis: v}) for v in values[axis]] for axis in AXES if values[axis]}


def _build(config: str, settings: list[str], point: Point, device: torch.device) -> AvaForCausalLM:
    """The config's model at `point`'s experts and layers, accepting sequences of `point.seq` tokens."""
    max_positions = max(_model_config(config, settings).max_position_embeddings, point.seq)
    cfg = _model_config(config, [*settings, f"num_experts={point.experts}", f"num_layers={point.layers}",
                                 f"max_position_embeddings={max_positions}"])
    torch.manual_seed(0)
    return AvaForCausalLM(cfg).to(device).train()


def _saved_for_backward(model: AvaForCausalLM, ids: torch.Tensor, forward: Forward) -> tuple[torch.Tensor, dict]:
    """The loss, and the bytes autograd keeps for backward, saved inside the blocks and outside them.

    A storage is counted once however many views of it are saved, and only at
    its first saving; parameters are state, not activations. A saved tensor
    stays referenced until backward, so no counted storage can be freed and its
    address reused within the forward.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where = {"now": "rest"}
    seen: dict[int, str] = {}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in parameters and ptr not in seen:
            seen[ptr], sizes[ptr] = where["now"], storage.nbytes()
        return t

    def enter(*_: Any) -> None:
        where["now"] = "blocks"

    def leave(*_: Any) -> None:
        where["now"] = "rest"

    handles = [h for block in model.layers
               for h in (block.register_forward_pre_hook(enter), block.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward(model, ids)
    finally:
        for h in handles:
            h.remove()
    split = {part: sum(sizes[p] for p, w in seen.items() if w == part) for part in ("blocks", "rest")}
    return loss, split


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state, each storage once."""
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _memory(model: AvaForCausalLM, ids: torch.Tensor, forward: Forward, baseline: int) -> dict[str, int | None]:
    """Activation and state bytes of one real step (and on CUDA its peak above `baseline`)."""
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ids.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    loss, saved = _saved_for_backward(model, ids, forward)
    loss.backward()
    optimizer.step()
    state = _state_bytes(model, optimizer)
    peak = (torch.cuda.max_memory_allocated(ids.device) - baseline) if cuda else None
    model.zero_grad(set_to_none=True)
    return {"activation_bytes": saved["blocks"] + saved["rest"], "activation_block_bytes": saved["blocks"],
            "activation_rest_bytes": saved["rest"], "state_bytes": state, "cuda_peak_bytes": peak}


def _measure_axis(ns: argparse.Namespace, points: list[Point], device: torch.device) -> list[dict[str, Any]]:
    """Step time, predicted FLOPs and memory of each point of one axis; the steps timed interleaved."""
    forward = loss_forward(ns.dtype, device)
    steps: dict[str, Callable[[], object]] = {}
    results = []
    for n, point in enumerate(points):
        baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        model = _build(ns.config, ns.model, point, device)
        gen = torch.Generator().manual_seed(n)
        batches = [torch.randint(0, model.config.vocab_size, (point.batch, point.seq), generator=gen).to(device)
                   for _ in range(2)]
        summary, no_attention = summarise_model(model, point.seq), summarise_model(model, 0)
        tokens = point.batch * point.seq
        results.append({**asdict(point), "tokens": tokens, "parameters": summary.total,
                        "active_parameters": summary.active_per_token,
                        "flops_per_step": summary.training_flops_per_token * tokens,
                        "attention_flops_share": 1 - no_attention.training_flops_per_token
                        / summary.training_flops_per_token,
                        **_memory(model, batches[0], forward, baseline), **_estimate(model, point, ns.dtype)})
        steps[str(n)] = synchronised(_train_step(model, batches, forward), device)
    times = interleaved(steps, ns.repeats, warmup=ns.warmup)
    for n, r in enumerate(results):
        r.update(step_seconds=times[str(n)], tokens_per_s=r["tokens"] / times[str(n)])
    _add_ratios(results)
    return results


def _estimate(model: AvaForCausalLM, point: Point, dtype: str) -> dict[str, Any]:
    """The memory estimate's activations (saved for backward) and state (weights, gradients, AdamW) at `point`.

    fp32 only (see the module docstring); a torch AdamW step on one process is ZeRO stage 0.
    """
    if dtype != "fp32":
        return {"estimate_activation_bytes": None, "estimate_state_bytes": None}
    e = estimate_memory(model.config, TrainingSetup(micro_batch=point.batch, sequence_length=point.seq,
                                                    precision="fp32"), count_parameters(model))
    return {"estimate_activation_bytes": e.saved_for_backward,
            "estimate_state_bytes": e.terms["weights"] + e.terms["gradients"] + e.terms["optimizer"]}


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """Measured and predicted multiples of the axis's first point; predicted activations from its split."""
    first = results[0]
    for r in results:
        r["time_ratio"] = r["step_seconds"] / first["step_seconds"]
        r["predicted_time_ratio"] = r["flops_per_step"] / first["flops_per_step"]
        r["time_vs_predicted"] = r["time_ratio"] / r["predicted_time_ratio"]
        tokens = r["tokens"] / first["tokens"]
        predicted = (first["activation_block_bytes"] * tokens * r["layers"] / first["layers"]
                     + first["activation_rest_bytes"] * tokens)
        r["activation_ratio"] = r["activation_bytes"] / first["activation_bytes"]
        r["predicted_activation_ratio"] = predicted / first["activation_bytes"]
        r["activation_vs_predicted"] = r["activation_bytes"] / predicted
        r["state_vs_16_per_parameter"] = r["state_bytes"] / (STATE_BYTES_PER_PARAMETER * r["parameters"])
        estimated = r["estimate_activation_bytes"] is not None
        r["activation_vs_estimate"] = r["activation_bytes"] / r["estimate_activation_bytes"] if estimated else None
        r["state_vs_estimate"] = r["state_bytes"] / r["estimate_state_bytes"] if estimated else None


def _print_axis(axis: str, results: list[dict[str, Any]]) -> None:
    def estimate(r: dict[str, Any], key: str, ratio: str) -> list[Any]:
        return [r[key] / MiB, r[ratio]] if r[key] is not None else ["n/a", "n/a"]

    rows = [[r[axis], r["parameters"] / 1e6, 1000 * r["step_seconds"], r["tokens_per_s"], r["predicted_time_ratio"],
             r["time_ratio"], r["time_vs_predicted"], r["attention_flops_share"], r["activation_bytes"] / MiB,
             r["predicted_activation_ratio"], r["activation_ratio"], r["activation_vs_predicted"],
             *estimate(r, "estimate_activation_bytes", "activation_vs_estimate"),
             r["state_bytes"] / MiB, r["state_vs_16_per_parameter"], *estimate(r, "estimate_state_bytes", "state_vs_estimate")]
            + ([r["cuda_peak_bytes"] / MiB] if r["cuda_peak_bytes"] is not None else []) for r in results]
    headers = [axis, "params M", "step ms", "tokens/s", "pred x", "time x", "meas/pred", "attn share",
               "act MiB", "act pred x", "act x", "act meas/pred", "act est MiB", "act meas/est",
               "state MiB", "state/16P", "state est MiB", "state meas/est"]
    print_table(headers + (["cuda peak MiB"] if len(rows[0]) > len(headers) else []), rows)


def _worst(results: list[dict[str, Any]], key: str) -> float | None:
    """The ratio farthest from 1 (either way) among the points; None when no point has it."""
    values = [r[key] for r in results if r[key] is not None]
    return max(values, key=lambda v: abs(math.log(v))) if values else None


def _axis_summary(axis: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers a verdict rests on: worst deviations from prediction, and what grew along the axis."""
    first, last = results[0], results[-1]
    return {"time_vs_predicted_worst": _worst(results, "time_vs_predicted"),
            "time_vs_predicted_range": [min(r["time_vs_predicted"] for r in results),
                                        max(r["time_vs_predicted"] for r in results)],
            "activation_vs_predicted_worst": _worst(results, "activation_vs_predicted"),
            "state_vs_16_per_parameter_worst": _worst(results, "state_vs_16_per_parameter"),
            "activation_vs_estimate_worst": _worst(results, "activation_vs_estimate"),
            "state_vs_estimate_worst": _worst(results, "state_vs_estimate"),
            "last": last[axis], "attention_flops_share_last": last["attention_flops_share"],
            "predicted_time_ratio_last": last["predicted_time_ratio"],
            "parameter_ratio_last": last["parameters"] / first["parameters"]}


def _verdict(axis: str, s: dict[str, Any]) -> str:
    low, high = s["time_vs_predicted_range"]
    text = (f"{axis}: time/predicted {low:.2f}-{high:.2f} across points (worst {s['time_vs_predicted_worst']:.2f}); "
            f"activations/predicted worst {s['activation_vs_predicted_worst']:.3f}; "
            f"state/16P worst {s['state_vs_16_per_parameter_worst']:.3f}")
    if s["activation_vs_estimate_worst"] is not None:
        text += (f"; measured/estimate worst: activations {s['activation_vs_estimate_worst']:.3f}, "
                 f"state {s['state_vs_estimate_worst']:.3f} (target within {ESTIMATE_TARGET:.0%})")
    if axis == "seq":
        text += f"; attention share of FLOPs at {s['last']} = {s['attention_flops_share_last']:.0%}"
    if axis == "experts":
        text += (f"; FLOPs x{s['predicted_time_ratio_last']:.2f} while total parameters "
                 f"x{s['parameter_ratio_last']:.2f}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/gpu/tiny.yaml"))
    parser.add_argument("--batch", type=int, default=8, help="batch of the points where batch is not the axis")
    parser.add_argument("--seq", type=int, default=128, help="sequence length where seq is not the axis")
    parser.add_argument("--seqs", type=_ints, default=[128, 256, 512, 1024], help="e.g. 128,256,512; empty skips")
    parser.add_argument("--batches", type=_ints, default=[4, 8, 16, 32])
    parser.add_argument("--experts", type=_ints, default=[2, 4, 8, 16], help="experts per MoE layer (top-k fixed)")
    parser.add_argument("--layers", type=_ints, default=[3, 6, 12, 24])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (the fastest counts)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per point first")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16 = autocast forward; its cast weight copies then count as activations")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="change a model setting, e.g. --model hidden_size=64")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg()[0]
    kept = device.type == "cpu" and keep_freed_memory()  # as train.py does on CPU: no page faults per step
    cfg = _model_config(ns.config, ns.model)
    base = Point(seq=ns.seq, batch=ns.batch, experts=cfg.num_experts, layers=cfg.num_layers)
    axes = _axis_points(base, {"seq": ns.seqs, "batch": ns.batches, "experts": ns.experts, "layers": ns.layers})
    print(f"scaling: {Path(ns.config).name} model (hidden {cfg.hidden_size}, top-{cfg.num_experts_per_token}), base "
          f"{base}, {ns.dtype} on {device.type}, {torch.get_num_threads()} threads, best of {ns.repeats}; "
          f"load average {load:.1f} before starting (other work on the machine skews the curve)"
          + ("; freed host memory kept (hardware.keep_freed_host_memory)" if kept else ""))
    results, summaries, verdicts = {}, {}, {}
    for axis, points in axes.items():
        print(f"\n{axis} axis")
        results[axis] = _measure_axis(ns, points, device)
        _print_axis(axis, results[axis])
        summaries[axis] = _axis_summary(axis, results[axis])
        verdicts[axis] = _verdict(axis, summaries[axis])
        print(verdicts[axis])
    print("\n" + "\n".join(verdicts.values()))
    write_json(ns.json, {"benchmark": "scaling", "config": ns.config, "model_settings": ns.model, "dtype": ns.dtype,
                         "device": device.type, "load_average": load, "base": asdict(base), "axes": results, "summary": summaries,
                         "verdicts": verdicts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
