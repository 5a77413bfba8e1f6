"""What a finished run leaves in its output directory, and that each piece is what it claims to be.

One 16-step MoE run (evaluating every 4 steps, saving every 8, W&B offline)
is shared by the checks below; early stopping and the learning test run
their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ava.model.store import load_model_dir
from ava.train.checkpoint.export import checkpoint_state_dict
from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, run_env

pytestmark = pytest.mark.slow

SMALL_MODEL = ["--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size", "128"]


def _train(out: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "train.py", *TINY, *SMALL_RUN, *flags, "--output_dir", str(out)],
                            cwd=REPO, env=env or run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("outputs") / "run"
    env = {**run_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(out.parent)}
    return out, _train(out, *SMALL_MODEL, "--max_steps", "16", "--eval_steps", "4", "--save_steps", "8",
                       "--keep_last_checkpoints", "2", "--wandb_log", "true", env=env)


def test_run_directory_holds_every_promised_output(run):
    out, _ = run
    for name in ("config.yaml", "deepspeed.json", "versions.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["deepspeed"]
    assert "# command line" in (out / "config.yaml").read_text()  # provenance travels with the run
    for png in ("loss.png", "lr.png", "expert_load.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_metrics_log_losses_memory_moe_load_and_evaluations(run):
    out, _ = run
    records = _records(out)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [4, 8, 12, 16]
    assert {"lm_loss", "router_loss", "lr", "grad_norm", "tokens_per_s", "mfu_flops_per_s",
            "memory/max_rss_gb", "moe/load_cv", "moe/layer1/load/expert3"} <= set(steps[0])
    assert steps[0]["memory/max_rss_gb"] > 0.05
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    assert all(r["eval_perplexity"] > 1 for r in evals)
    assert evals[-1]["best_eval_loss"] == min(r["eval_loss"] for r in evals)


def test_summary_reports_best_checkpoint_sample_and_passed_checks(run):
    out, result = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 16 and summary["checks_passed"]
    assert all(summary["checks"].values()), summary["checks"]
    evals = {r["step"]: r["eval_loss"] for r in _records(out) if "eval_loss" in r}
    assert summary["best_step"] == min(evals, key=evals.get) and summary["best_eval_loss"] == min(evals.values())
    assert summary["final_loss"] < summary["first_loss"]
    assert len(summary["sample"]["prompt_ids"]) > 0 and len(summary["sample"]["continuation_ids"]) > 0
    assert "PASSED" in result.stdout and "checkpoint reloads to the same loss" in result.stdout


def test_checkpoints_keep_the_last_k_and_the_best(run):
    out, _ = run
    root = out / "checkpoints"
    summary = json.loads((out / "summary.json").read_text())
    best = (root / "best").read_text().strip()
    assert best == f"step{summary['best_step']:08d}" and (root / best / "COMPLETE").is_file()
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert kept[-2:] == ["step00000012", "step00000016"] and set(kept) <= {best, "step00000012", "step00000016"}
    assert (root / "latest").read_text().strip() == "step00000016"


def test_exported_model_matches_the_final_checkpoint_and_continues_to_hf(run, tmp_path):
    out, _ = run
    model = load_model_dir(out / "model")
    saved = checkpoint_state_dict(out / "checkpoints" / "step00000016")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    hf_dir = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "ava", "model", "export-checkpoint", str(out), "--best",
                             "--hf", "--out", str(hf_dir)], cwd=REPO, env=run_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency: pip install -e .[dev]")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    best = load_model_dir(out / "model")
    best.load_state_dict(checkpoint_state_dict(out / "checkpoints" / (out / "checkpoints" / "best").read_text().strip()))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, best.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_wandb_offline_run_is_written(run):
    out, _ = run
    offline = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 1000


def test_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "ava", "model", "export-checkpoint",
                             str(tmp_path / "empty"), "--out", str(tmp_path / "x")], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds no complete checkpoint" in result.stderr and "Fix:" in result.stderr
    assert not (tmp_path / "x").exists()


def test_early_stopping_ends_the_run_after_patience_evaluations(tmp_path):
    out = tmp_path / "run"
    # Nothing can improve the best loss by 100 nats, so the second evaluation is the first without improvement.
    result = _train(out, *SMALL_MODEL, "--max_steps", "40", "--eval_steps", "2", "--early_stopping_patience", "1",
                    "--early_stopping_threshold", "100")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "early_stopped" and summary["steps"] == 4 and summary["planned_steps"] == 40
    assert summary["best_step"] == 2 and summary["checks_passed"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert any(r.get("event") == "early_stop" for r in _records(out))
    assert "early stop at step 4" in result.stdout


def test_a_small_model_learns_the_markov_corpus_to_near_its_entropy_rate(tmp_path):
    """The built-in Markov corpus (64 tokens) has an exactly known entropy rate H of about 3.45 nats/token
    (uniform guessing costs ln 64 = 4.16). A one-layer model trained for 400 steps (about 15 s on 2 cores)
    must reach a held-out loss within 0.15 nats of H, and cannot honestly beat it by more than noise."""
    out = tmp_path / "run"
    _train(out, "--vocab_size", "64", "--hidden_size", "64", "--num_layers", "1", "--num_attention_heads", "2",
           "--intermediate_size", "128", "--num_experts", "0", "--batch_size", "16", "--eval_batch_size", "16",
           "--max_eval_examples", "64", "--learning_rate", "3e-3", "--lr_end", "3e-4", "--warmup_steps", "20",
           "--max_steps", "400", "--logging_steps", "50", "--eval_steps", "200", "--save_steps", "1000")
    summary = json.loads((out / "summary.json").read_text())
    entropy, loss = summary["entropy_rate"], summary["eval_loss"]
    assert 3.0 < entropy < 4.0
    assert loss - entropy < 0.15, f"held-out loss {loss:.4f} is not within 0.15 nats of the entropy rate {entropy:.4f}"
    assert loss > entropy - 0.05, f"held-out loss {loss:.4f} is below the entropy rate {entropy:.4f}: leakage?"
