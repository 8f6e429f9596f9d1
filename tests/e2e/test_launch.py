"""The cluster launchers, for real on one machine.

A two-node Ray cluster (a head and a worker, each started with `ray start --block` with one
logical CPU, its own ports and temp dir) runs the tiny reverse-KL recipe submitted as a Ray
job through `launch/ray_job.py`: the job must succeed, write its metrics, checkpoint and
student, and place the roles (1.5 CPUs in all) on both nodes. `launch/slurm.sbatch` runs
under `srun` / `scontrol` stand-ins that start each "node" here.

The nodes are stopped by signalling the processes this test started, not with `ray stop`,
which would end every Ray instance on the machine (the e2e session's own included).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from opd.metrics import read_metrics

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
STEPS = 2


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(**extra: str) -> dict[str, str]:
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` (it stops its node's processes), then kill its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _state(cluster: dict, resource: str, **options) -> list:
    """Ray's state API with the cluster's token (this process's Ray config may lack it)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(cluster["address"], headers=cluster["headers"])
    return client.list(
        StateResource(resource), ListApiOptions(**options), raise_on_missing_output=False
    )


def _wait_for_nodes(cluster: dict, n: int, procs: list, timeout_s: float = 180) -> list:
    deadline = time.time() + timeout_s
    while True:
        for p in procs:
            assert p.poll() is None, f"a ray node exited with {p.returncode}"
        try:
            alive = _state(cluster, "nodes", filters=[("state", "=", "ALIVE")])
            if len(alive) == n:
                return alive
        except Exception:  # the dashboard is not up yet
            pass
        assert time.time() < deadline, f"{n} Ray nodes not up within {timeout_s} s"
        time.sleep(1)


@pytest.fixture
def two_nodes():
    """A head and a worker node, one logical CPU each, with token authentication (Ray's
    default) under a token of their own; yields the dashboard address, token and nodes."""
    tmp = Path(tempfile.mkdtemp(prefix="opd-ray-", dir="/tmp"))  # short: socket paths
    token = secrets.token_hex(32)
    cluster = {"token": token, "headers": {"authorization": f"Bearer {token}"}, "tmp": tmp}
    gcs, dash, client, agent_head, agent_worker = _free_ports(5)
    common = ["--block", "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1"]
    common += ["--object-store-memory=200000000", "--disable-usage-stats"]
    head = [
        "--head",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_head}",
        f"--temp-dir={tmp / 'head'}",
    ]
    worker = [
        f"--address=127.0.0.1:{gcs}",
        f"--dashboard-agent-listen-port={agent_worker}",
        f"--temp-dir={tmp / 'worker'}",
    ]
    procs = []
    try:
        for name, args in (("head", head), ("worker", worker)):
            with open(tmp / f"{name}.log", "w") as log:
                procs.append(
                    subprocess.Popen(
                        [str(BIN / "ray"), "start", *common, *args],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
                        start_new_session=True,
                    )
                )
            if name == "head":
                cluster["address"] = f"http://127.0.0.1:{dash}"
                _wait_for_nodes(cluster, 1, procs)
        cluster["nodes"] = _wait_for_nodes(cluster, 2, procs)
        yield cluster
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def _overrides(tiny_pair, out) -> list[str]:
    return [
        f"run.output_dir={out}",
        f"student.path={tiny_pair['student']}",
        f"teacher.path={tiny_pair['teacher']}",
        f"data.train_path={tiny_pair['train']}",
        f"trainer.steps={STEPS}",
        "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=1",
        "rollout.max_new_tokens=16",
        "learner.micro_batch_size=4",
        "eval.every=2",
        "eval.heldout_prompts=4",
        "checkpoint.every=0",
        "run.progress=false",
        "run.device=cpu",
        "cluster.timeout_s=600",
    ]


