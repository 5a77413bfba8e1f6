"""RLHF data: jsonl reading, demonstrations with noise, packed SFT rows, padded sequences and rank batches."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ava.config.schema.model import ModelConfig
from ava.data.tokenizer import ByteTokenizer
from ava.errors import UserError
from ava.model import AvaForCausalLM
from ava.model.transformer import IGNORE_INDEX
from ava.rlhf.data import (
    Prompt,
    PromptSource,
    encode,
    rank_batches,
    read_jsonl,
    sequence_batch,
    sft_data,
    sft_rows,
    split_holdout,
)
from ava.rlhf.tasks import make_task, sft_examples

IGN = IGNORE_INDEX
PAD = 0
TOK = ByteTokenizer()
SETTING = "rlhf.sft_data"

# Three examples (ids, prompt length) with distinct token values; 9 plays the eos.
A = ([11, 12, 13, 14, 15, 9], 3)  # prompt 11 12 13, response 14 15 + eos
B = ([21, 22, 23, 9], 2)
C = ([31, 32, 33, 34, 35, 36, 9], 4)
TOO_LONG = (list(range(40, 53)), 5)  # 13 tokens


# --- sft_rows ---------------------------------------------------------------------------------------------------


def test_packing_puts_several_examples_in_a_row_and_labels_only_their_responses():
    rows = sft_rows([A, B, TOO_LONG, C], max_length=12, pad_id=PAD, packing=True)
    assert rows.dropped == 1
    assert rows.input_ids.tolist() == [
        [11, 12, 13, 14, 15, 9, 21, 22, 23, 9, PAD, PAD],  # A + B fit in 12
        [31, 32, 33, 34, 35, 36, 9, PAD, PAD, PAD, PAD, PAD],  # C would overflow the first row
    ]
    assert rows.labels.tolist() == [
        [IGN, IGN, IGN, 14, 15, 9, IGN, IGN, 23, 9, IGN, IGN],
        [IGN, IGN, IGN, IGN, 35, 36, 9, IGN, IGN, IGN, IGN, IGN],
    ]
    assert rows.segment_ids.tolist() == [
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2],  # padding is a document of its own
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    ]


def test_packing_labels_every_response_token_and_eos_and_nothing_else():
    examples = [encode(TOK, e.prompt, e.answer) for e in sft_examples(make_task("reverse", 5), 40, seed=3)]
    rows = sft_rows(examples, max_length=40, pad_id=PAD, packing=True)
    assert rows.dropped == 0
    assert rows.input_ids.shape[0] == len(examples) // 2  # 14-token examples: two per 40-token row
    labelled = rows.labels[rows.labels != IGN].tolist()
    assert labelled == [t for ids, n in examples for t in ids[n:]]  # each response + eos, in order
    assert (rows.labels[rows.labels != IGN] == rows.input_ids[rows.labels != IGN]).all()
    assert (rows.labels == IGN).sum().item() == rows.labels.numel() - sum(len(ids) - n for ids, n in examples)


def test_examples_longer_than_a_row_are_counted_as_dropped_not_truncated():
    rows = sft_rows([TOO_LONG, A, TOO_LONG], max_length=12, pad_id=PAD, packing=False)
    assert rows.dropped == 2
    assert rows.input_ids.tolist() == [A[0]]
    exact = sft_rows([TOO_LONG], max_length=13, pad_id=PAD, packing=True)  # a row may be filled exactly
    assert exact.dropped == 0 and exact.input_ids.tolist() == [TOO_LONG[0]]


def test_without_packing_each_example_has_a_row_padded_to_the_longest():
    rows = sft_rows([A, B, C], max_length=12, pad_id=PAD, packing=False)
    assert rows.dropped == 0
    assert rows.input_ids.tolist() == [
        [11, 12, 13, 14, 15, 9, PAD],
        [21, 22, 23, 9, PAD, PAD, PAD],
        [31, 32, 33, 34, 35, 36, 9],
    ]
    assert rows.labels.tolist() == [
        [IGN, IGN, IGN, 14, 15, 9, IGN],
        [IGN, IGN, 23, 9, IGN, IGN, IGN],
        [IGN, IGN, IGN, IGN, 35, 36, 9],
    ]
    assert rows.segment_ids.tolist() == [[0] * 6 + [1], [0] * 4 + [1] * 3, [0] * 7]


def _model(experts: int) -> AvaForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=48,
                         vocab_size=TOK.vocab_size, max_position_embeddings=48, num_experts=experts,
                         num_experts_per_token=2, expert_capacity_factor=0)
    return AvaForCausalLM(config).eval()


def _summed_response_loss(model: AvaForCausalLM, ids: list[int], n_prompt: int) -> tuple[float, int]:
    """One example alone, unpadded: summed cross-entropy of its response tokens and their count."""
    logits = model(torch.tensor([ids])).logits[0]
    targets = torch.tensor(ids[n_prompt:])
    losses = F.cross_entropy(logits[n_prompt - 1:-1].float(), targets, reduction="sum")
    return losses.item(), len(targets)


@pytest.mark.parametrize("experts", [0, 4], ids=["dense", "moe_dropless"])
def test_packed_loss_equals_the_loss_of_the_same_examples_one_by_one(experts):
    model = _model(experts)
    task = make_task("sort", 6)
    rng = random.Random(5)
    # Different response lengths, so rows hold a mix and the token weighting matters.
    examples = [encode(TOK, e.prompt, e.answer[: rng.randint(1, 6)]) for e in sft_examples(task, 12, seed=1)]
    packed = sft_rows(examples, max_length=48, pad_id=PAD, packing=True)
    assert packed.dropped == 0 and packed.input_ids.shape[0] < len(examples)
    with torch.no_grad():
        out = model(packed.input_ids, labels=packed.labels, segment_ids=packed.segment_ids)
        alone = [_summed_response_loss(model, ids, n) for ids, n in examples]
        leaky = model(packed.input_ids, labels=packed.labels).lm_loss  # no segments: examples see each other
        unpacked = sft_rows(examples, max_length=48, pad_id=PAD, packing=False)
        padded = model(unpacked.input_ids, labels=unpacked.labels, segment_ids=unpacked.segment_ids).lm_loss
    total, count = sum(s for s, _ in alone), sum(n for _, n in alone)
    assert (packed.labels[:, 1:] != IGN).sum().item() == count  # every response token is a target, once
    assert out.lm_loss.item() == pytest.approx(total / count, abs=1e-5)
    assert padded.item() == pytest.approx(total / count, abs=1e-5)
    assert abs(leaky.item() - total / count) > 1e-3  # the comparison can tell a leak apart


# --- sequence_batch ---------------------------------------------------------------------------------------------


def test_sequence_batch_pads_right_and_masks_the_positions_that_predict_responses():
    encoded = [encode(TOK, "ab=", "xyz"), encode(TOK, "c=", "q"), encode(TOK, "abcd=", "uv")]
    batch = sequence_batch(encoded, pad_id=PAD)
    width = max(len(ids) for ids, _ in encoded)
    assert batch.input_ids.shape == (3, width)
    assert batch.response_mask.shape == (3, width - 1)
    for i, (ids, n_prompt) in enumerate(encoded):
        assert batch.input_ids[i].tolist() == ids + [PAD] * (width - len(ids))
        expected = [n_prompt <= t + 1 <= len(ids) - 1 for t in range(width - 1)]
        assert batch.response_mask[i].tolist() == expected
        assert batch.last_index[i].item() == len(ids) - 1
        assert batch.input_ids[i, batch.last_index[i]].item() == TOK.eos_id
    # "c=" + "q" + eos: position 1 ("=") predicts "q", position 2 ("q") predicts the eos.
    assert batch.response_mask[1].tolist() == [False, True, True] + [False] * (width - 4)


# --- read_jsonl -------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return path


def test_a_line_missing_a_field_is_reported_with_file_line_field_and_setting(tmp_path):
    path = _write(tmp_path, '{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(UserError) as err:
        read_jsonl(path, ("prompt", "response"), SETTING)
    text = str(err.value)
    assert SETTING in text and str(path) in text and "line 3" in text and "response" in text
    assert "prompt" not in text.split("line 3", 1)[1].split("\n")[0]  # only the missing field is named


def test_a_non_string_field_counts_as_missing(tmp_path):
    path = _write(tmp_path, '{"prompt": "a", "response": 7}\n')
    with pytest.raises(UserError, match=r"line 1 has no text field\(s\) response"):
        read_jsonl(path, ("prompt", "response"), SETTING)


def test_invalid_json_is_reported_with_its_line_number(tmp_path):
    path = _write(tmp_path, '{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')
    with pytest.raises(UserError) as err:
        read_jsonl(path, ("prompt", "response"), SETTING)
    text = str(err.value)
    assert SETTING in text and str(path) in text and "line 2" in text and "not valid JSON" in text


def test_an_optional_field_that_is_not_text_is_an_error(tmp_path):
    path = _write(tmp_path, '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2}\n')
    with pytest.raises(UserError, match="line 2: answer must be text"):
        read_jsonl(path, ("prompt",), "rlhf.prompt_data", optional=("answer",))


def test_blank_lines_are_skipped_and_line_numbers_still_count_them(tmp_path):
    path = _write(tmp_path, '\n{"prompt": "a", "response": "b"}\n   \n{"prompt": "c", "response": "d"}\n\n')
    rows = read_jsonl(path, ("prompt", "response"), SETTING)
    assert rows == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    bad = _write(tmp_path, '\n\n\n{"prompt": "a"}\n')
    with pytest.raises(UserError, match="line 4 "):
        read_jsonl(bad, ("prompt", "response"), SETTING)


@pytest.mark.parametrize("text", ["", "\n  \n\n"], ids=["empty", "only_blank_lines"])
def test_a_file_without_examples_is_an_error(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=f"{SETTING}: .* holds no examples"):
        read_jsonl(path, ("prompt", "response"), SETTING)


def test_a_missing_file_names_the_setting(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as err:
        read_jsonl(path, ("prompt", "response"), SETTING)
    assert f"{SETTING}: {path} does not exist" in str(err.value)
    assert SETTING in err.value.fix


# --- sft_data and split_holdout ---------------------------------------------------------------------------------


def test_error_rate_corrupts_about_that_share_of_training_demonstrations_only():
    task, num, holdout, rate = make_task("copy", 6), 2000, 300, 0.25
    train, held = sft_data(None, task, num, holdout, seed=11, setting=SETTING, error_rate=rate)
    truth = sft_examples(task, num + holdout, 11)
    assert [p for p, _ in train + held] == [e.prompt for e in truth]
    wrong = sum(task.score(e.prompt, e.answer, r) < 1 for (_, r), e in zip(train, truth, strict=False))
    # Binomial(2000, 0.25): std = sqrt(2000 * 0.25 * 0.75) ~ 19.4; 5 std (~97) makes a false failure ~1e-6.
    std = math.sqrt(num * rate * (1 - rate))
    assert abs(wrong - num * rate) < 5 * std
    assert all(r == e.answer for (_, r), e in zip(held, truth[num:], strict=True))  # held out: always correct


def test_sft_data_is_the_same_for_the_same_seed_and_clean_without_error_rate():
    task = make_task("reverse", 6)
    first = sft_data(None, task, 200, 20, seed=4, setting=SETTING, error_rate=0.3)
    assert first == sft_data(None, task, 200, 20, seed=4, setting=SETTING, error_rate=0.3)
    assert first != sft_data(None, task, 200, 20, seed=5, setting=SETTING, error_rate=0.3)
    clean, _ = sft_data(None, task, 200, 20, seed=4, setting=SETTING)
    assert all(task.score(p, task.transform(p[2:-1]), r) == 1.0 for p, r in clean)


def test_sft_data_without_file_or_task_names_the_setting():
    with pytest.raises(UserError, match=f"{SETTING} is not set"):
        sft_data(None, None, 10, 0, seed=0, setting=SETTING)


def test_split_holdout_keeps_the_last_items_for_evaluation_and_refuses_to_leave_none_for_training():
    assert split_holdout([1, 2, 3, 4], 1, SETTING) == ([1, 2, 3], [4])
    assert split_holdout([1, 2, 3, 4], 3, SETTING) == ([1], [2, 3, 4])
    assert split_holdout([1, 2, 3, 4], 0, SETTING) == ([1, 2, 3, 4], [])
    for holdout in (4, 5):
        with pytest.raises(UserError, match=f"{SETTING}: 4 examples cannot spare {holdout}"):
            split_holdout([1, 2, 3, 4], holdout, SETTING)


# --- rank_batches -----------------------------------------------------------------------------------------------


def _steps(n_rows: int, batch: int, world: int, seed: int, steps: int) -> list[list[list[int]]]:
    """`steps` steps, each the list of every rank's micro batch."""
    ranks = [rank_batches(n_rows, batch, r, world, seed) for r in range(world)]
    return [[next(it) for it in ranks] for _ in range(steps)]


