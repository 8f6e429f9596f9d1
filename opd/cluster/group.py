"""A group of Ray actors of one role: fan a call out, gather, name the role on failure.

Calls can be submitted now and gathered later (`submit_each` / `collect`), which is how
rollouts run ahead of the learner. An actor spawned with `max_restarts > 0` that dies is
restarted by Ray; `collect(..., on_restart=...)` then waits for the new instance, lets the
caller restore its state (e.g. re-send the current weights), and re-submits that actor's part
of the call, so the call completes with nothing lost or done twice. Without `on_restart`, or
once the restarts are used up, a dead actor is a `RoleError` naming the role and the actor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray


class RoleError(RuntimeError):
    pass


@dataclass
class Pending:
    """Calls in flight: actor i runs `method(*args[i], **kwargs)`. With `num_returns > 1`,
    `refs[i]` is the list of actor i's results; `collect` waits for the first of them and
    returns its value, and the others stay references (data the driver passes on unread)."""

    method: str
    args: list[tuple]
    kwargs: dict[str, Any]
    refs: list
    num_returns: int = 1
    submitted: float = field(default_factory=time.monotonic)


class ActorGroup:
    def __init__(
        self,
        role: str,
        handles: list,
        timeout_s: float,
        placement_group=None,
        max_restarts: int = 0,
    ) -> None:
        self.role, self.handles, self.timeout_s = role, handles, timeout_s
        self.placement_group = placement_group
        self.max_restarts = max_restarts
        self.restarts = 0  # actor restarts recovered from, over the run

    def __len__(self) -> int:
        return len(self.handles)

    def gather(self, refs: list, what: str) -> list[Any]:
        """All results, or a RoleError as soon as any call fails: a dead rank must not leave
        the run waiting on its peers, which may be blocked in a collective with it."""
        deadline = time.monotonic() + self.timeout_s
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(
                    pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic())
                )
                if not ready:
                    raise ray.exceptions.GetTimeoutError(what)
                ray.get(ready)  # raises here if that call failed
            return ray.get(refs)
        except ray.exceptions.GetTimeoutError as e:
            raise RoleError(
                f"{self.role}.{what} timed out after {self.timeout_s:.0f} s (cluster.timeout_s)"
            ) from e
        except ray.exceptions.RayError as e:
            raise RoleError(f"{self.role}.{what} failed: {e}") from e

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        """The same call on every actor."""
        refs = [getattr(h, method).remote(*args, **kwargs) for h in self.handles]
        return self.gather(refs, method)

    def call_one(self, i: int, method: str, *args, **kwargs) -> Any:
        """The call on actor i only."""
        return self.gather([getattr(self.handles[i], method).remote(*args, **kwargs)], method)[0]

    def call_on(self, which: list[int], method: str, per_actor_args: list[tuple]) -> list[Any]:
        """Actor `which[j]` gets `per_actor_args[j]`."""
        refs = [getattr(self.handles[i], method).remote(*a) for i, a in zip(which, per_actor_args)]
        return self.gather(refs, method)

    def call_each(self, method: str, per_actor_args: list[tuple], **kwargs) -> list[Any]:
        """Actor i gets `per_actor_args[i]`."""
        refs = [
            getattr(h, method).remote(*a, **kwargs) for h, a in zip(self.handles, per_actor_args)
        ]
        return self.gather(refs, method)

    # -- submit now, gather later, survive restarts -------------------------------------------

    def submit_each(
        self, method: str, per_actor_args: list[tuple], num_returns: int = 1, **kwargs
    ) -> Pending:
        pending = Pending(method, list(per_actor_args), kwargs, [], num_returns)
        pending.refs = [self._submit(pending, i) for i in range(len(per_actor_args))]
        return pending

    def wait(self, pending: Pending) -> list[Any]:
        """All of `pending`'s results, failing as soon as any call fails (no restarts): for
        calls in a collective, where a dead peer leaves the others blocked."""
        return self.gather(pending.refs, pending.method)

    def resubmit(self, pending: Pending, i: int) -> None:
        pending.refs[i] = self._submit(pending, i)

    def _submit(self, pending: Pending, i: int):
        call = getattr(self.handles[i], pending.method)
        if pending.num_returns > 1:
            call = call.options(num_returns=pending.num_returns)
        return call.remote(*pending.args[i], **pending.kwargs)

    def collect(
        self, pending: Pending, on_restart: Callable[[int], None] | None = None
    ) -> list[Any]:
        """Results of `pending`, in actor order. A dead actor is waited for, restored by
        `on_restart(i)` and given its part again, up to `max_restarts` times per call."""
        return [self.collect_one(pending, i, on_restart) for i in range(len(pending.refs))]

    def collect_one(
        self, pending: Pending, i: int, on_restart: Callable[[int], None] | None = None
    ) -> Any:
        attempts = 0
        while True:
            ref = pending.refs[i][0] if pending.num_returns > 1 else pending.refs[i]
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                raise RoleError(
                    f"{self.role}[{i}].{pending.method} timed out after "
                    f"{self.timeout_s:.0f} s (cluster.timeout_s)"
                ) from e
            except ray.exceptions.RayActorError as e:
                if on_restart is None or attempts >= self.max_restarts:
                    raise RoleError(
                        f"{self.role}[{i}].{pending.method}: the actor died ({e}); "
                        f"restarts allowed: {self.max_restarts if on_restart else 0}"
                    ) from e
                attempts += 1
                self.await_restart(i)
                on_restart(i)
                self.restarts += 1
                self.resubmit(pending, i)
            except ray.exceptions.RayError as e:
                raise RoleError(f"{self.role}[{i}].{pending.method} failed: {e}") from e

    def await_restart(self, i: int) -> None:
        """Block until Ray has brought actor i back (its constructor ran again)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                ray.get(self.handles[i].ping.remote(), timeout=self.timeout_s)
                return
            except ray.exceptions.RayActorError as e:  # still restarting, or gone for good
                if time.monotonic() > deadline:
                    raise RoleError(f"{self.role}[{i}] did not come back: {e}") from e
            except ray.exceptions.GetTimeoutError as e:
                raise RoleError(f"{self.role}[{i}] restart took over {self.timeout_s:.0f} s") from e
            time.sleep(1.0)

    def kill(self) -> None:
        """Stop the actors and give their placement group's resources back to the cluster."""
        for h in self.handles:
            ray.kill(h, no_restart=True)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
