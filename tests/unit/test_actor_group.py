"""ActorGroup on a real local Ray: timeouts and deaths name the role and actor; a restarted
actor is restored and given its part of the call again, exactly once."""

import os
from pathlib import Path

import pytest
import ray

from opd.cluster.group import ActorGroup, RoleError


@pytest.fixture(scope="module", autouse=True)
def _actor_class_by_value():
    """Ray's workers cannot import this test module: ship the actor class by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Worker:
    def __init__(self, flag_dir: str) -> None:
        self.flag_dir = Path(flag_dir)
        self.restored = False

    def ping(self) -> int:
        return os.getpid()

    def work(self, x: int) -> tuple[int, bool]:
        """Dies the first time it is called (per flag dir), answers afterwards."""
        flag = self.flag_dir / "died"
        if not flag.exists():
            flag.touch()
            os._exit(1)
        return x * 2, self.restored

    def restore(self) -> None:
        self.restored = True

    def slow(self) -> None:
        import time

        time.sleep(30)


def _group(tmp_path, n=2, restarts=1, timeout=60.0):
    cls = ray.remote(Worker).options(num_cpus=0.1, max_restarts=restarts)
    dirs = [tmp_path / f"w{i}" for i in range(n)]
    for d in dirs:
        d.mkdir()
    handles = [cls.remote(str(d)) for d in dirs]
    # up before the group's own timeout applies: starting a worker process can take longer
    # than the 1 s a timeout test gives its calls
    ray.get([h.ping.remote() for h in handles], timeout=120)
    group = ActorGroup("rollout", handles, timeout, max_restarts=restarts)
    return group, dirs


def test_dead_actor_is_restored_and_its_part_redone_once(local_ray, tmp_path):
    group, dirs = _group(tmp_path)
    (dirs[0] / "died").touch()  # actor 0 works normally; actor 1 dies on its first call
    restored = []

    def on_restart(i):
        restored.append(i)
        ray.get(group.handles[i].restore.remote())

    pending = group.submit_each("work", [(3,), (5,)])
    assert group.collect(pending, on_restart) == [(6, False), (10, True)]
    assert restored == [1] and group.restarts == 1
    group.kill()


def test_dead_actor_without_restore_names_role_and_actor(local_ray, tmp_path):
    group, _ = _group(tmp_path, n=1, restarts=0)
    with pytest.raises(RoleError, match=r"rollout\[0\]\.work: the actor died"):
        group.collect(group.submit_each("work", [(1,)]))
    group.kill()


def test_timeout_names_role_and_method(local_ray, tmp_path):
    group, _ = _group(tmp_path, n=1, timeout=1.0)
    with pytest.raises(RoleError, match=r"rollout\[0\]\.slow timed out after 1 s"):
        group.collect(group.submit_each("slow", [()]))
    with pytest.raises(RoleError, match=r"rollout\.slow timed out after 1 s"):
        group.call("slow")
    group.kill()
