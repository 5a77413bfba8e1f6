"""Where a run's initial weights, and the tokenizer that goes with them, come from once the config is resolved.

`load_config` already gave the model: section the checkpoint's architecture
(`ava.config.init_from`). Here the run finds the weights, and a resumed run
whose `init_from` directory has since moved or gone is rebuilt from the
architecture its own `config.yaml` recorded: its checkpoint holds the
weights, so the pretrained directory is not needed any more.

The tokenizer comes along too. A pretrained model reads the ids of the
tokenizer it was trained with, so when `data.tokenizer_name` is left unset
(its default, not an explicit null) and the `init_from` directory holds a
`tokenizer.json` other than the byte tokenizer's (an Ava model directory, a
run's `model/`, or a Hugging Face checkpoint), the run uses that file: the
config.yaml records it as derived from init_from, and the run's `model/`
leaves with it. That holds for token files too (`data_dir`), whose ids the
tokenizer made; only the Markov corpus, whose ids stand for no text, keeps
none. An explicit `tokenizer_name` (null included) always wins.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ava.config.loader import ResolvedConfig
from ava.config.pretrained import Pretrained, locate
from ava.config.provenance import Layer, Origin
from ava.data.model_tokens import read_model_tokens
from ava.data.tokenizer import FileTokenizer


def pretrained_for_run(resolved: ResolvedConfig, resume_dir: Path | None) -> tuple[ResolvedConfig, Pretrained | None]:
    """(the config to train, the checkpoint to start from or None); a missing directory is an error unless resuming."""
    init = resolved.config.training.init_from
    if init is None:
        return resolved, None
    if Path(init).exists() or resume_dir is None:
        source = locate(init)  # a missing directory raises the user error here
        return adopt_tokenizer(resolved, [source]), source
    from ava.train.checkpoint.export import RUN_TOKENIZER_DIR, run_model_config

    model = run_model_config(resume_dir)
    data = resolved.to_dict()
    data["model"] = model.model_dump(mode="json")
    config = resolved.config.model_copy(update={"model": model})
    # The pretrained directory is gone: the run's own copy of the tokenizer it adopted stands in for it.
    kept = Pretrained(resume_dir / RUN_TOKENIZER_DIR, "ava", model)
    return adopt_tokenizer(dataclasses.replace(resolved, config=config, _data=data), [kept]), None


def adopt_tokenizer(resolved: ResolvedConfig, sources: list[Pretrained]) -> ResolvedConfig:
    """`resolved` with `data.tokenizer_name` set to the first source's tokenizer.json, when the rules above allow."""
    data = resolved.config.data
    # A null written in a file or on the command line resets to the default, so only the history tells it apart.
    if data.tokenizer_name is not None or resolved.history.get(("data", "tokenizer_name")):
        return resolved
    if data.data_dir is None and not data.sources and data.builtin_dataset == "markov":
        return resolved
    for source in sources:
        tokenizer = _pretrained_tokenizer(source)
        if tokenizer is None:
            continue
        path = str(tokenizer.path)
        values = resolved.to_dict()
        values["data"]["tokenizer_name"] = path
        config = resolved.config.model_copy(update={"data": data.model_copy(update={"tokenizer_name": path})})
        origins = {**resolved.origins, ("data", "tokenizer_name"): Origin(
            Layer.DERIVED, detail=f"the tokenizer of training.init_from {source.path}")}
        return dataclasses.replace(resolved, config=config, origins=origins, _data=values)
    return resolved


def _pretrained_tokenizer(source: Pretrained) -> FileTokenizer | None:
    """The directory's tokenizer.json when it is a real one; None for none, or for the byte tokenizer's file."""
    if source.kind == "hf":
        from ava.hf.tokenizer import read_hf_tokens

        tokens = read_hf_tokens(source.path)
    else:
        tokens = read_model_tokens(source.path)
    found = tokens.tokenizer if tokens is not None else None
    return found if isinstance(found, FileTokenizer) else None
