"""The tokenizer-only GGUF cut from a GGUF's head: same metadata, no tensors."""

import io

import numpy as np
import pytest

from opd.models.gemma import gguf_metadata_only


def _gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.u32", 7)
    w.add_float64("test.f64", 0.25)
    w.add_bool("test.flag", True)
    w.add_string("test.name", "hé llo")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc", "∑"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.0, -3.0])
    w.add_tensor("blk.0.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _fields(reader):
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def test_metadata_only_keeps_every_field_and_drops_the_tensors(tmp_path):
    import gguf

    full = _gguf(tmp_path / "full.gguf")
    head = tmp_path / "head.gguf"
    head.write_bytes(gguf_metadata_only(io.BytesIO(full.read_bytes())))
    a, b = gguf.GGUFReader(str(full)), gguf.GGUFReader(str(head))
    assert len(a.tensors) == 1 and len(b.tensors) == 0
    assert _fields(b) == _fields(a)
    assert _fields(b)["tokenizer.ggml.tokens"] == ["<s>", "a", "bc", "∑"]
    assert head.stat().st_size < full.stat().st_size


def test_a_head_cut_inside_the_metadata_is_refused(tmp_path):
    data = _gguf(tmp_path / "full.gguf").read_bytes()
    cut = data.index(b"bc")  # inside the token array
    with pytest.raises(ValueError, match="past the end of the first chunk"):
        gguf_metadata_only(io.BytesIO(data[:cut]))
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_metadata_only(io.BytesIO(b"GGML" + data[4:]))
