"""Weight decay applies to matrices; norms and biases (and embeddings when asked) are left out, as documented."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ava.config.schema.model import ModelConfig
from ava.model import AvaForCausalLM
from ava.train.engine.param_groups import decay_groups, split_for_decay
from tests.conftest import REPO
from tests.train.run_helpers import run_env

GPT2_STYLE = dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=300,
                  max_position_embeddings=64, norm_type="layernorm", use_bias=True, position_embedding_type="learned")


def _model(**overrides) -> AvaForCausalLM:
    torch.manual_seed(0)
    return AvaForCausalLM(ModelConfig(**{**GPT2_STYLE, **overrides}))


def test_the_default_exempts_every_norm_weight_and_bias_and_decays_matrices_and_embeddings():
    split = split_for_decay(_model(), ["norms", "biases"])
    assert split.exempt and split.decayed
    assert all(n.endswith("bias") or "norm" in n for n in split.exempt), split.exempt
    assert all(not n.endswith("bias") and "norm" not in n for n in split.decayed), split.decayed
    assert {"embed_tokens.weight", "embed_positions.weight"} <= set(split.decayed)
    assert any(n.endswith("attn_norm.weight") for n in split.exempt)
    assert any(n.endswith("attn_norm.bias") for n in split.exempt)
    # Every trainable parameter is in exactly one of the two lists.
    trainable = [n for n, p in _model().named_parameters() if p.requires_grad]
    assert sorted(split.decayed + split.exempt) == sorted(trainable)


def test_embeddings_are_exempt_only_when_asked_and_an_empty_list_decays_everything():
    model = _model()
    with_tables = split_for_decay(model, ["norms", "biases", "embeddings"])
    assert {"embed_tokens.weight", "embed_positions.weight"} <= set(with_tables.exempt)
    assert split_for_decay(model, []).exempt == ()
    groups = decay_groups(model, 0.1, [])
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1  # the optimizer Ava built before the setting


def test_expert_stacked_biases_and_feature_gates_are_exempt():
    # MoA's per-expert biases are 2-D but offsets; cross-attention's gates are 1-D scalars that scale.
    model = _model(use_moa=True, moa={"every_n_layers": 1}, use_cross_attention=True)
    exempt = set(split_for_decay(model, ["norms", "biases"]).exempt)
    assert any(n.endswith("q_bias") for n in exempt) and any(n.endswith("attn_gate") for n in exempt)


def test_adamw_on_the_groups_decays_matrices_and_leaves_exempt_tensors_alone():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(decay_groups(model, 0.5, ["norms", "biases"]), lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only decay can move a weight
    optimizer.step()
    split = split_for_decay(model, ["norms", "biases"])
    after = dict(model.named_parameters())
    for name in split.exempt:
        assert torch.equal(after[name], before[name]), name
    for name in split.decayed:
        assert torch.allclose(after[name], before[name] * 0.5), name


def test_an_unknown_entry_is_refused():
    with pytest.raises(ValueError, match="weight_decay_exclude"):
        split_for_decay(_model(), ["layernorms"])


WORKER = """
import json, os
os.environ.setdefault("DS_ACCELERATOR", "cpu")
from ava.config import ConfigFiles, WorldSize, build_deepspeed_config, load_config
from ava.model import AvaForCausalLM
from ava.train.engine.build import build_engine
from ava.train.runtime.distributed import init_distributed
cfg = load_config(ConfigFiles("configs/gpu/tiny.yaml", "configs/hardware/cpu.yaml", None),
                  ["--max_steps", "20", "--hidden_size", "32", "--num_layers", "2", "--intermediate_size", "64"],
                  WorldSize(1, "weight decay test")).config
init_distributed()
notes = []
engine = build_engine(AvaForCausalLM(cfg.model), cfg, build_deepspeed_config(cfg), note=notes.append)
groups = engine.engine.optimizer.param_groups
print(json.dumps({"decay": [g["weight_decay"] for g in groups], "sizes": [len(g["params"]) for g in groups],
                  "fused": [g.get("fused") for g in groups], "notes": notes,
                  "all_reduce": engine.engine.enable_backward_allreduce}))
"""


def test_the_deepspeed_engine_builds_its_fused_optimizer_with_the_groups_and_says_so():
    done = subprocess.run([sys.executable, "-c", WORKER], cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["decay"] == [0.1, 0.0]
    assert result["sizes"][1] == 2 * 2 + 1  # two norms per block, and the final norm (tiny.yaml: rmsnorm, no bias)
    assert any(n.startswith("weight decay 0.1 on") and "exempt" in n for n in result["notes"])
    assert result["fused"] == [True, True]  # on CPU: torch's fused AdamW, one kernel rather than a loop per tensor
    assert result["all_reduce"] is False  # one rank at ZeRO 0: no identity all-reduce of every gradient
