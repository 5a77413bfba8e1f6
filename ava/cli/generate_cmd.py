"""`ava generate PATH`: text from a trained model (a run, an Ava model, a checkpoint or a Hugging Face directory).

Parse, load (`ava.train.trained_model`), generate (`ava.train.text_generation`),
print. Like nanoGPT's sample.py and the Hugging Face text-generation pipeline,
each sample is printed as the prompt followed by its continuation;
`--continuation_only` prints just the new text. With several samples each is
preceded by a `--- sample i of n ---` line. What was loaded is said on stderr,
so stdout holds only the text.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ava.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ava generate", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue a prompt with a trained model and print the text (the prompt, then its continuation).",
        epilog="examples:\n"
               "  ava generate outputs/my-run --prompt 'def main(' --max_new_tokens 100\n"
               "  echo 'Once upon a time' | ava generate models/mine --temperature 0.7 --top_p 0.9 --num_samples 3\n"
               "  ava generate RUN --prompt TEXT --temperature 0 --ignore_eos   # the end-of-run sample's settings")
    p.add_argument("path", help="a run directory (its model/, else its latest complete checkpoint), an Ava model "
                   "directory, a checkpoints/stepNNNNNNNN directory, or a Hugging Face directory")
    p.add_argument("--prompt", help="the text to continue (default: read from stdin, less one trailing newline)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy decoding (default 0.8)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top_p", type=float, default=None,
                   help="sample among the fewest most likely tokens whose probabilities reach p (nucleus)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, for the same samples on a rerun "
                   "(default: different every time)")
    p.add_argument("--num_samples", type=int, default=1, help="samples to draw from the prompt (default 1)")
    p.add_argument("--ignore_eos", action="store_true",
                   help="keep generating past the end-of-document token, as the end-of-run sample does")
    p.add_argument("--continuation_only", action="store_true", help="print only the generated text, not the prompt")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (or its directory), or `bytes` for the "
                   "built-in byte tokenizer (default: the tokenizer.json saved with the model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype while generating")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load a checkpoint whose pickles reference objects beyond tensors and DeepSpeed's optimizer "
                   "state (they could run code); only for checkpoints you trust")
    return p


def main(argv: Sequence[str]) -> int:
    ns = parser().parse_args(argv)
    from ava.train.text_generation import Sampling, generate_text

    sampling = Sampling(ns.max_new_tokens, ns.temperature, ns.top_k, ns.top_p, ns.num_samples, ns.seed,
                        stop_at_eos=not ns.ignore_eos)
    sampling.check()  # before the model loads: a bad option costs nothing
    prompt = _prompt(ns.prompt)
    device = _device(ns.device)
    import torch

    from ava.train.trained_model import load_trained

    trained = load_trained(ns.path, ns.tokenizer, trust_checkpoint=ns.trust_checkpoint)
    model = trained.model.to(device=device, dtype=getattr(torch, ns.dtype))
    print(f"ava generate: {trained.location.describe()}; {trained.tokens.describe()}; {device}, {ns.dtype}",
          file=sys.stderr)
    samples = generate_text(model, trained.tokenizer, prompt, sampling, trained.tokens.eos_id)
    for i, sample in enumerate(samples, 1):
        if len(samples) > 1:
            sys.stdout.write(f"--- sample {i} of {len(samples)} ---\n")
        sys.stdout.write(("" if ns.continuation_only else prompt) + sample.continuation + "\n")
    sys.stdout.flush()
    return 0


def _prompt(given: str | None) -> str:
    """--prompt, else stdin when it is not a terminal (one trailing newline dropped: `echo` adds it)."""
    if given is not None:
        return given
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("no prompt: --prompt is not given and stdin is a terminal",
                        "pass --prompt TEXT, or pipe the text in (echo 'text' | ava generate PATH)")
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


def _device(name: str) -> str:
    """The torch device `--device` names; "auto" is cuda when one is visible."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name} is not a device ({exc})", "pass cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device torch can use", "pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices",
                        f"pass --device cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported", "pass --device cpu or cuda")
    return str(device)
