"""The GPU order an actor gets: its own first (so cuda:0 is its own), the node's others after."""

import pytest

from opd.cluster.devices import node_gpu_ids, peer_order, show_peer_gpus


@pytest.mark.parametrize(
    ("mine", "node", "expected"),
    [
        (["1"], ["0", "1"], ["1", "0"]),
        (["0"], ["0", "1", "2", "3"], ["0", "1", "2", "3"]),
        (["2", "3"], ["0", "1", "2", "3"], ["2", "3", "0", "1"]),
        (["5"], ["4", "5"], ["5", "4"]),
    ],
)
def test_own_gpus_first_then_the_rest_once(mine, node, expected):
    assert peer_order(mine, node) == expected


def test_node_ids_follow_the_launch_restriction_when_given():
    assert node_gpu_ids(2, None) == ["0", "1"]
    assert node_gpu_ids(2, "4, 5") == ["4", "5"]


def test_outside_ray_nothing_changes(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert show_peer_gpus() is None
    monkeypatch.setenv("OPD_ISOLATE_GPUS", "1")
    assert show_peer_gpus() is None
