"""A trained model and the tokenizer it was trained with, from whichever directory the user points at.

`ava generate` takes a run directory, an Ava model directory, a DeepSpeed
checkpoint directory or a Hugging Face one; `locate` tells them apart and
`load_trained` loads each through the code that wrote or converts it (the
model store, the checkpoint export's consolidation, the Hugging Face import),
so a model samples here exactly as it does wherever else it is loaded.

A run directory's `model/` is preferred to its checkpoints: it is what the run
handed over at its end (the best checkpoint under `save_strategy: best`).
Without one (a run still going, or stopped early) the latest complete
checkpoint is used.

The tokenizer is never guessed: it is the one the model directory records
(`ava.data.model_tokens`: `tokenizer.json` + `special_tokens.json`), else its
run's (`run_tokens`: the run's copy, else rebuilt from its config.yaml), else
the one the caller names. Ids decoded by the wrong tokenizer print as
plausible nonsense, so when none is recorded the error asks for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ava.config.model_file import CONFIG_FILE
from ava.data.model_tokens import ModelTokens, read_model_tokens
from ava.data.tokenizer import TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer
from ava.errors import UserError
from ava.model.transformer import AvaForCausalLM
from ava.train.checkpoint import store as checkpoint_store

BYTES = "bytes"  # the `tokenizer` value that names the built-in byte tokenizer, which has no file

WHAT_IS_READ = ("a run directory written by train.py, an Ava model directory (ava_model.yaml + model.safetensors), "
                "a checkpoints/stepNNNNNNNN directory, or a Hugging Face directory (config.json + safetensors)")


@dataclass(frozen=True)
class Location:
    """What `path` holds: the directory to load, and the run it came from (where its tokenizer is recorded)."""

    kind: Literal["ava", "hf", "checkpoint"]
    path: Path  # the model directory, the Hugging Face directory, or the checkpoint directory itself
    run_dir: Path | None  # the training run it came from, when known

    def describe(self) -> str:
        what = {"ava": "Ava model", "hf": "Hugging Face checkpoint", "checkpoint": "checkpoint"}[self.kind]
        return f"{what} {self.path}"


@dataclass(frozen=True)
class TrainedModel:
    """A model ready to sample from and its tokens: the tokenizer that turns its ids into text, its eos id."""

    model: AvaForCausalLM
    tokens: ModelTokens  # its tokenizer is never None here
    location: Location

    @property
    def tokenizer(self) -> Tokenizer:
        assert self.tokens.tokenizer is not None
        return self.tokens.tokenizer


def locate(path: str | Path) -> Location:
    """Which of the directories Ava reads `path` is; a user error naming each kind when it is none."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist", f"point at {WHAT_IS_READ}")
    if not p.is_dir():
        raise UserError(f"{p} is a file, not a directory", f"point at the directory that holds it: {WHAT_IS_READ}")
    if (p / CONFIG_FILE).is_file():
        run = p.parent if p.name == "model" and (p.parent / "config.yaml").is_file() else None
        return Location("ava", p, run)
    if (p / "model" / CONFIG_FILE).is_file():
        return Location("ava", p / "model", p)
    if (p / "config.json").is_file():
        return Location("hf", p, None)
    if _holds_checkpoints(p):
        from ava.train.checkpoint.export import resolve_checkpoint

        point = resolve_checkpoint(p, "latest")
        return Location("checkpoint", point, point.parent.parent)
    raise UserError(f"{p} holds no model: no {CONFIG_FILE} (an Ava model), model/ or checkpoints/ (a run), "
                    f"{checkpoint_store.COMPLETE} (a checkpoint) or config.json (Hugging Face)",
                    f"point at {WHAT_IS_READ}")


def _holds_checkpoints(p: Path) -> bool:
    """A checkpoint (complete or not), a run's checkpoints/ directory, or a run that has one."""
    return ((p / checkpoint_store.COMPLETE).is_file() or (p / "checkpoints").is_dir()
            or (p / checkpoint_store.LATEST).is_file() or any(p.glob("step*/")) or any(p.glob("*.pt")))


