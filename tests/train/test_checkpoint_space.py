"""A failed checkpoint write is recognised as a full disk however torch reports it, and only then."""

from __future__ import annotations

import errno
from pathlib import Path

import ava.train.checkpoint.store as checkpoint


def _chained(inner: BaseException) -> RuntimeError:
    """What torch's zip writer raises on a full disk: a RuntimeError with the OSError somewhere in its context."""
    try:
        try:
            raise inner
        except BaseException:  # the implicit context, as torch produces it
            raise RuntimeError(  # noqa: B904
                "[enforce fail at inline_container.cc:672] . unexpected pos 2385024 vs 2384912")
    except RuntimeError as outer:
        return outer


def test_enospc_in_the_exception_chain_is_a_full_disk(tmp_path: Path) -> None:
    exc = _chained(OSError(errno.ENOSPC, "No space left on device"))
    assert checkpoint._out_of_space(exc, tmp_path) == "No space left on device"


def test_a_quota_found_by_a_probe_write_is_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    def refused(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(checkpoint, "open", refused, raising=False)
    assert checkpoint._out_of_space(RuntimeError("basic_ios::clear: iostream error"), tmp_path) == "Disk quota exceeded"


def test_other_failures_on_a_disk_with_room_are_not_blamed_on_space(tmp_path: Path) -> None:
    assert checkpoint._out_of_space(RuntimeError("some other failure"), tmp_path) is None
    assert not list(tmp_path.iterdir()), "the probe file is removed"