def test_two_ranks_take_disjoint_rows_in_each_step():
    for step in _steps(n_rows=11, batch=3, world=2, seed=7, steps=10):
        first, second = step
        assert len(first) == len(second) == 3
        assert len(set(first) | set(second)) == 6  # disjoint, and no row twice within a rank
        assert set(first + second) <= set(range(11))


def test_an_epoch_uses_each_row_at_most_once_and_the_next_epoch_reshuffles():
    n_rows, batch, world = 11, 2, 2
    per_epoch = n_rows // (batch * world)  # 2 steps; 3 rows left over are skipped this epoch
    steps = _steps(n_rows, batch, world, seed=1, steps=3 * per_epoch)
    epochs = [[row for step in steps[e * per_epoch:(e + 1) * per_epoch] for b in step for row in b]
              for e in range(3)]
    for rows in epochs:
        assert len(rows) == len(set(rows)) == per_epoch * batch * world
    assert len({tuple(rows) for rows in epochs}) == 3


def test_rank_batches_are_fixed_by_the_seed():
    assert _steps(20, 2, 2, seed=3, steps=12) == _steps(20, 2, 2, seed=3, steps=12)
    assert _steps(20, 2, 2, seed=3, steps=12) != _steps(20, 2, 2, seed=4, steps=12)


