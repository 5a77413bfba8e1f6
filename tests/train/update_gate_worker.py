"""One process, a DeepSpeed engine per (ZeRO stage, precision): drive the update gate through bad and good steps.

Run by test_update_gate.py (DeepSpeed state is process-global, so not inside
pytest's own process). Prints one JSON line per case with what was observed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import torch
from torch import nn

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
CLIP = 0.05  # small enough that every healthy step here is clipped


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(h).float().pow(2).mean()


def _weights(engine) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in engine.module.parameters():
        master = safe_get_full_fp32_param(p)  # None without a wrapper (stage 0, fp32): the parameter is the master
        out.append((p if master is None else master).detach().float().clone())
    return out


def _adam_steps(engine) -> list[float]:
    state = engine.basic_optimizer.state
    return sorted(float(s["step"]) for s in state.values() if "step" in s)


def run_case(stage: int, precision: str) -> dict:
    import deepspeed

    from ava.config.schema.training import GradientHealthConfig
    from ava.train.engine.gradient_health import HealthMonitor
    from ava.train.engine.update_gate import UpdateGate, clip_in_use, layer_grad_norms, set_clip
    from ava.train.runtime.faults import FaultPlan

    torch.manual_seed(0)
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "bf16": {"enabled": precision == "bf16"}, "zero_optimization": {"stage": stage}}
    net = Net()
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    monitor = HealthMonitor(GradientHealthConfig(baseline_warmup_steps=3, explosion_threshold=5.0,
                                                 lr_cooldown_steps=2, max_consecutive_bad_steps=0))
    gate = UpdateGate(engine, monitor)
    seen_grad_norms: list[float] = []  # the gradient norm the basic optimizer receives: after DeepSpeed's clip
    gated_step = engine.basic_optimizer.step

    def spy(*args, **kwargs):
        grads = [p.grad for g in engine.basic_optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen_grad_norms.append(float(torch.nn.utils.get_total_norm(grads)))
        return gated_step(*args, **kwargs)

    engine.basic_optimizer.step = spy
    faults = FaultPlan.parse("nan_grad@5,grad_spike@6x1000,nan_loss@7,grad_spike@8x4")
    x = torch.randn(4, 16, device=engine.device)
    if precision == "bf16":
        x = x.bfloat16()
    out: dict = {"stage": stage, "precision": precision, "steps": []}
    checkpoint_dir = tempfile.mkdtemp()
    for step in range(1, 10):
        if step == 8:  # DeepSpeed restores its saved clip value on load; the loop sets it again before the step
            engine.save_checkpoint(checkpoint_dir, tag="t")
            set_clip(engine, 123.0)
            engine.load_checkpoint(checkpoint_dir, tag="t")
            out["clip_after_load"] = clip_in_use(engine)
        set_clip(engine, CLIP)
        before, adam_before = _weights(engine), _adam_steps(engine)
        loss = faults.apply(step, 0, engine(x))
        engine.backward(loss)
        layers = layer_grad_norms(engine.module)
        seen_before = len(seen_grad_norms)
        gate.begin(step, loss.detach().float(), measure_update=True)
        engine.step()
        verdict = gate.finish()
        monitor.end_step(step, verdict)
        after = _weights(engine)
        out["steps"].append({
            "step": step, "apply": verdict.apply, "kind": verdict.kind,
            "weights_changed": any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)),
            "weights_finite": all(bool(torch.isfinite(w).all()) for w in after),
            "adam_steps_changed": _adam_steps(engine) != adam_before,
            "grad_norm": gate.grad_norm if gate.grad_norm is not None and math.isfinite(gate.grad_norm) else None,
            "layer_norm_total": math.sqrt(sum(v * v for v in layers.values())) if layers else None,
            "layers": sorted(layers),
            "clipped_norm": seen_grad_norms[-1] if len(seen_grad_norms) > seen_before else None,
            "update_ratio": gate.update_ratio, "lr_scale": monitor.lr_scale,
        })
    out["events"] = [e["event"] for e in monitor.drain_events()]
    return out


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for var, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": sys.argv[1]}.items():
        os.environ[var] = value
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in STAGES:
        for precision in PRECISIONS:
            print("CASE " + json.dumps(run_case(stage, precision)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
