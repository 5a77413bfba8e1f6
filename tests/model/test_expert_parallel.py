"""Expert parallelism: experts spread over ranks compute, train and checkpoint exactly like the whole model.

The multi-process tests run `expert_parallel_worker.py` on 2 CPU ranks through
the real `deepspeed` launcher with gloo; the reference is always the model
built whole, in this process, on the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ava.model import AvaForCausalLM
from ava.model.moe import MoELayer
from ava.model.moe.expert_parallel import ExpertParallel, _expert_major_order
from ava.model.moe.experts import GroupedExperts
from ava.train.engine.expert_parallel import expert_parallel_checkpoint_state
from tests.model import expert_parallel_worker as worker
from tests.train.run_helpers import free_port, run_env

WORKER = Path(worker.__file__)
TOL = 1e-5


def _launch(mode: str, cwd: Path) -> list[dict]:
    """Run the worker on 2 ranks; returns each rank's result, in rank order."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(launcher).exists():
        pytest.fail("the deepspeed launcher is not installed next to this Python; run `make setup`")
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", free_port(), str(WORKER), mode],
                          capture_output=True, text=True, env=run_env(), cwd=cwd, timeout=900)
    files = sorted(cwd.glob(f"result_{mode}_rank*.json"))
    assert proc.returncode == 0 and len(files) == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads(f.read_text()) for f in files]


# ---- in one process ----

def test_rows_arriving_source_by_source_are_regrouped_expert_by_expert():
    received = torch.tensor([[2, 0, 1], [1, 3, 0]])  # [source, local expert] row counts
    labels = [(s, e) for s in range(2) for e in range(3) for _ in range(int(received[s, e]))]
    order = _expert_major_order(received)
    regrouped = [labels[i] for i in order.tolist()]
    assert regrouped == sorted(labels, key=lambda se: (se[1], se[0]))


def test_a_rank_keeps_a_copy_of_its_experts_slice_not_a_view_of_the_stack():
    experts = GroupedExperts(4, 8, 6, "swiglu")
    torch.nn.init.normal_(experts.up_proj)
    whole = experts.up_proj.detach().clone()
    experts.keep_experts(2, 4)
    assert experts.num_experts == 2 and experts.up_proj.shape == (2, 8, 6) and experts.down_proj.shape == (2, 6, 8)
    assert torch.equal(experts.up_proj, whole[2:4])
    assert experts.up_proj.untyped_storage().nbytes() == whole[2:4].numel() * 4  # the dropped experts are freed


def test_experts_must_divide_evenly_over_the_ranks():
    ep = ExpertParallel(group=None, rank=1, size=2)  # type: ignore[arg-type]
    assert ep.owned(8) == (4, 8)
    with pytest.raises(ValueError, match="6 experts cannot be split evenly over 4"):
        ExpertParallel(group=None, rank=0, size=4).owned(6)  # type: ignore[arg-type]


@pytest.fixture
def group_of_one():
    """A gloo process group of this process alone, torn down afterwards."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_one_rank_expert_parallel_layer_equals_the_plain_layer(group_of_one, capacity):
    torch.manual_seed(0)
    plain = MoELayer(16, 24, 4, 2, "topk", "swiglu", capacity, 0.01, 0.001)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.3)
    parallel = MoELayer(16, 24, 4, 2, "topk", "swiglu", capacity, 0.01, 0.001)
    parallel.load_state_dict(plain.state_dict())
    parallel.distribute_experts(ExpertParallel(group_of_one, 0, 1))
    x = torch.randn(2, 9, 16)
    outs = []
    for layer in (plain, parallel):
        out, stats = layer(x)
        (out.square().sum() + stats.router_loss).backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=TOL, atol=TOL)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(parallel.get_parameter(name).grad, p.grad, rtol=TOL, atol=TOL)


# ---- 2 ranks, plain torch.distributed ----

@pytest.mark.slow
def test_layer_on_two_expert_parallel_ranks_matches_the_whole_layer_in_value_and_gradient(tmp_path):
    ranks = _launch("layers", tmp_path)
    for r in ranks:
        for name, case in r["cases"].items():
            assert case["same_load"], (r["rank"], name)
            assert case["local_expert_shape"] == [2, 32, 48]  # half of the 4 experts
            errors = {k: v for k, v in case.items() if isinstance(v, float) and k != "local_expert_grad_norm"}
            errors.update(case["expert_grads"])
            assert max(errors.values()) < TOL, (r["rank"], name, errors)
        assert len(r["model"]) > 10 and max(r["model"].values()) < TOL, r["model"]  # logits, loss, every gradient
    # Both ranks' experts learn from rows that crossed over (their gradients match the sum over both
    # ranks' tokens, above); when every token picks rank 0's experts, rank 1's get no rows and no gradient.
    assert ranks[0]["cases"]["dropless"]["local_expert_grad_norm"] > 0
    assert ranks[1]["cases"]["dropless"]["local_expert_grad_norm"] > 0
    assert ranks[1]["cases"]["skewed"]["local_expert_grad_norm"] == 0


# ---- 2 ranks under DeepSpeed ZeRO 1/2, ep_size 2 ----

@pytest.fixture(scope="module")
def engine_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One launch trains every case and exercises its checkpoint (DeepSpeed start-up dominates the time)."""
    cwd = tmp_path_factory.mktemp("expert_parallel_engine")
    return cwd, _launch("engine", cwd)


