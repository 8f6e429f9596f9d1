#!/usr/bin/env python
"""Run a recipe as a Ray job on an existing cluster, as if `opd train` ran there.

    python launch/ray_job.py --address http://HEAD:8265 RECIPE.yaml [dotted.key=value ...]

- `--address` is the head node's dashboard (job server), default `$RAY_ADDRESS`; the cluster
  must have been started with the dashboard (`ray start --head --include-dashboard=true`).
- The repository (`--working-dir`, default this checkout; `.gitignore`d files are left out)
  is uploaded and becomes the job's working directory on every node, so recipe paths
  relative to it work. The nodes need opd's dependencies installed (`launch/install.sh`, or
  the images in `docker/`).
- The entrypoint is `opd train RECIPE [overrides] cluster.address=auto`: the driver runs on
  the head node and joins the cluster it runs on.
- `run.output_dir` should be an absolute path that every node can write (a shared
  filesystem): a relative one lands in the job's temporary copy of the working directory.
  The recipe's schema is checked here before anything is submitted.
- The job's logs stream here, and the exit status is the job's: opd's own exit code (0, 2
  for an invalid recipe, 143 when stopped), 1 when the job failed before opd ran.
- A cluster with token authentication (Ray's default for `ray start --head` when a token
  exists) needs its token here: `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
  `~/.ray/auth_token`; when one is found and `RAY_AUTH_MODE` is unset, it is sent.
- Ctrl-C or SIGTERM stops the job the way SIGTERM stops `opd train`: the current step
  finishes and is checkpointed (the cluster waits up to `--stop-grace-s` before killing the
  driver); submitting the same command again resumes. A second signal leaves at once.
  `--detach` submits, prints the job id and returns.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe path, relative to the working directory or absolute")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, as for `opd train`")
    p.add_argument("--address", default=None, help="dashboard address (default $RAY_ADDRESS)")
    p.add_argument("--working-dir", type=Path, default=REPO, help="uploaded as the job's cwd")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job env var")
    p.add_argument("--stop-grace-s", type=int, default=900, help="SIGTERM -> SIGKILL on stop")
    p.add_argument("--detach", action="store_true", help="submit, print the job id, return")
    return p


def entrypoint(recipe: str, overrides: list[str]) -> str:
    """`opd train` joining the cluster it runs on, unless the overrides name an address."""
    if not any(o.startswith("cluster.address=") for o in overrides):
        overrides = [*overrides, "cluster.address=auto"]
    return shlex.join(["opd", "train", recipe, *overrides])


def _recipe_for_job(recipe: str, working_dir: Path) -> str:
    """A local recipe inside the working directory is named relative to it (the job's cwd)."""
    path = Path(recipe).resolve()
    if path.is_file() and path.is_relative_to(working_dir):
        return str(path.relative_to(working_dir))
    return recipe


def _check_locally(recipe: str, overrides: list[str]) -> None:
    """Schema errors fail here; model and data files are checked on the cluster."""
    if not Path(recipe).is_file():
        return  # a path only the cluster can read
    try:
        from opd.config import ConfigError, load_config
    except ImportError:  # a submitting machine with only ray[default] installed
        return
    try:
        cfg = load_config(recipe, overrides)
    except ConfigError as e:
        sys.exit(f"ray_job: invalid recipe: {e}")
    if not Path(cfg.run.output_dir).is_absolute():
        print(
            f"ray_job: warning: run.output_dir={cfg.run.output_dir} is relative, so it lands in "
            "the job's temporary working directory; pass run.output_dir=/shared/path to keep "
            "checkpoints and resume",
            file=sys.stderr,
        )


def _use_token_if_present() -> None:
    """Send the cluster token when one is at hand, as `ray start` does (before importing ray)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", str(Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


async def _follow(client, job_id: str) -> None:
    try:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)
    except RuntimeError as e:  # the log stream broke; the job's status still tells the end
        print(f"ray_job: log stream lost ({e}); waiting for the job", file=sys.stderr)
    while not client.get_job_status(job_id).is_terminal():
        await asyncio.sleep(2)


def _exit_code(info) -> int:
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        return 0
    if info.driver_exit_code is not None:
        return info.driver_exit_code
    return 143 if info.status == JobStatus.STOPPED else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _use_token_if_present()
    from ray.job_submission import JobSubmissionClient

    if args.address:  # Ray lets these override an explicit address; an explicit flag wins
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    working_dir = args.working_dir.resolve()
    _check_locally(args.recipe, args.overrides)
    env = dict(kv.split("=", 1) for kv in args.env)
    env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(args.stop_grace_s))

    client = JobSubmissionClient(args.address)
    command = entrypoint(_recipe_for_job(args.recipe, working_dir), args.overrides)
    job_id = client.submit_job(
        entrypoint=command,
        runtime_env={"working_dir": str(working_dir), "env_vars": env},
    )
    print(f"ray_job: submitted {job_id}: {command}", file=sys.stderr, flush=True)
    if args.detach:
        print(job_id)
        return 0

    def on_signal(signum, frame):
        if on_signal.stopping:
            print(f"ray_job: leaving; the job {job_id} goes on stopping", file=sys.stderr)
            os._exit(128 + signum)
        on_signal.stopping = True
        print(f"ray_job: stopping {job_id} after its current step", file=sys.stderr, flush=True)
        client.stop_job(job_id)

    on_signal.stopping = False
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    asyncio.run(_follow(client, job_id))
    info = client.get_job_info(job_id)
    code = _exit_code(info)
    print(f"ray_job: {job_id} {info.status.value} (exit {code})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
