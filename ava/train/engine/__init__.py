"""A model made a DeepSpeed engine, and its optimizer steps: shared by pre-training and every RLHF stage.

`build.build_engine` (precision, ZeRO-3 leaves, expert parallelism, compile,
`deepspeed.initialize`) and `optimizer_step.OptimizerStep` (LR, clip, the
gradient-health gate, router-bias balancing), with the policies they apply.
"""