def load_trained(path: str | Path, tokenizer: str | Path | None = None,
                 trust_checkpoint: bool = False) -> TrainedModel:
    """The model at `path` (fp32, on the CPU, in eval mode) and its tokenizer.

    `tokenizer`: a tokenizer.json (or its directory), or `BYTES`; None uses the
    one saved with the model. `trust_checkpoint` lets a DeepSpeed checkpoint
    whose pickles reference more than tensors load (`ava.train.checkpoint.trust`).
    The tokenizer is found before the weights are read, so a missing one is
    reported at once.
    """
    location = locate(path)
    tokens = find_tokens(location, tokenizer)
    trained = TrainedModel(_load_model(location, trust_checkpoint).eval(), tokens, location)
    size, vocab = trained.tokenizer.vocab_size, trained.model.config.vocab_size
    if size > vocab:
        raise UserError(f"the tokenizer ({tokens.source}) has {size} tokens but {location.describe()} has "
                        f"model.vocab_size = {vocab}: it is not the tokenizer this model was trained with",
                        "pass --tokenizer with the tokenizer.json the model was trained with")
    return trained


def find_tokens(location: Location, chosen: str | Path | None) -> ModelTokens:
    """The tokenizer the caller chose, else the one saved with the model (`ava.data.model_tokens`); never a guess."""
    if chosen is not None:
        if str(chosen) == BYTES:
            return ModelTokens.of(ByteTokenizer())
        file = Path(chosen) / TOKENIZER_FILE if Path(chosen).is_dir() else Path(chosen)
        if not file.is_file():
            raise UserError(f"--tokenizer {chosen}: {file} does not exist",
                            f"pass a {TOKENIZER_FILE} file or the directory holding one, or --tokenizer {BYTES} "
                            "for the built-in byte tokenizer")
        return ModelTokens.of(load_tokenizer(file))
    saved = _saved_tokens(location)
    if saved is not None and saved.tokenizer is not None:
        return saved
    why = f" ({saved.source})" if saved is not None else f" (no {TOKENIZER_FILE} beside it)"
    raise UserError(f"no tokenizer is saved with {location.describe()}{why}; Ava does not guess one, since ids "
                    "decoded by the wrong tokenizer print as plausible nonsense",
                    f"pass --tokenizer PATH (the {TOKENIZER_FILE} the model was trained with, or its directory), "
                    f"or --tokenizer {BYTES} for a model trained on the built-in byte tokenizer")


def _saved_tokens(location: Location) -> ModelTokens | None:
    """What the directory (or, failing it, its run) recorded about its tokens; None when nothing did."""
    if location.kind == "hf":
        from ava.hf.tokenizer import read_hf_tokens

        return read_hf_tokens(location.path)
    found = read_model_tokens(location.path) if location.kind == "ava" else None
    if found is None and location.run_dir is not None:
        from ava.train.checkpoint.export import run_tokens

        found = run_tokens(location.run_dir)  # the run's own copy, else rebuilt from its config.yaml's data:
    return found


def _load_model(location: Location, trust_checkpoint: bool) -> AvaForCausalLM:
    if location.kind == "ava":
        from ava.model.store import load_model_dir

        return load_model_dir(location.path)
    if location.kind == "hf":
        from ava.hf import import_hf

        return import_hf(location.path)
    return _checkpoint_model(location.path, trust_checkpoint)


def _checkpoint_model(point: Path, trusted: bool) -> AvaForCausalLM:
    """The model held by checkpoint `point`, built as `export_checkpoint` builds it (LoRA adapters merged)."""
    from ava.train.checkpoint.export import checkpoint_model, run_frozen_base, run_lora_scaling, run_model_config
    from ava.train.checkpoint.trust import check_checkpoint

    run_dir = point.parent.parent
    config = run_model_config(run_dir)
    check_checkpoint(point, trusted=trusted)
    scaling = run_lora_scaling(run_dir)
    return checkpoint_model(point, config, scaling, run_frozen_base(run_dir) if scaling is not None else None)[0]
