"""Multi-turn rollouts in which the model calls tools (the `agent:` block of a recipe).

`config` (the block), `tools` (the python tool in the sandbox, and users' tools by import
path), `calls` (finding a tool call in a model turn), `turns` (a tool turn's tokens under the
model's chat template) and `loop` (trajectories advancing together, one batched vLLM call per
turn)."""
