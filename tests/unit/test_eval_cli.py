"""`opd eval --completions` grades other systems' outputs; `opd plot` renders a run."""

import json

from opd.cli import main
from opd.eval.benchmarks import load_benchmark


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(tmp_path, benchmark, rows, name):
    out = tmp_path / f"{name}.json"
    code = main(
        [
            "eval",
            "--benchmark",
            benchmark,
            "--completions",
            str(_write(tmp_path / f"{name}.jsonl", rows)),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_humaneval_canonical_solutions_pass_and_broken_fail(tmp_path):
    problems = load_benchmark("humaneval")
    canonical = [{"id": p.id, "completion": p.meta["canonical_solution"]} for p in problems]
    summary = _eval(tmp_path, "humaneval", canonical, "canonical")
    assert summary["n_problems"] == 164 and summary["pass@1"] == 1.0
    broken = [{"id": p.id, "completion": "    return None\n"} for p in problems[:20]]
    summary = _eval(tmp_path, "humaneval", broken, "broken")
    assert summary["n_problems"] == 20 and summary["pass@1"] == 0.0
    records = [json.loads(ln) for ln in open(summary["records"])]
    assert len(records) == 20 and not any(r["correct"] for r in records)


def test_gsm8k_references_score_and_pass_at_k_maj(tmp_path):
    problems = load_benchmark("gsm8k-100", limit=10)
    rows = []
    for p in problems:  # two samples each: one right (boxed), one wrong
        rows.append({"id": p.id, "completion": f"so the answer is \\boxed{{{p.answer}}}"})
        rows.append({"id": p.id, "completion": "the answer is 123456789"})
    summary = _eval(tmp_path, "gsm8k-100", rows, "gsm")
    assert summary["n_problems"] == 10
    assert summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0


def test_unknown_id_is_a_clear_error(tmp_path, capsys):
    path = _write(tmp_path / "c.jsonl", [{"id": "HumanEval/999", "completion": "x"}])
    out = str(tmp_path / "e.json")
    assert main(["eval", "--benchmark", "humaneval", "--completions", str(path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "c.jsonl: 1 of 1 rows" in err and "line 1: 'HumanEval/999'" in err
    assert "'HumanEval/0'" in err  # what its ids look like


def test_plot_renders_a_png(tmp_path):
    rows = [
        {"step": 0, "heldout/reverse_kl": 2.0},
        {"step": 1, "train/loss": 1.0, "perf/tokens_per_s": 10.0, "eval/gsm8k-100/pass@1": 0.1},
    ]
    _write(tmp_path / "metrics.jsonl", rows)
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_panels_have_labels_whole_steps_and_simcts_heldout_metric():
    import matplotlib.pyplot as plt

    from opd.eval.plot import figure

    simct = [  # a simct run logs the objective's held-out metrics, not the reverse KL
        {"step": 0, "heldout/loss": 2.0, "heldout/completion_tokens": 30.0},
        {"step": 1, "train/loss": 1.0, "perf/tokens_per_s": 10.0},
        {"step": 2, "heldout/loss": 1.5, "eval/arith-heldout/pass@1": 0.2},
    ]
    fig = figure(simct, "run")
    train, heldout, scores, speed = fig.axes
    assert [line.get_label() for line in heldout.lines] == ["heldout/loss"]
    assert [line.get_label() for line in scores.lines] == ["eval/arith-heldout/pass@1"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)
    # with the reverse KL logged, the held-out panel shows it (and each teacher's)
    rows = [
        {
            "step": 0,
            "heldout/reverse_kl": 1.0,
            "heldout/a/reverse_kl": 2.0,
            "heldout/completion_tokens": 9.0,
        }
    ]
    fig = figure(rows, "run")
    assert [x.get_label() for x in fig.axes[1].lines] == [
        "heldout/reverse_kl",
        "heldout/a/reverse_kl",
    ]
    plt.close(fig)


def test_users_own_file_with_a_field_map(tmp_path, capsys):
    bench = _write(
        tmp_path / "mine.jsonl",
        [{"qid": "a", "q": "1+1?", "final": "2"}, {"qid": "b", "q": "2+3?", "final": "5"}],
    )
    rows = [{"id": "a", "completion": "\\boxed{2}"}, {"id": "b", "completion": "\\boxed{6}"}]
    out = tmp_path / "mine.json"
    assert (
        main(
            [
                "eval",
                "--benchmark",
                str(bench),
                "--field-map",
                "qid=id,q=prompt,final=answer",
                "--completions",
                str(_write(tmp_path / "c.jsonl", rows)),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["pass@1"] == 0.5
    assert (
        main(
            [
                "eval",
                "--benchmark",
                str(bench),
                "--field-map",
                "qid",
                "--completions",
                str(tmp_path / "c.jsonl"),
            ]
        )
        == 2
    )
    assert "file_field=problem_field" in capsys.readouterr().err
