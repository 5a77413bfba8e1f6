"""Exact Hugging Face interchange: tiny random HF models built locally, converted both ways.

Each case proves logits equal within 1e-5 (fp32) and identical greedy
generations, HF -> Ava and Ava -> HF (loaded back by `from_pretrained`).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency: pip install -e .[dev]")

from ava.config.schema.model import ModelConfig  # noqa: E402
from ava.errors import UserError  # noqa: E402
from ava.hf import export_hf, import_hf  # noqa: E402
from ava.model import AvaForCausalLM  # noqa: E402

VOCAB = 97


def _llama(tied: bool = False, bias: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    return transformers.LlamaForCausalLM(cfg)


def _mixtral():
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    return transformers.MixtralForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


BUILDERS = {"llama": _llama, "llama_tied_bias": lambda: _llama(True, True), "mixtral": _mixtral, "gpt2": _gpt2}


def _randomise(model: torch.nn.Module) -> None:
    """HF initialises norms to 1 and biases to 0; perturb everything so a mapping error cannot hide."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _hf_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    with torch.no_grad():  # plain argmax loop: independent of generate()'s defaults across versions
        for _ in range(steps):
            nxt = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
    return tokens


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_hf_checkpoint_imports_with_equal_logits_and_generations(family, tmp_path):
    torch.manual_seed(0)
    hf = BUILDERS[family]().eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "hf")
    ava = import_hf(tmp_path / "hf").eval()
    ids = _inputs()
    with torch.no_grad():
        expected, got = hf(ids).logits, ava(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    prompt = ids[:, :6]
    assert torch.equal(ava.generate(prompt, 10, temperature=0), _hf_greedy(hf, prompt, 10))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_ava_model_exports_to_hf_with_equal_logits(family, tmp_path):
    torch.manual_seed(0)
    hf = BUILDERS[family]()
    hf.save_pretrained(tmp_path / "hf")
    ava = import_hf(tmp_path / "hf")
    _randomise(ava)  # new weights, so the export is not just a copy of the original files
    ava.eval()
    export_hf(ava, tmp_path / "out")
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ava(ids).logits, atol=1e-5, rtol=0)
    prompt = ids[:, :6]
    assert torch.equal(_hf_greedy(back, prompt, 10), ava.generate(prompt, 10, temperature=0))


def test_mixtral_fused_expert_layout_imports_like_the_hub_layout(tmp_path):
    torch.manual_seed(0)
    hf = _mixtral().eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "hub")
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)
    a, b = import_hf(tmp_path / "hub"), import_hf(tmp_path / "fused")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_export_refuses_a_model_without_hf_equivalent(tmp_path):
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
                      max_position_embeddings=16, num_experts=4, router_type="aux_loss_free")
    with pytest.raises(UserError, match="router_type aux_loss_free has no Mixtral equivalent"):
        export_hf(AvaForCausalLM(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites_an_existing_checkpoint(tmp_path):
    hf = _llama()
    hf.save_pretrained(tmp_path / "hf")
    ava = import_hf(tmp_path / "hf")
    export_hf(ava, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    _randomise(ava)
    with pytest.raises(UserError, match="already exists"):
        export_hf(ava, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_import_rejects_unsupported_rope_scaling_and_stray_tensors(tmp_path):
    hf = _llama()
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    config.pop("rope_scaling", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="rope scaling `yarn`"):
        import_hf(tmp_path / "hf")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config["num_hidden_layers"] = 1  # the file holds 2 layers: the second would be silently dropped
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="tensors Ava would ignore"):
        import_hf(tmp_path / "hf")
