"""`training.compile`: compiled blocks compute what the eager ones do, in one graph each, and only when training.

The blocks are compiled with the "aot_eager" backend: dynamo and AOTAutograd
trace Ava's code exactly as in training (graph breaks, the custom autograd
functions of the MoE dispatch, the backward graph), without inductor's C++
code generation, which costs 15-25 s per test on 2 CPU cores and is torch's
to test. `tests/train/test_train_run.py` trains through inductor end to end.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from ava.config.schema.model import ModelConfig
from ava.model import AvaForCausalLM
from ava.model.compile import compile_pays
from ava.model.transformer import Context

TOY = dict(hidden_size=64, num_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
           max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0)


def _pair(**settings: object) -> tuple[AvaForCausalLM, AvaForCausalLM]:
    """An eager model and a compiled one with the same weights."""
    cfg = ModelConfig.model_validate({**TOY, **settings})
    torch.manual_seed(0)
    eager = AvaForCausalLM(cfg).train()
    compiled = AvaForCausalLM(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.use_compiled_blocks(backend="aot_eager")
    return eager, compiled


@pytest.mark.parametrize("settings", [{"num_experts": 1}, {"num_experts": 4, "num_experts_per_token": 2}],
                         ids=["dense", "moe"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointed"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(settings: dict, checkpointing: bool) -> None:
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _pair(**settings)
    for model in (eager, compiled):
        model.gradient_checkpointing = checkpointing
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    for model in (eager, compiled):
        model(ids, labels=ids).loss.backward()
    assert compiled(ids, labels=ids).loss.item() == pytest.approx(eager(ids, labels=ids).loss.item(), rel=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"


def test_every_block_shares_one_graph_whatever_the_depth() -> None:
    """A graph per layer would hit dynamo's recompile limit (8) and leave deeper layers eager."""
    graphs = []
    for layers in (2, 10):
        torch._dynamo.reset()
        counters.clear()
        _, compiled = _pair(num_experts=1, num_layers=layers)
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
        compiled(ids, labels=ids).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0, graphs


def test_the_moe_block_compiles_whole_but_for_the_grouped_gemm() -> None:
    """One break only, around fp32 grouped_mm (torch's compiled shape function takes bf16 only).

    Pins the dispatch free of data-dependent shapes: bincount, nonzero or a
    `.tolist()` would each add a break and a host sync.
    """
    torch._dynamo.reset()
    eager, _ = _pair(num_experts=4, num_experts_per_token=2)
    block = eager.layers[0]
    x = torch.randn(2, 32, 64)
    rope = eager.rotary(torch.arange(32), x.dtype)
    explanation = torch._dynamo.explain(block)(x, rope)
    reasons = [str(b.reason) for b in explanation.break_reasons]  # the one break, seen from each nested frame
    assert reasons and all("_outside_graph" in reason for reason in reasons), reasons


def test_a_fresh_attention_inputs_object_each_forward_reuses_the_compiled_graphs() -> None:
    """The model builds one `AttentionInputs` per forward and passes it to every block: a new object with the
    same kind of contents must not cost a recompile, and a field only the memory layer reads (document ids)
    recompiles the memory layer's graph alone when it changes."""
    torch._dynamo.reset()
    counters.clear()
    _, compiled = _pair(num_experts=1, use_episodic_memory=True, episodic_memory={"segment_length": 8})
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    graphs = []
    for _ in range(3):
        documents = torch.zeros(2, 32, dtype=torch.long)
        documents[:, 20:] = 1
        compiled(ids, labels=ids, context=Context(documents=documents)).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    compiled(ids, labels=ids).loss.backward()  # no document ids
    graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] == graphs[2] == graphs[3] - 1 > 0, graphs


def test_generation_with_a_kv_cache_runs_the_eager_blocks() -> None:
    """A cache's length changes every token: compiled, each length would be a recompile."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _pair(num_experts=1)
    eager.eval(), compiled.eval()
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(compiled.generate(prompt, 6, temperature=0), eager.generate(prompt, 6, temperature=0))
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_blocks_leave_the_state_dict_as_eager() -> None:
    """No `_orig_mod.` keys: checkpoints and exports stay interchangeable with compile on or off."""
    eager, compiled = _pair(num_experts=1)
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.parametrize(("setting", "device", "stage", "expected"), [
    ("auto", "cpu", 0, False), ("auto", "cuda", 2, True), ("auto", "cuda", 3, False),
    (True, "cpu", 0, True), (True, "cuda", 3, True), (False, "cuda", 1, False),
])
def test_auto_compiles_on_cuda_below_zero3_and_explicit_settings_win(setting, device, stage, expected) -> None:
    assert compile_pays(setting, device, stage) is expected
