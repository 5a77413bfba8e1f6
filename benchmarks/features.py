"""The enhanced model features, each on and off: loss after equal steps, and tokens/s.

    python benchmarks/features.py [--config configs/gpu/tiny.yaml] [--hardware_config configs/hardware/cpu.yaml]
        [--steps 100] [--only moh,moa] [--json out.json] [--KEY VALUE ...]

Each variant is the real `train.py` run, as a subprocess, on the built-in
corpus with the same seed, data, schedule and number of steps; only the
feature switches differ. Reported from each run's summary.json: the final
training loss, the held-out loss at the end, tokens/s over the whole run
(retrieval's host-side lookups included), and the total parameters.

`cross_attention+rag` is one variant: in a training run the cross-attention
blocks read the retrieved neighbours, and without retrieval they would read
nothing. The first run with retrieval builds its datastore; the time that
takes is part of its wall clock but not of tokens/s (measured from the first
step). Extra `--KEY VALUE` arguments are config overrides for every variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import print_table, write_json  # noqa: E402

MOH = ["--model.use_moh", "true", "--model.moh.num_shared_heads", "1", "--model.moh.active_routed_heads", "2"]
MOA = ["--model.use_moa", "true"]
RAG = ["--model.use_cross_attention", "true", "--model.use_rag", "true"]
MEMORY = ["--model.use_episodic_memory", "true"]
VARIANTS: dict[str, list[str]] = {
    "off": [],
    "moh": MOH,
    "moa": MOA,
    "cross_attention+rag": RAG,
    "episodic_memory": MEMORY,
    "all five": [*MOH, *MOA, "--model.moa.every_n_layers", "2", *RAG, *MEMORY],
}


def run_variant(name: str, ns: argparse.Namespace, extra: list[str], workdir: Path) -> dict:
    out = workdir / name.replace(" ", "_").replace("+", "_")
    command = [sys.executable, str(REPO / "train.py"), "--config", ns.config, "--hardware_config", ns.hardware_config,
               "--max_steps", str(ns.steps), "--training.warmup_steps", str(max(1, ns.steps // 10)),
               "--training.eval_steps", str(ns.steps), "--training.save_strategy", "no", "--data.cache_dir",
               str(workdir / "cache"), "--output_dir", str(out), *VARIANTS[name], *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    summary_path = out / "summary.json"
    if done.returncode != 0 or not summary_path.is_file():
        raise SystemExit(f"{name}: train.py failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    s = json.loads(summary_path.read_text())
    return {"variant": name, "final_loss": s["final_loss"], "eval_loss": s["eval_loss"],
            "tokens_per_s": s["tokens_per_s"], "parameters": s["parameters"]["total"], "seconds": s["seconds"],
            "overrides": VARIANTS[name]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpu/tiny.yaml")
    parser.add_argument("--hardware_config", default="configs/hardware/cpu.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--only", default="", help="comma-separated variants (off is always run): "
                        + ", ".join(VARIANTS))
    parser.add_argument("--json", default=None)
    ns, extra = parser.parse_known_args()
    chosen = ["off", *[v for v in VARIANTS if v != "off" and (not ns.only or v in ns.only.split(","))]]
    with tempfile.TemporaryDirectory(prefix="ava-features-") as tmp:
        rows = [run_variant(name, ns, extra, Path(tmp)) for name in chosen]
    base = rows[0]
    for r in rows:
        r["eval_loss_vs_off"] = r["eval_loss"] - base["eval_loss"]
        r["speed_vs_off"] = r["tokens_per_s"] / base["tokens_per_s"]
    print(f"\n{ns.steps} steps each, {ns.config} + {ns.hardware_config}, built-in corpus")
    print_table(["variant", "parameters", "final train loss", "held-out loss", "vs off", "tokens/s", "speed vs off"],
                [[r["variant"], f"{r['parameters']:,}", f"{r['final_loss']:.3f}", f"{r['eval_loss']:.3f}",
                  f"{r['eval_loss_vs_off']:+.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['speed_vs_off']:.2f}x"]
                 for r in rows])
    write_json(ns.json, {"steps": ns.steps, "config": ns.config, "hardware_config": ns.hardware_config,
                         "results": rows})


if __name__ == "__main__":
    main()
