"""data.truncation in the RLHF stages: an example longer than data.max_length loses its response's end, never its prompt.

With truncation on, SFT rows and preference pairs keep an over-long example
cut to its first max_length tokens; the kept response tokens are predicted
from exactly the context they had in the whole example. An example whose
prompt fills the row, or a pair whose answers only differ in what was cut,
is still left out. With truncation off, over-long examples are left out, as before.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ava.config import ConfigFiles, WorldSize, load_config
from ava.config.schema.model import ModelConfig
from ava.data.tokenizer import ByteTokenizer
from ava.model import AvaForCausalLM
from ava.model.transformer import IGNORE_INDEX
from ava.rlhf.data import encode, encoded_preferences, fit_length, sft_rows
from tests.conftest import REPO

IGN = IGNORE_INDEX
PAD = 0
TOK = ByteTokenizer()
A = ([11, 12, 13, 14, 15, 9], 3)  # prompt 11 12 13, response 14 15 + eos (9)
TOO_LONG = (list(range(40, 53)), 5)  # 13 tokens: prompt 40..44, response 45..51 + "eos" 52
LONG_PROMPT = (list(range(60, 75)), 12)  # 15 tokens, a 12-token prompt


def test_fit_length_cuts_the_response_end_and_keeps_the_whole_prompt():
    assert fit_length(A, 12, truncate=True) is A  # fits: untouched
    assert fit_length(TOO_LONG, 12, truncate=True) == (list(range(40, 52)), 5)  # the eos (52) goes first
    assert fit_length(TOO_LONG, 6, truncate=True) == ([40, 41, 42, 43, 44, 45], 5)  # one response token is enough
    assert fit_length(TOO_LONG, 5, truncate=True) is None  # the prompt alone fills the row
    assert fit_length(TOO_LONG, 12, truncate=False) is None


def test_sft_rows_with_truncation_keep_an_over_long_example_cut_to_the_row():
    rows = sft_rows([TOO_LONG, A, LONG_PROMPT], max_length=12, pad_id=PAD, packing=False, truncate=True)
    assert (rows.truncated, rows.dropped) == (1, 1)  # LONG_PROMPT's prompt fills the row: left out
    assert rows.input_ids.tolist() == [list(range(40, 52)), A[0] + [PAD] * 6]
    assert rows.labels[0].tolist() == [IGN] * 5 + list(range(45, 52))  # the kept response tokens, no eos
    assert rows.notes("sft", 12) == [
        "sft: 1 example(s) longer than data.max_length = 12 cut to it (data.truncation: the response loses its "
        "end, the prompt stays whole)",
        "sft: 1 example(s) left out (no room for a response token after the prompt, at data.max_length = 12)"]
    packed = sft_rows([A, TOO_LONG], max_length=12, pad_id=PAD, packing=True, truncate=True)
    assert packed.input_ids.tolist() == [A[0] + [PAD] * 6, list(range(40, 52))]  # a cut example fills its own row


def test_sft_rows_without_truncation_leave_over_long_examples_out_and_say_how_to_keep_them():
    rows = sft_rows([TOO_LONG, A], max_length=12, pad_id=PAD, packing=False, truncate=False)
    assert (rows.truncated, rows.dropped) == (0, 1) and rows.input_ids.tolist() == [A[0]]
    assert rows.notes("sft", 12) == ["sft: 1 example(s) longer than data.max_length = 12 left out "
                                     "(data.truncation: true would keep them, cut)"]


def test_a_cut_example_trains_its_kept_tokens_on_the_same_context_as_the_whole_example():
    torch.manual_seed(0)
    model = AvaForCausalLM(ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=48,
                                       vocab_size=64, max_position_embeddings=32)).eval()
    ids, n_prompt = TOO_LONG
    rows = sft_rows([(ids, n_prompt)], max_length=9, pad_id=PAD, packing=True, truncate=True)
    with torch.no_grad():
        cut = model(rows.input_ids, labels=rows.labels, segment_ids=rows.segment_ids).lm_loss
        logits = model(torch.tensor([ids])).logits[0]
    whole = F.cross_entropy(logits[n_prompt - 1:-1].float(), torch.tensor(ids[n_prompt:]), reduction="none")
    assert cut.item() == pytest.approx(whole[:9 - n_prompt].mean().item(), abs=1e-5)  # the first 4 targets' loss


def _pairs_file(tmp_path, pairs):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
    return SimpleNamespace(data_path=str(path), num_examples=len(pairs), eval_examples=0)


def test_preference_pairs_are_cut_alike_and_left_out_when_only_the_cut_part_differed(tmp_path):
    stage = _pairs_file(tmp_path, [("q=", "abcdefgh", "xyz"),  # chosen cut: kept, judged on the same prompt
                                   ("q=", "abcdefgh", "abcdefZZ"),  # they differ after token 8 only: left out
                                   ("a long prompt=", "y", "n")])  # the prompt fills the row: left out
    data = encoded_preferences(TOK, stage, None, 0, "rlhf.dpo.data_path", max_length=8, truncate=True)
    assert (data.truncated, data.dropped) == (1, 2)
    (chosen, n_chosen), (rejected, n_rejected) = data.train[0]
    assert chosen == TOK.encode("q=abcdef") and n_chosen == n_rejected == 2
    assert rejected == encode(TOK, "q=", "xyz")[0]  # it fitted: untouched, eos included
    assert data.notes("dpo", 8)[1] == ("dpo: 2 pair(s) left out (no room for a response token after the prompt, "
                                       "or answers that agree once cut, at data.max_length = 8)")
    off = encoded_preferences(TOK, _pairs_file(tmp_path, [("q=", "abcdefgh", "xyz"), ("q=", "y", "n")]), None, 0,
                              "rlhf.dpo.data_path", max_length=8, truncate=False)
    assert (off.truncated, off.dropped, len(off.train)) == (0, 1, 1)


def test_data_truncation_is_on_by_default_as_the_shipped_configs_set_it():
    files = ConfigFiles(str(REPO / "configs/gpu/tiny.yaml"), str(REPO / "configs/hardware/cpu.yaml"))
    assert load_config(files, [], WorldSize(1, "test")).config.data.truncation is True
    assert load_config(files, ["--truncation", "false"], WorldSize(1, "test")).config.data.truncation is False
