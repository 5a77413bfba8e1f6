"""Worker for test_features_zero3: each enhanced feature trains under ZeRO-3, bf16, on 2 CPU ranks.

For every case (feature x dense/MoE FFN) it builds a small model, trains it
with DeepSpeed ZeRO-3 on a learnable periodic corpus, different rows per rank,
and writes result_rank{N}.json: per case the first and last losses and whether
the feature's own weights (gates, routers) moved.
"""

import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402

from ava.config.schema.model import ModelConfig  # noqa: E402
from ava.model import AvaForCausalLM  # noqa: E402
from ava.model.transformer import Context  # noqa: E402
from ava.model.zero3 import mark_moe_zero3_leaves  # noqa: E402

SEQ, VOCAB, STEPS = 32, 48, 24
BASE = dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
            max_position_embeddings=SEQ)
CASES = {
    "moh": dict(use_moh=True, moh={"num_shared_heads": 1, "active_routed_heads": 2}),
    "moa": dict(use_moa=True, moa={"num_experts": 4, "experts_per_token": 2}),
    "cross_attention+rag": dict(use_cross_attention=True, use_rag=True, cross_attention={"every_n_layers": 1},
                                rag={"chunk_size": 8, "num_neighbours": 2}),
    "episodic_memory": dict(use_episodic_memory=True, episodic_memory={"layer": 1, "segment_length": 8, "top_k": 4}),
}
# All five at once, under the other ZeRO stages: layers moh, moa, memory, moa, a cross-attention block before
# layers 0 and 2. Two shared heads, so that MoH's shared-head gate has something to learn too.
ALL_FIVE = dict(num_layers=4, use_moh=True, moh={"num_shared_heads": 2, "active_routed_heads": 1}, use_moa=True,
                moa={"num_experts": 4, "experts_per_token": 2, "every_n_layers": 2}, use_cross_attention=True,
                use_rag=True, cross_attention={"every_n_layers": 2}, rag={"chunk_size": 8, "num_neighbours": 2},
                use_episodic_memory=True, episodic_memory={"layer": 2, "segment_length": 8, "top_k": 4})
FEATURE_WEIGHTS = {"moh": "router.", "moa": "router.", "cross_attention+rag": "attn_gate",
                   "episodic_memory": "memory_gate", "all": "gate"}


MOTIFS = torch.randint(0, VOCAB, (6, 8), generator=torch.Generator().manual_seed(7))


def _rows(gen: torch.Generator) -> torch.Tensor:
    """Rows repeating one of a few 8-token motifs: learnable in a few steps; a neighbour of chunk u predicts u+1."""
    return MOTIFS[torch.randint(0, len(MOTIFS), (2,), generator=gen)].repeat(1, SEQ // 8)


def _train(name: str, ffn: str, rank: int, stage: int = 3) -> dict:
    torch.manual_seed(0)
    features = ALL_FIVE if name == "all" else CASES[name]
    cfg = ModelConfig(**{**BASE, **features}, num_experts=4 if ffn == "moe" else 0)
    model = AvaForCausalLM(cfg)
    watched = [n for n, _ in model.named_parameters() if FEATURE_WEIGHTS[name] in n]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in watched}
    leaves = mark_moe_zero3_leaves(model)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
                 "bf16": {"enabled": True},
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                 "gradient_clipping": 1.0}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    gen = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(STEPS):
        ids = _rows(gen)
        context = Context(documents=torch.zeros_like(ids)) if cfg.use_episodic_memory else None
        if cfg.use_rag:  # each chunk's "retrieved" neighbours: the row's own motif, as a datastore would return
            chunks = ids.view(2, SEQ // 8, 1, 8).repeat(1, 1, 2, 2)
            context = Context(neighbours=chunks, documents=context.documents if context else None)
        out = engine(ids, labels=ids, context=context)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.lm_loss))
    moved = {}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        for n, p in engine.module.named_parameters():
            if n in before:
                moved[n] = float((p.detach().float() - before[n].float()).abs().max())
    return {"first": losses[:3], "last": losses[-3:], "moved": moved, "leaves": leaves}


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    only = os.environ.get("AVA_FEATURE_CASES")  # for debugging one case: e.g. "moh/dense"
    results = {f"{name}/{ffn}": _train(name, ffn, rank) for name in CASES for ffn in ("dense", "moe")
               if not only or f"{name}/{ffn}" in only.split(",")}
    for stage in (1, 2):
        if not only or f"all/zero{stage}" in only.split(","):
            results[f"all/zero{stage}"] = _train("all", "moe", rank, stage)
    with open(f"result_rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "cases": results}, f)


if __name__ == "__main__":
    main()
    from ava.train.runtime.distributed import exit_launched_worker

    exit_launched_worker()
