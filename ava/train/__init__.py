"""The training engine: process setup, data for a run, LR schedule and the DeepSpeed loop."""
