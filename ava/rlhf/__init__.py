"""RLHF fine-tuning: SFT, reward model, DPO, PPO and GRPO on the Ava engine."""
