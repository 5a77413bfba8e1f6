"""Every optional behaviour of a run, one callback a module (see `ava.train.trainer.callback` for the protocol).

Control: `Evaluation` (held-out loss, early stopping, the final sample),
`Checkpointing` (periodic, best, final, reload check), `GradientHealth`
(rollback), `Preemption` (stop signal -> checkpoint -> requeue),
`LayerGradNorms`, `LRHorizon` (the LR decay horizon across a resume).
Sinks: `MetricsFile`, `Console`, `Wandb`, `Records` (a function).
"""
