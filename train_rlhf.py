#!/usr/bin/env python
"""RLHF fine-tuning: `python train_rlhf.py --config ... --rlhf_config configs/rlhf/test_cpu.yaml`.

Runs the stages the RLHF config lists (SFT, reward model, DPO, PPO, GRPO);
also under `deepspeed --num_gpus N train_rlhf.py ...`. Same as `ava rlhf`.
"""

from ava.cli.main import rlhf_entry

if __name__ == "__main__":
    raise SystemExit(rlhf_entry())