def test_ray_job_on_two_nodes(tiny_pair, two_nodes, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "run"
    address = two_nodes["address"]
    cmd = [
        sys.executable,
        str(REPO / "launch/ray_job.py"),
        "--address",
        address,
        "recipes/reverse_kl/tiny.yaml",
        *_overrides(tiny_pair, out),
    ]
    # The launcher finds the token and authenticates by itself (RAY_AUTH_MODE unset).
    env = _env(RAY_AUTH_TOKEN=two_nodes["token"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    [job] = JobSubmissionClient(address, headers=two_nodes["headers"]).list_jobs()
    assert job.status == JobStatus.SUCCEEDED, log
    assert job.entrypoint.startswith("opd train recipes/reverse_kl/tiny.yaml ")
    assert job.entrypoint.endswith(" cluster.address=auto")

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert [r["step"] for r in rows if "heldout/reverse_kl" in r] == [0, STEPS]
    assert all(r["train/skipped_steps"] == 0 for r in rows[1:])
    assert (out / "checkpoints/latest").read_text() == f"step_{STEPS}"
    assert (out / "student/config.json").is_file()
    assert (out / "config.yaml").is_file()

    # Each role's placement group packs onto one node; 1.5 CPUs do not fit on one.
    actors = _state(two_nodes, "actors", limit=1000)
    placed = {a.class_name: a.node_id for a in actors}
    roles = {"Learner", "TeacherScorer", "RolloutWorker"}
    assert roles <= placed.keys(), placed
    assert {placed[r] for r in roles} == {n.node_id for n in two_nodes["nodes"]}, placed


SRUN = """#!/usr/bin/env bash
# srun stand-in: runs the command here once per node of -w, with that node's env file.
nodes=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -w|--nodelist) IFS=, read -ra nodes <<< "$2"; shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
pids=()
for node in "${nodes[@]}"; do
  (set -a; . "$SHIM_NODES/$node.env"; SLURMD_NODENAME=$node; exec "$@") &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
wait "${pids[@]}"
wait "${pids[@]}"
"""
SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: `show hostnames a,b` lists the nodes.
if [[ "$1 $2" == "show hostnames" ]]; then tr , '\\n' <<< "$3"; fi
"""


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_slurm_script_brings_up_two_nodes_runs_the_job_and_tears_down():
    """Under srun / scontrol stand-ins, the sbatch script starts a head and a worker here,
    waits for both, submits the recipe as a Ray job and passes its exit status on (2: this
    recipe's data file does not exist, which `opd train` finds on the cluster), then stops
    every node it started."""
    tmp = Path(tempfile.mkdtemp(prefix="opd-slurm-", dir="/tmp"))
    (tmp / "bin").mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (tmp / "bin" / name).write_text(text)
        (tmp / "bin" / name).chmod(0o755)
    gcs, dash, client, agent0, agent1 = _free_ports(5)
    for node, args in (
        ("node0", f"--dashboard-agent-listen-port={agent0} --ray-client-server-port={client}"),
        ("node1", f"--dashboard-agent-listen-port={agent1}"),
    ):
        args += f" --temp-dir={tmp / node} --object-store-memory=200000000"
        (tmp / f"{node}.env").write_text(f'SLURM_CPUS_PER_TASK=1\nOPD_RAY_START_ARGS="{args}"\n')
    env = _env(
        SHIM_NODES=str(tmp),
        SLURMD_NODENAME="node0",
        SLURM_JOB_NODELIST="node0,node1",
        SLURM_JOB_ID="1",
        SLURM_SUBMIT_DIR=str(REPO),
        OPD_RAY_PORT=str(gcs),
        OPD_DASHBOARD_PORT=str(dash),
    )
    env["PATH"] = f"{tmp / 'bin'}{os.pathsep}{env['PATH']}"
    cmd = ["bash", str(REPO / "launch/slurm.sbatch"), "recipes/reverse_kl/tiny.yaml"]
    cmd += [f"run.output_dir={tmp / 'run'}", f"data.train_path={tmp / 'missing.jsonl'}"]
    try:
        proc = subprocess.run(
            cmd,
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            start_new_session=True,
        )
        log = proc.stdout[-6000:] + proc.stderr[-6000:]
        assert proc.returncode == 2, log
        assert "opd: 2 Ray nodes up" in log, log
        assert "opd train: invalid recipe: data.train_path" in log, log
        assert "FAILED (exit 2)" in log, log
        assert _processes_mentioning(str(tmp)) == [], "Ray processes outlived the script"
    finally:
        for pid in _processes_mentioning(str(tmp)):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
