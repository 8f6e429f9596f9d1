import json

import pytest


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A trained tiny teacher, a random-init student (one tokenizer) and a prompt file."""
    from opd.models.tiny import build_pair, synthetic_examples

    root = tmp_path_factory.mktemp("tiny")
    teacher, student = build_pair(root)
    train = root / "train.jsonl"
    with train.open("w") as f:
        for i, row in enumerate(synthetic_examples(200, seed=7)):
            f.write(json.dumps({"id": f"t{i}", **row}) + "\n")
    return {"root": root, "teacher": teacher, "student": student, "train": train}
