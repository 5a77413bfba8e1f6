"""Checkpoints: written atomically (`store`), checked before loading (`trust`), a run's state in and out
(`checkpointer`), where a run resumes from (`resume`), and consolidated into a model directory (`export`)."""
