"""Data pipeline tokens/s against training tokens/s: can the input side keep the model fed?

The data side is Ava's own path (`build_training_data`: read, tokenise, pack,
shard, batch) on a source of the user's choice, measured twice: the one-time
preparation (tokenising and packing a corpus held in memory; streaming does
it on the fly) and steady iteration over the prepared batches. The training
side is one forward + backward + AdamW step of the config's model at the same
batch shape, timed in the same process. The ratio says how many times faster
than training the batches arrive; below 1 the data path is the bottleneck.

    python benchmarks/data_pipeline.py [--config configs/gpu/tiny.yaml] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ava.config import ConfigFiles, WorldSize, load_config  # noqa: E402
from benchmarks.timing import interleaved, print_table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/gpu/tiny.yaml"))
    parser.add_argument("--hardware_config", default=str(REPO / "configs/hardware/cpu.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200, help="batches iterated to time the data side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model_overrides", default="", help="space-separated overrides for the model, e.g. "
                        "'--hidden_size 64 --num_layers 1' (toy sizes for smoke tests)")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args(argv)

    from ava.data.setup import build_training_data
    from ava.model import AvaForCausalLM

    overrides = ["--batch_size", str(ns.batch), "--max_length", str(ns.seq), "--max_steps", str(ns.batches),
                 "--warmup_steps", "1", *ns.model_overrides.split()]
    cfg = load_config(ConfigFiles(ns.config, ns.hardware_config), overrides, WorldSize(1, 1)).config
    started = time.perf_counter()
    data = build_training_data(cfg.data, cfg.model.vocab_size, ns.batch, ns.batch, 0, 1,
                               needed_sequences=ns.batches * ns.batch, max_steps=ns.batches)
    prepare_s = time.perf_counter() - started

    def iterate() -> None:
        seen = 0
        while seen < ns.batches:
            for _ in data.train:
                seen += 1
                if seen == ns.batches:
                    break

    torch.manual_seed(0)
    model = AvaForCausalLM(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = next(iter(data.train))

    def train_step() -> None:
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = interleaved({"data": iterate, "step": train_step}, ns.repeats, warmup=1)
    tokens = ns.batch * ns.seq
    data_tps = ns.batches * tokens / seconds["data"]
    train_tps = tokens / seconds["step"]
    print(f"data pipeline: {Path(ns.config).name}, batch {ns.batch} x {ns.seq} tokens; data: {data.description}")
    print_table(["side", "tokens/s", "note"], [
        ["data: prepare corpus (once)", "-", f"{prepare_s:.2f} s"],
        ["data: iterate batches", data_tps, f"{ns.batches} batches"],
        ["training step", train_tps, "forward + backward + AdamW"],
        ["ratio data / training", data_tps / train_tps, "> 1: the model is never starved"]])
    write_json(ns.json, {"benchmark": "data_pipeline", "config": ns.config, "batch": ns.batch, "seq": ns.seq,
                         "prepare_seconds": prepare_s, "data_tokens_per_s": data_tps,
                         "train_tokens_per_s": train_tps, "ratio": data_tps / train_tps,
                         "data": data.description})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
