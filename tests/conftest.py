import json

import pytest


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A trained tiny teacher, a random-init student (one tokenizer) and a prompt file. The
    models are the registry's `tiny-teacher` / `tiny-student`, built once into the shared cache
    (every pytest process of a CI run reuses them); tests only read them."""
    from opd.models.sources import resolve_model
    from opd.models.tiny import synthetic_examples

    root = tmp_path_factory.mktemp("tiny")
    teacher = resolve_model("registry:tiny-teacher")
    student = resolve_model("registry:tiny-student")
    train = root / "train.jsonl"
    with train.open("w") as f:
        for i, row in enumerate(synthetic_examples(200, seed=7)):
            f.write(json.dumps({"id": f"t{i}", **row}) + "\n")
    return {"root": root, "teacher": teacher, "student": student, "train": train}
