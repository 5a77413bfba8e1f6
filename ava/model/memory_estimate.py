"""Memory per GPU of a training step, estimated from the config before anything is allocated.

Each term is bytes on one GPU, for Ψ parameters on N data-parallel ranks.
Weights and gradients are held in the compute dtype, b = 2 bytes (bf16,
fp16; fp8 trains on bf16 weights) or 4 (fp32). As DeepSpeed keeps them:

    stage  weights  gradients  optimizer (fp32 master + Adam m, v)  fp32 gradients at the step
      0    bΨ       bΨ         12Ψ (fp32: 8Ψ, the weights are the master)   4Ψ (fp32: none)
      1    bΨ       bΨ         12Ψ/N                                       4Ψ/N
      2    bΨ       bΨ/N       12Ψ/N                                       4Ψ/N
      3    bΨ/N     bΨ/N       12Ψ/N                                       4Ψ/N

The last column is the fp32 copy of this rank's gradients that the optimizer
step reads (DeepSpeed's FP16_Optimizer at stage 0, `single_partition_of_fp32_groups`
at stages 1-3); it is counted in the optimizer term. Stage 1 holds the full
bΨ gradients until the reduce-scatter at the end of backward. Offload
(`deepspeed.cpu_offload` / `nvme_offload`, stages 1-3) moves the optimizer
term to the host, at stages 2-3 the gradient partitions and at stage 3 the
weight partitions too. Frozen parameters (LoRA) have weights only. Expert
parameters under expert parallelism count Ψ_e / ep_size per rank,
partitioned over the N / ep_size ranks of their data-parallel group.

Buffers: DeepSpeed's gradient reduce buckets (stages 1-2: reduce_bucket_size
elements, twice with overlap_comm; stage 3: once; stage 0 on several ranks:
the all-reduce bucket, up to Ψ); at stage 3 also the parameters gathered for
the running module plus the prefetch bucket, and every tensor under
stage3_param_persistence_threshold, which stays whole on each rank.

Activations, bytes per token of the micro batch (T = micro batch x sequence
tokens), as autograd keeps them for backward in this implementation (the
counts were taken from the tensors `torch.autograd.graph.saved_tensors_hooks`
sees, and `tests/model/test_memory_estimate.py` holds the formula to them):

    norm                 RMSNorm 8h + 4: input and normalised copy in fp32 (it computes in fp32), 1/rms;
                         LayerNorm bh + 8: input, mean and 1/std
    standard attention   b(h + 2q + 2kv) + 4H    normed input, q and k after RoPE, v, output, softmax
                                                 log-sum-exp (flash/efficient kernels keep no S x S matrix)
    MoH                  standard + b(q + H) + 24H, + 4h in half precision (the router's fp32 input)
    MoA                  b(h + 2kh + 3q' + 2kv) + 4k·H' + router, q' = k·H'·head_dim (k experts of H' heads)
    memory layer         standard, + 14H·top_k + 2b(q + kv) + S(b + 1)/B once the sequence is longer than
                         a segment (the kNN read: top-k ids, weights, masks, memory keys and values)
    dense FFN            b(h + 4I) SwiGLU, b(h + 2I) GELU
    MoE FFN              b(2kh + 4kI) SwiGLU (b(2kh + 2kI) GELU) over the k routed copies of each token,
                         + router 4h + 8E + 28k + 8 + bk (fp32 input, probabilities, logits, ids, weights,
                         dispatch order); a shared expert adds b(4I_s) (+ bh in half precision)
    cross-attention      2 norms + 7bh + 4H + FFN + 2bh·R: R keys read per token, 2 x num_neighbours with
                         RAG, 1 for a plain context (assumed as long as the sequence)
    rest                 16 + norm + bh (token ids, labels, final norm, output-head input), + 2b·head_dim/B
                         (RoPE's cos and sin), + the cross-attention context embedded once (2bh·num_neighbours
                         with RAG, bh for a plain context)
    hidden dropout > 0   one byte per element of each dropped tensor (2h per block, h at the embedding)

where h = hidden_size, q = heads x head_dim, kv = kv_heads x head_dim, H = heads, I = intermediate_size.
A block is attention + norm + FFN + norm. With gradient checkpointing a
block keeps only its input (bh per token) and one block at a time is
recomputed in backward: L·bh + the largest block. The logits term is the
loss's working set: the logits in the compute dtype, the fp32 log-softmax
cross-entropy keeps for backward, and in backward its gradient and the fp32
logits' gradient, (b + 12)V per token, +4V when the loss penalties read a
log-sum-exp over the logits (training.repetition_penalty_weight etc.), and
21 bytes per token per slot of the repetition penalty's window. fp8
is counted at 2 bytes: torchao keeps some matmul inputs in 1 byte, so the
estimate errs high there. Not modelled: attention dropout (the math SDPA
kernel keeps S x S) and torch.compile, which may keep fewer tensors than eager.

Margin: 1 GiB for what the CUDA allocator never sees (the CUDA context with
torch's kernels, cuBLAS workspaces, NCCL communicator buffers: 0.5-1.5 GiB
on an H100), plus 10% of the activations and logits for the caching
allocator's fragmentation: they are allocated and freed every step, in sizes
MoE's step-to-step token counts vary, while weights and optimizer state are
a few large blocks allocated once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ava.config.schema.model import ModelConfig

if TYPE_CHECKING:
    from ava.config.schema import DeepSpeedSection, TrainingConfig
    from ava.config.schema.lora import TrainingLoRAConfig

GiB = 2**30
CONTEXT_BYTES = GiB  # CUDA context, cuBLAS workspaces, NCCL buffers: outside torch's allocator
FRAGMENTATION = 0.10  # the caching allocator's reserved-but-unused share of what each step allocates
ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed's stage-0 allreduce_bucket_size default (elements)
TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "buffers")

REPETITION_SLOT_BYTES = 21  # per token per window slot of the repetition penalty (see the docstring)

@dataclass(frozen=True)
class TrainingSetup:
    """How a model is trained, as far as memory goes: the few settings the estimate reads."""

    micro_batch: int
    sequence_length: int
    precision: str = "bf16"  # fp32 | bf16 | fp16 | fp8
    gradient_checkpointing: bool = False
    zero_stage: int = 0
    offload: bool = False  # deepspeed.cpu_offload or nvme_offload: optimizer (and stage-3 weights) on the host
    data_parallel: int = 1
    expert_parallel: int = 1
    loss_penalties: bool = False
    repetition_window: int = 0  # training.repetition_penalty_window when the repetition penalty is on, else 0
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 500_000_000
    max_live_parameters: int = 1_000_000_000
    persistence_threshold: int = 1_000_000

    @classmethod
    def from_sections(cls, training: TrainingConfig, deepspeed: DeepSpeedSection, sequence_length: int,
                      world_size: int) -> TrainingSetup:
        """The setup of a run from its training and deepspeed sections, data.max_length and the world size."""
        t, ds = training, deepspeed
        penalties = (t.repetition_penalty_weight > 0 or t.immediate_repetition_weight > 0
                     or (t.eos_penalty_weight > 0 and t.min_sequence_length > 0))
        return cls(micro_batch=t.batch_size, sequence_length=sequence_length, precision=t.mixed_precision,
                   gradient_checkpointing=t.gradient_checkpointing,
                   zero_stage=ds.zero_stage if ds.enabled else 0, offload=ds.cpu_offload or ds.nvme_offload,
                   data_parallel=world_size, expert_parallel=ds.ep_size, loss_penalties=penalties,
                   repetition_window=t.repetition_penalty_window if t.repetition_penalty_weight > 0 else 0,
                   reduce_bucket_size=ds.reduce_bucket_size, overlap_comm=ds.overlap_comm,
                   contiguous_gradients=ds.contiguous_gradients,
                   prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                   max_live_parameters=ds.stage3_max_live_parameters,
                   persistence_threshold=ds.stage3_param_persistence_threshold)

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class ParameterCounts:
    """What the estimate needs to know of a model's parameters, counted from the model itself."""

    total: int
    trainable: int
    expert_trainable: int  # in MoE experts (what expert parallelism spreads); trainable only
    expert_frozen: int
    largest_gather: int  # parameters ZeRO-3 gathers at once: the largest leaf module (a whole MoE layer)
    sizes: tuple[int, ...] = ()  # numel of every parameter tensor (ZeRO-3's persistence threshold)

    def with_experts(self, fraction: float) -> ParameterCounts:
        """The counts with the experts scaled by `fraction` (fewer experts per layer)."""
        removed = round((self.expert_trainable + self.expert_frozen) * (1 - fraction))
        return replace(self, total=self.total - removed,
                       trainable=self.trainable - round(self.expert_trainable * (1 - fraction)),
                       expert_trainable=round(self.expert_trainable * fraction),
                       expert_frozen=round(self.expert_frozen * fraction),
                       largest_gather=max(1, round(self.largest_gather * max(fraction, 0.0))))


