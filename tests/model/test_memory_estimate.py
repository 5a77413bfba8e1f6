"""The memory estimate (ava.model.memory_estimate): each term's formula by hand, and against what autograd keeps."""

from __future__ import annotations

import pytest
import torch

from ava.config.schema.model import ModelConfig
from ava.model.memory_estimate import (
    CONTEXT_BYTES,
    FRAGMENTATION,
    GiB,
    ParameterCounts,
    TrainingSetup,
    count_parameters,
    estimate_memory,
)
from ava.model.memory_fit import check_memory
from ava.model.transformer import AvaForCausalLM, Context

# 1,000 parameters, none of them small enough to stay whole at ZeRO-3 (threshold 0 below).
COUNTS = ParameterCounts(total=1000, trainable=1000, expert_trainable=0, expert_frozen=0, largest_gather=100,
                         sizes=(1000,))
TINY = ModelConfig(hidden_size=8, num_layers=2, num_attention_heads=2, intermediate_size=16, vocab_size=32,
                   max_position_embeddings=16, num_experts=1)


def _setup(**kw) -> TrainingSetup:
    base = dict(micro_batch=2, sequence_length=4, precision="bf16", data_parallel=4, reduce_bucket_size=100,
                prefetch_bucket_size=50, persistence_threshold=0)
    return TrainingSetup(**{**base, **kw})


# (precision, stage, offload) -> (weights, gradients, optimizer, buffers, host) for 1,000 parameters on 4 ranks:
# b = 2 (bf16) or 4; optimizer = fp32 master 4 + m, v 8 + the step's fp32 gradients 4 (fp32 stage 0: m, v only).
STATE = {
    ("bf16", 0, False): (2000, 2000, 16000, 2 * 1000, 0),  # stage 0 on 4 ranks: the all-reduce bucket (all 1,000)
    ("bf16", 1, False): (2000, 2000, 4000, 2 * 100 * 2, 0),  # two reduce buckets of 100 elements (overlap_comm)
    ("bf16", 2, False): (2000, 500, 4000, 2 * 100 * 2, 0),
    ("bf16", 3, False): (500, 500, 4000, 2 * 100 + 2 * (100 + 50), 0),  # one bucket + gathered leaf + prefetch
    ("bf16", 2, True): (2000, 0, 0, 2 * 100 * 2, 500 + 4000),  # gradient partitions and optimizer on the host
    ("bf16", 3, True): (0, 0, 0, 2 * 100 + 2 * 150, 500 + 500 + 4000),
    ("fp32", 0, False): (4000, 4000, 8000, 4 * 1000, 0),
    ("fp32", 2, False): (4000, 1000, 4000, 4 * 100 * 2, 0),
}


@pytest.mark.parametrize(("precision", "stage", "offload"), list(STATE))
def test_state_terms_follow_the_zero_stage_and_offload(precision, stage, offload):
    e = estimate_memory(TINY, _setup(precision=precision, zero_stage=stage, offload=offload), COUNTS)
    weights, gradients, optimizer, buffers, host = STATE[(precision, stage, offload)]
    assert (e.terms["weights"], e.terms["gradients"], e.terms["optimizer"], e.terms["buffers"], e.host) == \
        (weights, gradients, optimizer, buffers, host)


def test_frozen_and_expert_parameters_count_as_deepspeed_keeps_them():
    # LoRA: 900 frozen weights have no gradients or optimizer state.
    lora = ParameterCounts(total=1000, trainable=100, expert_trainable=0, expert_frozen=0, largest_gather=100)
    e = estimate_memory(TINY, _setup(zero_stage=0, data_parallel=1), lora)
    assert (e.terms["weights"], e.terms["gradients"], e.terms["optimizer"]) == (2000, 200, 1600)
    # Expert parallelism 2 on 4 ranks: each rank keeps 300 of the 600 expert parameters, partitioned over 2 ranks.
    moe = ParameterCounts(total=1000, trainable=1000, expert_trainable=600, expert_frozen=0, largest_gather=100)
    e = estimate_memory(TINY, _setup(zero_stage=2, expert_parallel=2), moe)
    assert e.terms["gradients"] == 2 * (400 / 4 + 300 / 2)
    assert e.terms["optimizer"] == 16 * (400 / 4 + 300 / 2)


def test_activation_and_logit_terms_by_hand():
    # fp32 (b = 4), h = 8, q = kv = 8, 2 heads of 4, I = 16, V = 32; micro batch 2 x 4 tokens = 8 tokens.
    # block: 2 RMSNorms (8h + 4 each) + attention b(h + 2q + 2kv) + 4H + SwiGLU FFN b(h + 4I) = 136 + 168 + 288
    # rest: ids and labels 16 + final norm 68 + head input bh 32 + RoPE cos, sin 2 x 4 x b / 2 = 16
    block, rest, tokens = 592, 132, 8
    plain = estimate_memory(TINY, _setup(precision="fp32", data_parallel=1), count_parameters(_build(TINY)))
    assert plain.terms["activations"] == tokens * (2 * block + rest)
    # checkpointing: each block keeps its input (bh = 32) and one block is recomputed at a time
    kept = estimate_memory(TINY, _setup(precision="fp32", data_parallel=1, gradient_checkpointing=True),
                           count_parameters(_build(TINY)))
    assert kept.terms["activations"] == tokens * (2 * 32 + block + rest)
    # logits: (b + 12) V per token -- the fp32 logits, log-softmax and two fp32 gradients; +4V with loss penalties
    assert plain.terms["logits"] == tokens * 32 * 16
    penalised = estimate_memory(TINY, _setup(precision="fp32", data_parallel=1, loss_penalties=True), COUNTS)
    assert penalised.terms["logits"] == tokens * 32 * 20
    assert plain.saved_for_backward == tokens * (2 * block + rest) + tokens * 32 * 4
    assert plain.margin == CONTEXT_BYTES + round(FRAGMENTATION * (plain.terms["activations"] + plain.terms["logits"]))
    assert plain.total == plain.allocated + plain.margin and plain.largest == ("optimizer", plain.terms["optimizer"])


