"""Packed documents (`segment_ids`): a packed row computes exactly what its documents would one by one."""

from __future__ import annotations

import pytest
import torch

from ava.config.schema.model import ModelConfig
from ava.model import AvaForCausalLM
from ava.model.transformer import document_positions_and_mask


def _model(**overrides) -> AvaForCausalLM:
    base = dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=61,
                max_position_embeddings=32, num_experts=0)
    torch.manual_seed(0)
    return AvaForCausalLM(ModelConfig(**{**base, **overrides})).eval()


def test_positions_restart_and_attention_stays_inside_each_document():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2]])
    positions, mask = document_positions_and_mask(segments)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    allowed = mask[0, 0].int().tolist()
    assert allowed[4] == [0, 0, 0, 1, 1, 0]  # the second document's second token: itself and its first token
    assert allowed[2] == [1, 1, 1, 0, 0, 0]
    assert allowed[5] == [0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("experts", [0, 4])
def test_a_packed_row_gives_each_document_its_own_logits(positions, experts):
    # Dropless MoE routes each token independently, so packing changes nothing there either.
    model = _model(position_embedding_type=positions, num_experts=experts, num_experts_per_token=2,
                   expert_capacity_factor=0)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 61, (n,), generator=gen) for n in (5, 9, 3)]
    packed = torch.cat(docs)[None]
    segments = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        together = model(packed, segment_ids=segments).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
        unmasked = model(packed).logits[0]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[5:], alone[5:], atol=1e-3)  # without segments, later documents see earlier ones


def test_segments_work_with_gradient_checkpointing_and_give_the_same_gradients():
    model = _model()
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    segments = torch.tensor([[0] * 7 + [1] * 5, [0] * 3 + [1] * 9])
    model.train()
    model(ids, labels=ids, segment_ids=segments).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, labels=ids, segment_ids=segments).loss.backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