def count_parameters(model: object) -> ParameterCounts:
    """Counts of a built model (any device, `meta` included)."""
    from torch import nn

    from ava.model.moa import MixtureOfAttention
    from ava.model.moe import MoELayer
    from ava.model.moh import HeadRouter

    assert isinstance(model, nn.Module)
    params = list(model.parameters())
    experts = [p for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()]
    leaves = (MoELayer, MixtureOfAttention, HeadRouter)  # gathered whole at ZeRO-3 (ava.model.zero3)
    inside: set[int] = set()
    largest = 0
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, leaves):
            inside.update(id(m) for m in module.modules())
            largest = max(largest, sum(p.numel() for p in module.parameters()))
        else:
            largest = max(largest, sum(p.numel() for p in module.parameters(recurse=False)))
    return ParameterCounts(total=sum(p.numel() for p in params),
                           trainable=sum(p.numel() for p in params if p.requires_grad),
                           expert_trainable=sum(p.numel() for p in experts if p.requires_grad),
                           expert_frozen=sum(p.numel() for p in experts if not p.requires_grad),
                           largest_gather=largest, sizes=tuple(p.numel() for p in params))


@functools.lru_cache(maxsize=64)
def _counts_of(model_json: str, lora_json: str | None) -> ParameterCounts:
    import torch

    from ava.config.schema.lora import TrainingLoRAConfig
    from ava.model.transformer import AvaForCausalLM

    with torch.device("meta"):  # shapes only: a 100B-parameter config allocates nothing
        model = AvaForCausalLM(ModelConfig.model_validate_json(model_json))
    if lora_json is not None:
        from ava.model.lora import prepare_trainable

        prepare_trainable(model, TrainingLoRAConfig.model_validate_json(lora_json), from_scratch=False)
    return count_parameters(model)


