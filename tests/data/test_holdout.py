"""The held-out set of streamed sources: the heads of the sources, in proportion, and never trained on."""

from __future__ import annotations

import pytest

from ava.data.holdout import hold_out_heads
from ava.data.tokenizer import ByteTokenizer
from ava.errors import UserError

KEYS = ["data.sources[0]", "data.sources[1]"]


def _docs(tag: str, count: int) -> list[str]:
    return [f"{tag}{i:03d}" + "-" * 11 for i in range(count)]  # 15 bytes + eos = 16 tokens each


def test_each_source_gives_its_share_of_rows_from_its_first_documents() -> None:
    a, b = _docs("a", 100), _docs("b", 100)
    held = hold_out_heads([a, b], [0.75, 0.25], KEYS, ByteTokenizer(), max_length=32, sequences=8)
    assert held.rows.shape == (8, 32)
    assert held.counts == [12, 4]  # 6 rows x 32 tokens = 12 documents of a, 2 rows = 4 of b
    text = ByteTokenizer().decode(held.rows.reshape(-1).tolist())
    assert "a000" in text and "a011" in text and "a012" not in text and "b003" in text and "b004" not in text
    # training keeps exactly the documents not held out, wherever they appear
    assert held.keeps([a[11], a[12], b[3], b[4], None]) == [False, True, False, True, True]


def test_no_held_out_sequences_takes_no_documents() -> None:
    held = hold_out_heads([_docs("a", 5)], [1.0], KEYS[:1], ByteTokenizer(), max_length=32, sequences=0)
    assert held.rows.shape == (0, 32) and held.counts == [0] and all(held.keeps(_docs("a", 5)))


def test_a_source_used_up_by_its_share_is_refused() -> None:
    with pytest.raises(UserError, match=r"data.sources\[1\] is used up by its share of the held-out set") as err:
        hold_out_heads([_docs("a", 100), _docs("b", 4)], [0.5, 0.5], KEYS, ByteTokenizer(), max_length=32,
                       sequences=4)
    assert "data.max_eval_examples" in err.value.fix
