"""`WandbLogger`: logs a run's records to W&B offline without network, and never stops training when W&B fails.

One real offline W&B run per module (it starts W&B's service process); the
failure paths replace `wandb.init` instead.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from ava.train.report.wandb_log import WandbLogger, metric_name

RECORDS = [
    {"step": 10, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 5000.0, "moe/layer0/load/expert0": 3.0},
    {"step": 20, "loss": 2.0, "lr": 5e-4, "tokens_per_s": 5100.0, "moe/layer0/load/expert0": 4.0},
    {"step": 20, "eval_loss": 2.2, "eval_perplexity": 9.03, "best_eval_loss": 2.1},
    {"step": 20, "event": "early_stop", "reason": "3 evaluations without an improvement"},
]


def _wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The protobuf records of a .wandb file (a LevelDB-style log: 32 KiB blocks of checksummed chunks)."""
    data, block, pos = path.read_bytes(), 32768, 7  # 7 bytes: ":W&B", magic, version
    assert data[:4] == b":W&B"
    records, chunk = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _isolate(env: pytest.MonkeyPatch, home: Path, mode: str) -> None:
    """W&B reads no credentials or settings of the machine's user and writes nothing outside `home`."""
    for name, value in {"HOME": home, "NETRC": home / "netrc", "WANDB_CONFIG_DIR": home / "config",
                        "WANDB_CACHE_DIR": home / "cache", "WANDB_DATA_DIR": home / "data", "WANDB_DIR": home,
                        "WANDB_MODE": mode, "WANDB_SILENT": "true"}.items():
        env.setenv(name, str(value))
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
        env.delenv(name, raising=False)
    wandb.teardown()  # W&B reads its environment once per process setup


@pytest.fixture
def isolated_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """An offline W&B with a fresh setup; yields the run directory."""
    _isolate(monkeypatch, tmp_path, "offline")
    yield tmp_path / "run"
    wandb.teardown()


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as env:
        _isolate(env, run_dir, "offline")
        logger = WandbLogger.start({"model": {"n_layer": 2}}, "ava-test", None, "tiny", run_dir)
        assert logger is not None
        for record in RECORDS:
            logger.log(record)
        logger.finish({"status": "early_stopped", "final_loss": 2.0, "eval_loss": None, "output_dir": run_dir,
                       "checks": {"loss_finite": True}})
        wandb.teardown()
    return run_dir


def _history(run_dir: Path) -> dict[int, dict[str, float]]:
    [wandb_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict[str, float]] = {}
    for record in _wandb_records(wandb_file):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    return history


def test_an_offline_run_is_written_under_the_run_dir(offline_run):
    [run] = offline_run.glob("wandb/offline-run-*")
    assert list(run.glob("run-*.wandb"))[0].stat().st_size > 0


def test_each_record_is_logged_at_its_step_with_eval_keys_under_eval(offline_run):
    history = _history(offline_run)
    assert sorted(history) == [10, 20]
    assert history[10]["loss"] == 2.5 and history[10]["moe/layer0/load/expert0"] == 3.0
    assert history[20]["loss"] == 2.0 and history[20]["lr"] == 5e-4
    assert history[20]["eval/loss"] == 2.2 and history[20]["eval/perplexity"] == 9.03
    assert history[20]["eval/best_loss"] == 2.1
    assert "step" not in history[10] and "eval_loss" not in history[20]
    assert "event" not in history[20] and "reason" not in history[20]  # text stays in metrics.jsonl


def test_the_run_name_project_config_and_final_summary_are_recorded(offline_run):
    [wandb_file] = offline_run.glob("wandb/offline-run-*/run-*.wandb")
    records = _wandb_records(wandb_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "ava-test" and run.display_name == "tiny"
    assert {i.key: json.loads(i.value_json) for i in run.config.update}["model"] == {"n_layer": 2}
    summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update if i.key}
    assert summary["status"] == "early_stopped" and summary["final_loss"] == 2.0
    assert summary["output_dir"] == str(offline_run) and "eval_loss" not in summary
    assert summary["checks"] == {"loss_finite": True}
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0]  # an early stop is a run that ended well


def test_online_without_a_login_warns_with_the_fix_and_returns_none_without_prompting(monkeypatch, tmp_path, capsys):
    _isolate(monkeypatch, tmp_path, "online")
    try:
        assert WandbLogger.start({}, "ava", None, None, tmp_path / "run") is None
    finally:
        wandb.teardown()
    err = capsys.readouterr().err
    assert err.startswith("warning: W&B is not logged in") and err.count("\n") == 1
    assert "wandb login" in err and "WANDB_MODE=offline" in err and "training continues" in err


def test_a_wandb_that_cannot_start_warns_with_the_fix_and_returns_none(monkeypatch, isolated_wandb, capsys):
    def no_network(**kwargs):
        raise wandb.errors.CommError("Timed out while retrying: dial tcp: no such host\nConsider increasing")

    monkeypatch.setattr(wandb, "init", no_network)
    assert WandbLogger.start({}, "ava", None, None, isolated_wandb) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CommError: Timed out while retrying" in err
    assert "wandb login" in err and "WANDB_MODE=offline" in err and "training continues" in err


def test_a_disabled_wandb_run_counts_as_not_started(monkeypatch, isolated_wandb, capsys):
    class Disabled:
        disabled = True
        finished = False

        def finish(self) -> None:
            Disabled.finished = True

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Disabled())
    assert WandbLogger.start({}, "ava", None, None, isolated_wandb) is None
    assert Disabled.finished and "WANDB_MODE=offline" in capsys.readouterr().err


def test_a_failing_log_warns_once_and_stops_wandb_logging_without_raising(capsys):
    class Broken:
        calls = 0

        def log(self, metrics: dict, step: int) -> None:
            Broken.calls += 1
            raise OSError("service process died")

    logger = WandbLogger(Broken())
    logger.log(RECORDS[0])
    logger.log(RECORDS[1])
    logger.finish({"status": "completed"})
    assert Broken.calls == 1 and capsys.readouterr().err.count("warning:") == 1


def test_metric_names_put_evaluation_keys_under_eval():
    assert [metric_name(k) for k in ("loss", "eval_loss", "eval_perplexity", "best_eval_loss", "moe/load_cv")] == \
        ["loss", "eval/loss", "eval/perplexity", "eval/best_loss", "moe/load_cv"]


def test_a_run_that_did_not_end_well_is_marked_failed_in_wandb():
    class Run:
        summary: dict = {}
        exit_code = None

        def finish(self, exit_code: int) -> None:
            Run.exit_code = exit_code

    WandbLogger(Run()).finish({"status": "diverged", "steps": 3})
    assert Run.exit_code == 1 and Run.summary == {"status": "diverged", "steps": 3}