def _build(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> AvaForCausalLM:
    torch.manual_seed(0)
    return AvaForCausalLM(cfg).to(dtype).train()


def _saved_bytes(model: AvaForCausalLM, ids: torch.Tensor, context: Context | None) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once; parameters and buffers excluded)."""
    state = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in state:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, context=context)
    return sum(seen.values())


SMALL = dict(hidden_size=64, num_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
             max_position_embeddings=128, num_experts=4, num_experts_per_token=2, expert_capacity_factor=None)
SHAPES = {
    "moe": {},
    "dense gelu layernorm learned": dict(num_experts=1, activation="gelu", norm_type="layernorm",
                                         position_embedding_type="learned"),
    "gqa + shared expert": dict(num_key_value_heads=2, shared_expert_intermediate_size=32),
    "moh + moa": dict(use_moh=True, use_moa=True, moa={"every_n_layers": 2}),
    "memory layer": dict(use_episodic_memory=True, episodic_memory={"layer": 0, "segment_length": 16}),
    "rag cross-attention": dict(use_cross_attention=True, use_rag=True, rag={"chunk_size": 16},
                                cross_attention={"every_n_layers": 1}),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activations_match_what_autograd_saves(shape, precision):
    cfg = ModelConfig(**{**SMALL, **SHAPES[shape]})
    batch, seq = 2, 64
    model = _build(cfg, torch.float32 if precision == "fp32" else torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    context = None
    if cfg.use_rag:
        context = Context(neighbours=torch.randint(0, cfg.vocab_size, (batch, seq // 16, 2, 32)))
    measured = _saved_bytes(model, ids, context)
    e = estimate_memory(cfg, TrainingSetup(micro_batch=batch, sequence_length=seq, precision=precision),
                        count_parameters(model))
    assert e.saved_for_backward == pytest.approx(measured, rel=0.05)


def test_a_tiny_model_fits_and_a_59b_model_does_not():
    setup = TrainingSetup(micro_batch=8, sequence_length=128, precision="bf16")
    assert check_memory(TINY, setup, 24.0).fits is True
    assert check_memory(TINY, setup, None).fits is None
    big = ParameterCounts(total=59_000_000_000, trainable=59_000_000_000, expert_trainable=0, expert_frozen=0,
                          largest_gather=10**9)
    verdict = check_memory(TINY, TrainingSetup(micro_batch=32, sequence_length=1024, zero_stage=3), 80.0, "h.yaml:5",
                           big)
    assert verdict.fits is False and verdict.estimate.total > 80 * GiB
    message, fix = verdict.problem()
    assert "largest term is optimizer" in message and "h.yaml:5" in message
    assert "deepspeed.cpu_offload: true" in fix and "ZeRO-3 over" in fix and "micro batch" in fix


def test_the_repetition_penalty_window_costs_what_its_saved_tensors_measure():
    """The estimate's window term against the bytes autograd keeps for the penalty's backward (saved-tensor hooks)."""
    from ava.model.memory_estimate import REPETITION_SLOT_BYTES
    from ava.model.penalties import LossPenalties, segments_from_eos

    batch, seq, vocab = 2, 128, 64
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    def saved_per_token(window: int) -> float:
        logits = torch.randn(batch, seq, vocab, generator=generator, requires_grad=True)
        kept: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:  # the logits themselves are the forward's, not the penalty's
            same = t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
            kept.append(0 if same else t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            LossPenalties(repetition_weight=1.0, repetition_window=window)(logits, ids, ids,
                                                                           *segments_from_eos(ids, 0))
        return sum(kept) / (batch * seq)

    measured = {window: saved_per_token(window) for window in (16, 64)}
    per_slot = (measured[64] - measured[16]) / (64 - 16)  # the window's share, without the per-token constants
    assert per_slot == pytest.approx(REPETITION_SLOT_BYTES, rel=0.15)
    windowed = estimate_memory(TINY, _setup(precision="fp32", data_parallel=1, loss_penalties=True,
                                            repetition_window=64, sequence_length=16), COUNTS)
    plain = estimate_memory(TINY, _setup(precision="fp32", data_parallel=1, loss_penalties=True,
                                         sequence_length=16), COUNTS)
    # the window never exceeds the row: 16 slots of 21 bytes for each of the 2 x 16 tokens
    assert windowed.terms["logits"] - plain.terms["logits"] == 2 * 16 * 16 * REPETITION_SLOT_BYTES