def parameter_counts(config: ModelConfig, lora: TrainingLoRAConfig | None = None) -> ParameterCounts:
    """Counts of the model `config` describes (with `lora` applied when enabled); cached per config."""
    return _counts_of(config.model_dump_json(), lora.model_dump_json() if lora is not None and lora.enabled else None)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by term (`TERMS`), the margin, what offload puts on the host, and the parts of each term."""

    terms: dict[str, int]
    margin: int
    host: int
    parts: dict[str, int] = field(default_factory=dict)
    setup: TrainingSetup | None = None

    @property
    def allocated(self) -> int:
        """What torch's allocator would report at the peak (torch.cuda.max_memory_allocated): the terms."""
        return sum(self.terms.values())

    @property
    def total(self) -> int:
        return self.allocated + self.margin

    @property
    def largest(self) -> tuple[str, int]:
        name = max(self.terms, key=lambda k: self.terms[k])
        return name, self.terms[name]

    @property
    def saved_for_backward(self) -> int:
        """The bytes autograd keeps for backward: activations + the fp32 log-softmax (+ the penalties' logits)."""
        return self.parts["activations.saved"] + self.parts["logits.saved"]

    def fits(self, memory_gb: float | None) -> bool | None:
        """Whether the total fits `memory_gb` GiB; None when the memory is unknown."""
        return None if memory_gb is None else self.total <= memory_gb * GiB

    def as_dict(self) -> dict[str, object]:
        return {"terms_bytes": self.terms, "margin_bytes": self.margin, "total_bytes": self.total,
                "allocated_bytes": self.allocated, "host_bytes": self.host, "largest": self.largest[0],
                "parts_bytes": self.parts}


