"""Find and mask secrets in anything Ava writes or prints.

A run's outputs (config.yaml, summary.json, the W&B config, error messages)
echo values the user typed. If a user pastes an API key into a config value,
or a key sits in the environment while an exception message quotes it, that
key would land in files that are shared, committed or uploaded. Every such
output goes through `redact` / `redact_text` with the values from
`secret_values()`.

Secrets are recognised by where they come from (an environment variable or a
dict key whose *name* looks secret, the W&B entry of ~/.netrc), never by what
the value looks like: a "40 hex characters" rule would also mask the git
commit hashes recorded in versions.json, which a run must keep to be
reproducible.
"""

from __future__ import annotations

import netrc
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MASK = "***REDACTED***"
MIN_LENGTH = 8  # shorter values (a port, "true", a rank) would mask ordinary text everywhere
WANDB_HOST = "api.wandb.ai"  # `wandb login` stores the key as this machine's password in ~/.netrc

KNOWN_SECRET_NAMES = frozenset({"WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
_ALWAYS_SECRET_PARTS = frozenset({"APIKEY", "SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD",
                                  "CREDENTIAL", "CREDENTIALS"})
# A name ending in TOKEN is a secret (HF_TOKEN, access_token) unless TOKEN is the tokenizer's kind of
# token: pad_token holds "<pad>", num_experts_per_token a count.
_NOT_A_SECRET_TOKEN = frozenset({"PER", "BOS", "EOS", "PAD", "UNK", "SEP", "CLS", "MASK", "SPECIAL",
                                 "START", "END", "STOP"})
_KEY_OWNERS = frozenset({"API", "PRIVATE"})  # KEY alone is too common (num_key_value_heads, sort_key)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def name_parts(name: str) -> list[str]:
    """Upper-case words of a name: `wandb_api_key`, `WANDB-API-KEY` and `wandbApiKey` give WANDB, API, KEY."""
    return [p for p in re.split(r"[_\-.\s]+", _CAMEL.sub("_", name).upper()) if p]


def is_secret_name(name: str) -> bool:
    """True when a variable or key named `name` holds a secret by its name.

    Whole words are compared, so TOKENIZERS_PARALLELISM and AVA_MAX_TOKENS are
    not secrets while HF_TOKEN and wandb_api_key are.
    """
    if name.upper() in KNOWN_SECRET_NAMES:
        return True
    parts = name_parts(name)
    if any(p in _ALWAYS_SECRET_PARTS for p in parts):
        return True
    for before, part in zip([""] + parts, parts, strict=False):
        if part == "KEY" and before in _KEY_OWNERS:
            return True
    if parts and parts[-1] == "TOKEN":
        return len(parts) == 1 or parts[-2] not in _NOT_A_SECRET_TOKEN
    return False


def secret_values(env: Mapping[str, str] | None = None, netrc_path: Path | None = None) -> list[str]:
    """Every secret value this process can see, longest first (so a secret containing another is masked whole).

    `env` defaults to os.environ; `netrc_path` to $NETRC or ~/.netrc, where
    `wandb login` keeps the W&B key. A missing, unreadable or malformed netrc
    file only means there is no key to find there.
    """
    env = os.environ if env is None else env
    found = {value for name, value in env.items() if is_secret_name(name) and len(value) >= MIN_LENGTH}
    if netrc_path is None:
        netrc_path = Path(env.get("NETRC") or Path.home() / ".netrc")
    hosts = {WANDB_HOST}
    base_url = env.get("WANDB_BASE_URL")
    if base_url:  # a self-hosted W&B server: `wandb login --host` stores its key under that machine
        hosts.add(urlparse(base_url).hostname or "")
    for password in _netrc_passwords(netrc_path, hosts):
        if len(password) >= MIN_LENGTH:
            found.add(password)
    return sorted(found, key=lambda s: (-len(s), s))


def _netrc_passwords(path: Path, hosts: set[str]) -> list[str]:
    # An explicit file skips netrc's permission check: reading a world-readable file to mask
    # its password is still right, and its complaint is not this function's to make.
    try:
        parsed = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError, UnicodeDecodeError):
        return []
    out = []
    for host in hosts:
        entry = parsed.authenticators(host) if host else None
        if entry is not None and entry[2]:
            out.append(entry[2])
    return out


def redact_text(text: str, secrets: Sequence[str]) -> str:
    """`text` with every occurrence of every secret replaced by MASK."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def redact(obj: Any, secrets: Sequence[str]) -> Any:
    """A copy of `obj` (dicts, lists, tuples, strings, nested) with secrets masked; other values unchanged.

    In a dict, a non-empty string under a secret-looking key (`api_key`,
    `token`, `password`...) is masked whatever its value: a key typed into a
    config is a secret even when it is in no environment variable.
    """
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, dict):
        return {redact(k, secrets): MASK if isinstance(k, str) and is_secret_name(k) and isinstance(v, str) and v
                else redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v, secrets) for v in obj)
    return obj
