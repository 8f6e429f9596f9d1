"""The flat weight buffer of the colocated CUDA IPC transport: every weight round-trips
through its slot, slots are aligned and never overlap; the transport's preconditions are
named."""

import pytest
import torch

from opd.config import ConfigError, load_config
from opd.sync.bucket import ALIGN, plan, view, views


def _packed(named):
    """The learner's half: plan the slots and copy every weight into a fresh buffer."""
    entries, size = plan(
        [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in named]
    )
    bucket = torch.zeros(size, dtype=torch.uint8)
    for e, (_, t) in zip(entries, named):
        view(bucket, e).copy_(t)
    return entries, size, bucket


def test_weights_round_trip_through_aligned_disjoint_slots():
    g = torch.Generator().manual_seed(0)
    named = [
        ("embed", torch.randn(7, 5, generator=g).bfloat16()),
        ("norm", torch.randn(5, generator=g)),  # float32 beside bfloat16
        ("odd", torch.randn(3, 1, 3, generator=g).half()),
        ("scalar", torch.randn((), generator=g).bfloat16()),
    ]
    entries, size, bucket = _packed(named)
    for (name, got), (ref_name, ref) in zip(views(bucket, entries), named):
        assert name == ref_name and got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got, ref)
    spans = sorted((e.offset, e.offset + e.nbytes) for e in entries)
    assert all(e.offset % ALIGN == 0 for e in entries)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= size


def _recipe(tmp_path, extra):
    p = tmp_path / "r.yaml"
    p.write_text("student: {path: x}\nteacher: {path: y}\ndata: {train_path: z}\n" + extra)
    return p


def test_ipc_needs_colocated_placement_and_gpus(tmp_path):
    from opd.cluster.placement import check_devices

    with pytest.raises(ConfigError, match="needs cluster.placement=colocated"):
        load_config(_recipe(tmp_path, "rollout: {weight_sync: ipc}\n"))
    cfg = load_config(
        _recipe(tmp_path, "rollout: {weight_sync: ipc}\ncluster: {placement: colocated}\n")
    )
    with pytest.raises(ValueError, match="weight_sync=ipc needs GPUs"):
        check_devices(cfg, "cpu")


def test_the_vllm_side_loads_every_weight_from_the_shared_buffer():
    """The worker-extension half of the transport, with the handle's rebuild function
    returning a host buffer (on GPUs it opens the learner's CUDA IPC handle)."""
    from opd.sync.vllm_extension import WeightSyncExtension

    named = [("a", torch.arange(6.0).reshape(2, 3)), ("b", torch.ones(4).bfloat16())]
    entries, size, bucket = _packed(named)

    class Worker(WeightSyncExtension):
        def reload_weights(self, weights_iterator):
            self.loaded = [(n, t.clone()) for n, t in weights_iterator]

    w = Worker()
    # as `RolloutWorker.load_weights_from_ipc` sends them (plain tuples), through the msgpack
    # hop to an engine in its own process (it turned the dataclasses into dicts on a GPU run)
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from opd.sync.bucket import as_rows

    received = MsgpackDecoder().decode(MsgpackEncoder().encode(as_rows(entries)))
    assert w.opd_load_ipc(received, (lambda: bucket, ()), version=7) == 7
    assert [n for n, _ in w.loaded] == ["a", "b"]
    assert all(torch.equal(got, ref) for (_, got), (_, ref) in zip(w.loaded, named))
