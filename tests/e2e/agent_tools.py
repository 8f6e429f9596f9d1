"""Users' tools for the agent-loop test, named by import path (agent.tools: [agent_tools:add])."""

import time


def add(arguments):
    return str(arguments["a"] + arguments["b"])


def hang(arguments):
    time.sleep(30)
    return "too late"


def boom(arguments):
    raise RuntimeError("boom")
