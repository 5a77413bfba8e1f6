"""Which of the carried wheels fit this interpreter, and which of Ava's dependencies none provides.

Standard library only (`packaging` where the interpreter has it, else pip's copy): it runs before anything is installed.
"""

from __future__ import annotations

import configparser
import re
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OPTIONAL = {"wandb"}  # imported only with training.wandb_log
IMPORT_NAMES = {"pyyaml": "yaml"}  # distribution -> module, where they differ


def wheel_tags(filename: str) -> tuple[str, str, set[str]]:
    """(normalised name, version, tags) of a wheel file name: name-version[-build]-py-abi-platform.whl."""
    parts = Path(filename).name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename} is not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    name, version, pys, abis, plats = parts[0], parts[1], parts[-3], parts[-2], parts[-1]
    tags = {f"{p}-{a}-{pl}" for p in pys.split(".") for a in abis.split(".") for pl in plats.split(".")}
    return re.sub(r"[-_.]+", "-", name).lower(), version, tags


def interpreter_tags() -> list[str]:
    """This interpreter's wheel tags, most preferred first (what pip matches against)."""
    try:
        from packaging import tags
    except ImportError:
        from pip._vendor.packaging import tags  # type: ignore[no-redef]
    return [str(t) for t in tags.sys_tags()]


def choose_wheels(files: list[Path], supported: list[str]) -> dict[str, Any]:
    """Which wheels fit this interpreter: per name the best-fitting file, as pip would pick; the rest reported."""
    rank = {tag: i for i, tag in enumerate(supported)}
    best: dict[str, tuple[int, Path, str]] = {}
    unfit, problems = [], []
    for path in sorted(files):
        try:
            name, version, tags = wheel_tags(path.name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if name == "torch":
            problems.append(f"{path.name}: torch comes with the image, not from wheels; remove it")
            continue
        fits = [rank[t] for t in tags if t in rank]
        if not fits:
            unfit.append(path.name)
            continue
        held = best.get(name)
        if held is not None and min(fits) == held[0] and held[2] != version:
            problems.append(f"two versions of {name} fit equally ({held[1].name}, {path.name}): keep one")
        elif held is None or min(fits) < held[0]:
            best[name] = (min(fits), path, version)
    return {"install": [str(best[n][1]) for n in sorted(best)], "versions": {n: best[n][2] for n in sorted(best)},
            "unfit": unfit, "problems": problems}


def required_distributions() -> list[str]:
    """setup.cfg's install_requires names (Ava's own dependencies)."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser.get("options", "install_requires", fallback="").splitlines()
    return [re.split(r"[<>=!~ ;\[]", line.strip(), maxsplit=1)[0].lower() for line in lines if line.strip()]


def installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None

