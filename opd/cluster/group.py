"""A group of Ray actors of one role: fan a call out, gather, name the role on failure."""

from __future__ import annotations

from typing import Any

import ray


class RoleError(RuntimeError):
    pass


class ActorGroup:
    def __init__(self, role: str, handles: list, timeout_s: float, placement_group=None) -> None:
        self.role, self.handles, self.timeout_s = role, handles, timeout_s
        self.placement_group = placement_group

    def __len__(self) -> int:
        return len(self.handles)

    def gather(self, refs: list, what: str) -> list[Any]:
        try:
            return ray.get(refs, timeout=self.timeout_s)
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

    def call_each(self, method: str, per_actor_args: list[tuple], **kwargs) -> list[Any]:
        """Actor i gets `per_actor_args[i]`."""
        refs = [
            getattr(h, method).remote(*a, **kwargs) for h, a in zip(self.handles, per_actor_args)
        ]
        return self.gather(refs, method)

    def kill(self) -> None:
        """Stop the actors and give their placement group's resources back to the cluster."""
        for h in self.handles:
            ray.kill(h, no_restart=True)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