@contextlib.contextmanager
def _one_thread():
    """A tiny model runs on one thread: two, on a busy 2-core machine, can spin-wait 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def _reference(capacity: float | None, optimizer: str) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process, all experts: each step averages the gradients of both ranks' micro-batches.

    Returns the per-step losses, gradient norms (before clipping) and the final weights.
    """
    torch.manual_seed(0)
    model = AvaForCausalLM(worker.model_config(capacity))
    opt = getattr(torch.optim, optimizer)(model.parameters(), **worker.OPTIMIZERS[optimizer],
                                          weight_decay=worker.WEIGHT_DECAY)
    losses, norms = [], []
    for step in range(worker.STEPS):
        opt.zero_grad()
        micro = [model(ids, labels=ids).loss for ids in (worker.batch(step, 0), worker.batch(step, 1))]
        (sum(micro) / 2).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), worker.CLIP)))
        opt.step()
        losses.append(float(sum(micro).detach()) / 2)
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _is_expert(key: str) -> bool:
    return ".experts." in key


def _close(mine: list[float], want: list[float]) -> bool:
    return all(abs(a - b) <= TOL * abs(b) for a, b in zip(mine, want, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.CASES))
def test_zero_training_with_ep2_follows_the_single_process_run(engine_run, case):
    cwd, ranks = engine_run
    _, capacity, optimizer = worker.CASES[case]
    losses, norms, weights = _reference(capacity, optimizer)
    assert all(n > worker.CLIP for n in norms)  # every step clips: the norm over all experts counts
    # SGD's weights follow the gradients to fp32 precision. Adam's step is g / sqrt(v), about the
    # learning rate whatever |g|: a gradient entry that is ~0 (1e-9 beside 1e-4) is summation-order
    # noise, which Adam turns into ~1e-3 of a step. Wrong gradients would be off by whole steps.
    weight_tol = TOL if optimizer == "SGD" else 1e-2 * worker.OPTIMIZERS[optimizer]["lr"]
    for r in ranks:
        got = r["cases"][case]
        assert got["has_moe_layers"] and got["moe_param_groups"] == 1
        assert _close(got["losses"], losses), (r["rank"], got["losses"], losses)
        assert _close(got["grad_norms"], norms), (r["rank"], got["grad_norms"], norms)
        state = torch.load(cwd / f"state_{case}_rank{r['rank']}.pt")
        for key, value in state.items():
            want = weights[key][2 * r["rank"]: 2 * r["rank"] + 2] if _is_expert(key) else weights[key]
            torch.testing.assert_close(value, want, rtol=weight_tol, atol=weight_tol, msg=f"rank {r['rank']} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.CASES))
def test_each_rank_holds_its_own_experts_and_identical_dense_weights(engine_run, case):
    cwd, _ = engine_run
    rank0, rank1 = (torch.load(cwd / f"state_{case}_rank{r}.pt") for r in (0, 1))
    experts = [k for k in rank0 if _is_expert(k)]
    assert len(experts) == 6  # gate, up, down of 2 layers
    for key in rank0:
        if _is_expert(key):
            assert rank0[key].shape[0] == 2 and not torch.allclose(rank0[key], rank1[key]), key
        else:
            assert torch.equal(rank0[key], rank1[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.CASES))
def test_checkpoint_round_trip_restores_every_ranks_experts(engine_run, case):
    cwd, ranks = engine_run
    for r in ranks:
        got = r["cases"][case]
        assert got["restored"], "load_checkpoint did not restore the saved weights"
        assert got["replayed"] and got["replayed_loss"] == got["next_loss"], "optimizer state not restored"
        assert got["fresh_differs_before"] and got["module_only"], "a module-only load missed some weights"
    saved = cwd / f"ckpt_{case}" / "saved"
    module = torch.load(saved / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and not any(_is_expert(k) for k in module)  # rank 0's experts are not everyone's
    for r in (0, 1):
        trained = torch.load(cwd / f"state_{case}_rank{r}.pt")
        for layer in (0, 1):
            for local in (0, 1):
                expert = torch.load(saved / f"layer_{layer}_expert_{2 * r + local}_mp_rank_00_model_states.pt")
                assert set(expert) == {f"layers.{layer}.ffn.experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
                for key, value in expert.items():
                    assert torch.equal(value, trained[key][local]), (r, key)


@pytest.mark.slow
def test_whole_model_weights_are_read_back_from_an_expert_parallel_checkpoint(engine_run):
    cwd, _ = engine_run
    rank0, rank1 = (torch.load(cwd / f"state_zero2_dropless_rank{r}.pt") for r in (0, 1))
    whole = expert_parallel_checkpoint_state(cwd / "ckpt_zero2_dropless" / "saved")
    assert whole.keys() == rank0.keys()
    for key, value in whole.items():
        want = torch.cat([rank0[key], rank1[key]]) if _is_expert(key) else rank0[key]
        assert torch.equal(value, want), key
    model = AvaForCausalLM(worker.model_config(None))
    model.load_state_dict(whole)  # the shapes of the model built whole, with all 4 experts