def estimate_memory(config: ModelConfig, setup: TrainingSetup, counts: ParameterCounts | None = None) -> MemoryEstimate:
    """The memory per GPU of training `config` as `setup` says (see the module docstring for every formula)."""
    counts = counts or parameter_counts(config)
    s = setup
    parts: dict[str, int] = {}
    host = 0
    ep = max(1, s.expert_parallel)
    dense_dp, expert_dp = max(1, s.data_parallel), max(1, s.data_parallel // ep)
    groups = [(counts.trainable - counts.expert_trainable, True, dense_dp),
              (counts.expert_trainable / ep, True, expert_dp),
              (counts.total - counts.trainable - counts.expert_frozen, False, dense_dp),
              (counts.expert_frozen / ep, False, expert_dp)]
    for n, trainable, dp in groups:
        for name, value, on_host in _state_bytes(n, trainable, dp, s):
            parts[name] = parts.get(name, 0) + round(value)
            host += round(value) if on_host else 0
    weights = parts.get("weights.device", 0)
    gradients = parts["gradients.held"]
    optimizer = sum(v for k, v in parts.items() if k.startswith("optimizer.") and not k.endswith("(host)"))
    buffers = _buffers(counts, s, parts)
    saved, checkpointed = _activation_bytes(config, s)
    parts.update({"activations.saved": saved, "activations.checkpointed": checkpointed})
    tokens = s.micro_batch * s.sequence_length
    vocab_saved = 4 + (4 if s.loss_penalties else 0)
    # The repetition penalty's (batch, seq, window) candidates: int64 ids, their fp32 probabilities and
    # unlikelihoods, masks (about 21 bytes a slot, measured); the window never exceeds the row.
    window = min(s.repetition_window, s.sequence_length) * REPETITION_SLOT_BYTES
    parts["logits.saved"] = tokens * (config.vocab_size * vocab_saved + window)
    logits = tokens * (config.vocab_size * (s.dtype_bytes + 8 + vocab_saved) + window)
    terms = {"weights": weights, "gradients": gradients, "optimizer": optimizer,
             "activations": checkpointed if s.gradient_checkpointing else saved, "logits": logits,
             "buffers": buffers}
    margin = CONTEXT_BYTES + round(FRAGMENTATION * (terms["activations"] + terms["logits"]))
    return MemoryEstimate(terms, margin, host, parts, setup)


def _state_bytes(n: float, trainable: bool, dp: int, s: TrainingSetup) -> Iterable[tuple[str, float, bool]]:
    """(part, bytes, on the host) of `n` parameters' weights, gradients and optimizer state on one rank."""
    if n <= 0:
        return
    b, stage = s.dtype_bytes, s.zero_stage
    mixed = s.precision != "fp32"
    offload = s.offload and stage >= 1
    weights = b * n / (dp if stage == 3 else 1)
    yield ("weights.device", 0.0 if offload and stage == 3 else weights, False)
    if offload and stage == 3:
        yield ("weights (host)", weights, True)
    if not trainable:
        return
    gradients = b * n / (dp if stage >= 2 else 1)
    # With offload, stages 2-3 reduce each gradient partition into a host buffer; stage 1 holds the full
    # gradients on the device until the reduction at the end of backward.
    on_host = offload and stage >= 2
    yield ("gradients.held", 0.0 if on_host else gradients, False)
    if on_host:
        yield ("gradients (host)", gradients, True)
    share = n / (dp if stage >= 1 else 1)
    copies = [("optimizer.moments", 8 * share)]
    if mixed or stage >= 1:  # ZeRO keeps its own fp32 partition even in fp32; stage 0 fp32 steps the weights
        copies += [("optimizer.master", 4 * share), ("optimizer.fp32_gradients", 4 * share)]
    for name, value in copies:
        yield (f"{name} (host)" if offload else name, value, offload)


def _buffers(counts: ParameterCounts, s: TrainingSetup, parts: dict[str, int]) -> int:
    """DeepSpeed's reduce buckets, and at stage 3 the gathered and persistent parameters."""
    b = s.dtype_bytes
    if s.zero_stage == 0:
        reduce = min(ALLREDUCE_BUCKET, counts.trainable) * b if s.data_parallel > 1 else 0
    elif s.zero_stage in (1, 2):
        reduce = s.reduce_bucket_size * b * (2 if s.overlap_comm else 1) if s.contiguous_gradients else 0
    else:
        reduce = s.reduce_bucket_size * b
    parts["buffers.reduce_buckets"] = reduce
    if s.zero_stage == 3:
        live = min(counts.total, counts.largest_gather + min(s.prefetch_bucket_size, s.max_live_parameters))
        parts["buffers.gathered_parameters"] = live * b
        parts["buffers.persistent_parameters"] = sum(n for n in counts.sizes if n < s.persistence_threshold) * b
    return sum(v for k, v in parts.items() if k.startswith("buffers."))


def _activation_bytes(cfg: ModelConfig, s: TrainingSetup) -> tuple[int, int]:
    """(bytes saved for backward without checkpointing, with it) for one micro batch, the logits aside."""
    b, seq, batch = s.dtype_bytes, s.sequence_length, s.micro_batch
    blocks = [block_bytes_per_token(cfg, cfg.attention_kind(i), seq, batch, b) for i in range(cfg.num_layers)]
    cross = [cross_bytes_per_token(cfg, b)] * len(cfg.cross_attention_layers)
    rest = rest_bytes_per_token(cfg, seq, batch, b)
    tokens = batch * seq
    full = tokens * (sum(blocks) + sum(cross) + rest)
    kept = tokens * ((len(blocks) + len(cross)) * b * cfg.hidden_size + max(blocks + cross) + rest)
    return round(full), round(kept)


def block_bytes_per_token(cfg: ModelConfig, kind: str, seq: int, batch: int, b: int) -> float:
    """Bytes one transformer block keeps per token for backward: two norms, its attention, its FFN."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    q, kv = heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    fp32_copy = 4 * h if b < 4 else 0  # a router's float32 input (in fp32 it is the normed input itself)
    standard = b * (h + 2 * q + 2 * kv) + 4 * heads
    attention: float
    if kind == "moa":
        k, width = cfg.moa.experts_per_token, cfg.moa_heads_per_expert
        q_moa = k * width * cfg.head_dim
        attention = (b * (h + 2 * k * h + 3 * q_moa + 2 * kv) + 4 * k * width
                     + _router_bytes(cfg.moa.num_experts, k, b) + fp32_copy)
    elif kind == "moh":
        attention = standard + b * (q + heads) + 24 * heads + fp32_copy
    elif kind == "memory" and seq > cfg.episodic_memory.segment_length:
        m = cfg.episodic_memory
        attention = standard + 14 * heads * m.top_k + 2 * b * (q + kv) + seq * (b + 1) / batch
    else:
        attention = standard
    dropout = 2 * h if cfg.hidden_dropout > 0 else 0
    return 2 * _norm_bytes(cfg, b) + attention + _ffn_bytes(cfg, b) + dropout


def cross_bytes_per_token(cfg: ModelConfig, b: int) -> float:
    """Bytes one gated cross-attention block keeps per token (keys read: see the module docstring)."""
    h = cfg.hidden_size
    heads = cfg.cross_attention.num_heads or cfg.num_attention_heads
    reads = 2 * cfg.rag.num_neighbours if cfg.use_rag else 1
    # 6 h-wide tensors besides the FFN's normed input: q, attention output, o_proj in and out, the gated FFN output
    return 2 * _norm_bytes(cfg, b) + 6 * b * h + 4 * heads + _dense_ffn_bytes(cfg, cfg.intermediate_size, b) \
        + 2 * b * h * reads


def rest_bytes_per_token(cfg: ModelConfig, seq: int, batch: int, b: int) -> float:
    """Outside the blocks: token ids and labels, the final norm, the output head's input, RoPE tables,
    and the context the cross-attention blocks read (RAG neighbours, embedded once)."""
    h = cfg.hidden_size
    rope = 2 * cfg.head_dim * b / batch if cfg.position_embedding_type == "rope" else 0  # cos, sin: (seq, head_dim)
    context = 0.0
    if cfg.cross_attention_layers:
        context = 2 * cfg.rag.num_neighbours * b * h if cfg.use_rag else b * h
    dropout = h if cfg.hidden_dropout > 0 else 0
    return 16 + _norm_bytes(cfg, b) + b * h + rope + context + dropout


def _norm_bytes(cfg: ModelConfig, b: int) -> int:
    """RMSNorm computes in fp32 and keeps its fp32 input and normalised copy and 1/rms; LayerNorm keeps its
    input as it is and a float32 mean and 1/std per token."""
    h = cfg.hidden_size
    return 8 * h + 4 if cfg.norm_type == "rmsnorm" else b * h + 8


def _router_bytes(experts: int, k: int, b: int) -> int:
    """Probabilities and logits (fp32), top-k ids, weights and their sum, the dispatch order and its inverse."""
    return 8 * experts + 28 * k + 8 + b * k


def _dense_ffn_bytes(cfg: ModelConfig, width: int, b: int) -> int:
    """A dense FFN of `width`, with its normed input: b(h + 4I) SwiGLU, b(h + 2I) GELU."""
    return b * (cfg.hidden_size + (4 if cfg.activation == "swiglu" else 2) * width)


def _ffn_bytes(cfg: ModelConfig, b: int) -> float:
    h, width = cfg.hidden_size, cfg.intermediate_size
    if not cfg.is_moe:
        return _dense_ffn_bytes(cfg, width, b)
    k = 1 if cfg.router_type == "switch" else cfg.num_experts_per_token
    per_copy = (4 if cfg.activation == "swiglu" else 2) * width
    routed = b * (2 * k * h + k * per_copy) + 4 * h + _router_bytes(cfg.num_experts, k, b)
    shared = 0
    if cfg.shared_expert_intermediate_size:
        shared = _dense_ffn_bytes(cfg, cfg.shared_expert_intermediate_size, b) - (b * h if b == 4 else 0)
    return routed + shared


def size_text(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    return f"{n / GiB:,.1f} GiB" if abs(n) >= GiB else f"{n / 2**20:,.0f} MiB"