def test_fewer_rows_than_one_step_is_an_error():
    with pytest.raises(UserError, match="3 training rows are fewer than one step's 2 x 2 rank"):
        next(rank_batches(3, batch=2, rank=0, world=2, seed=0))
    assert len(next(rank_batches(4, batch=2, rank=1, world=2, seed=0))) == 2  # exactly one step is enough


# --- prompts ----------------------------------------------------------------------------------------------------


def test_fixed_prompts_are_all_drawn_before_any_repeats():
    prompts = [Prompt(f"p{i}=", str(i)) for i in range(5)]
    source = PromptSource(fixed=prompts)
    rng = random.Random(0)
    drawn = source.batch(3, rng) + source.batch(3, rng) + source.batch(4, rng)  # two epochs across batch edges
    assert sorted(drawn[:5], key=lambda p: p.text) == prompts
    assert sorted(drawn[5:], key=lambda p: p.text) == prompts
    assert drawn[:5] != prompts or drawn[5:] != prompts  # shuffled, not read in file order


def test_task_prompts_come_with_their_answers():
    task = make_task("reverse", 4)
    prompts = PromptSource(task=task).batch(16, random.Random(2))
    assert len({p.text for p in prompts}) > 1
    for p in prompts:
        assert p.answer == p.text[2:-1][::-1]
        assert task.score(p.text, p.answer, p.answer) == 1.0
    assert prompts == PromptSource(task=task).batch(16, random.Random(2))


def test_encode_appends_eos_and_counts_prompt_tokens():
    assert encode(TOK, "ab=", "c") == ([97, 98, 61, 99, TOK.eos_id], 3)
    assert encode(TOK, "ab=", "") == ([97, 98, 61, TOK.eos_id], 3)  # an empty response still learns to stop


def test_encode_refuses_an_empty_prompt():
    with pytest.raises(UserError, match="empty prompt"):
        encode(TOK, "", "123")
