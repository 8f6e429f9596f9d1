"""Prompt loading, over-long dropping, seeded order and the resumable cursor."""

import json

import pytest
from transformers import AutoTokenizer

from opd.data.prompts import PromptStream, build_prompts, read_rows


def test_read_rows_names_the_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"q": "a"}\n\n{"q": oops}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: not valid JSON"):
        read_rows(p)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")


def test_parquet_and_datasets_folder_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["a", "b"]}), tmp_path / "d.parquet")
    assert read_rows(tmp_path / "d.parquet") == [{"question": "a"}, {"question": "b"}]
    datasets.Dataset.from_dict({"question": ["c"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_rows(tmp_path / "ds") == [{"question": "c"}]


def test_build_prompts_drops_long_and_names_missing_field(tiny_pair):
    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    rows = [{"question": "tom has 3 apples"}, {"question": "apples " * 200}, {"question": "x"}]
    prompts, dropped = build_prompts(
        rows,
        tok,
        prompt_field="question",
        id_field=None,
        system_prompt=None,
        max_prompt_tokens=32,
        source="s.jsonl",
    )
    assert dropped == 1 and [p.id for p in prompts] == ["s/0", "s/2"]
    want = tok.apply_chat_template(
        [{"role": "user", "content": "tom has 3 apples"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert tok.decode(prompts[0].token_ids) == want
    with pytest.raises(ValueError, match=r"row 0 has no field 'prompt'"):
        build_prompts(
            rows,
            tok,
            prompt_field="prompt",
            id_field=None,
            system_prompt=None,
            max_prompt_tokens=32,
            source="s.jsonl",
        )


def _stream(n=10, seed=1):
    from opd.data.prompts import Prompt

    return PromptStream([Prompt(str(i), [], [], {}) for i in range(n)], seed=seed)


def test_stream_is_a_seeded_permutation_per_epoch_and_resumes_exactly():
    a = [p.id for p in _stream().take(25)]
    assert sorted(a[:10]) == [str(i) for i in range(10)]  # each epoch covers every prompt
    assert a[:10] != a[10:20]  # a new order each epoch
    assert a == [p.id for p in _stream().take(25)]
    assert a != [p.id for p in _stream(seed=2).take(25)]
    s = _stream()
    first = [p.id for p in s.take(13)]
    state = json.loads(json.dumps(s.state_dict()))
    resumed = _stream()
    resumed.load_state_dict(state)
    assert first + [p.id for p in resumed.take(12)] == a
    with pytest.raises(ValueError, match="training data changed"):
        _stream(n=9).load_state_dict(state)


def test_non_utf8_line_and_unreadable_table_name_the_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"q": "a"}\n{"q": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8"):
        read_rows(p)
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"d\.parquet: not readable as parquet"):
        read_rows(bad)


@pytest.mark.parametrize("value", [None, 3, {"text": "a"}, "  "])
def test_a_prompt_that_is_not_text_is_an_error(value):
    with pytest.raises(
        ValueError, match=r"s\.jsonl: row 0: field 'question' \(data\.prompt_field\)"
    ):
        build_prompts(
            [{"question": value}],
            None,  # never reached: the row is refused first
            prompt_field="question",
            id_field=None,
            system_prompt=None,
            max_prompt_tokens=32,
            source="s.jsonl",
        )
