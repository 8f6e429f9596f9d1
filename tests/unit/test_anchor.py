"""The AAPA anchor (opd/anchor/, our formulation): the composition arithmetic against hand
computation, the objectives' losses with an anchor against the same losses computed by hand,
the discriminator on a separable set (held-out accuracy), deterministic scoring, the
artifact's encoder check, and the `anchor:` block's validation and CLI errors."""

import json
import math
import random

import pytest
import torch

from opd.anchor.discriminator import Discriminator, read_meta, sentences, train
from opd.anchor.step import anchor_terms
from opd.cli import main
from opd.config import ConfigError, check_resources, load_config
from opd.objectives import build_objective
from opd.objectives.base import LossInputs
from opd.signals.sampled import TokenScores

# -- composition -------------------------------------------------------------------------------


def test_advantage_terms_are_coef_times_log_d_centered_in_each_group():
    log_d = [math.log(0.9), math.log(0.5), math.log(0.2), math.log(0.4), math.log(0.8)]
    groups = [0, 0, 1, 1, 1]
    terms = anchor_terms(log_d, groups, 0.3, "advantage")
    m0 = (log_d[0] + log_d[1]) / 2
    m1 = (log_d[2] + log_d[3] + log_d[4]) / 3
    want = [0.3 * (log_d[0] - m0), 0.3 * (log_d[1] - m0)] + [0.3 * (x - m1) for x in log_d[2:]]
    assert terms == pytest.approx(want, abs=1e-12)
    assert anchor_terms(log_d, groups, 0.0, "advantage") == [0.0] * 5
    # one sample alone in its group gets no term
    assert anchor_terms([math.log(0.3)], [7], 1.0, "advantage") == [0.0]


def test_sft_weights_are_n_softmax_of_coef_log_d():
    d = [0.9, 0.5, 0.1]
    log_d = [math.log(x) for x in d]
    w = anchor_terms(log_d, [0, 1, 2], 2.0, "weight")
    # n softmax(2 log D) = 3 D^2 / sum D^2
    total = sum(x**2 for x in d)
    assert w == pytest.approx([3 * x**2 / total for x in d])
    assert sum(w) / 3 == pytest.approx(1.0)
    assert anchor_terms(log_d, [0, 1, 2], 0.0, "weight") == pytest.approx([1.0, 1.0, 1.0])


def _inputs(B=3, T=4, seed=0, anchor=None, advantages=None):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g)).requires_grad_(True)
    old = logprobs.detach() + 0.05 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[1, 3] = 0.0
    teacher = TokenScores(logprobs_BT=-torch.rand(B, T, generator=g))
    return LossInputs(
        logprobs_BT=logprobs,
        old_logprobs_BT=old,
        mask_BT=mask,
        teacher=teacher,
        advantages_B=advantages,
        anchor_B=anchor,
    )


def _loss_and_grad(objective, x):
    out = objective(x)
    out.loss_sum.backward()
    return out, x.logprobs_BT.grad.clone()


@pytest.mark.parametrize("name", ["grpo", "trrd", "sod"])
def test_anchor_adds_to_the_group_advantage_of_the_clipped_objectives(name):
    """With an anchor term t_i the loss and gradient are those of advantages a_i + t_i."""
    a, t = torch.tensor([0.7, -0.2, -0.5]), torch.tensor([0.1, -0.3, 0.25])
    obj = build_objective(name, {})
    anchored, g1 = _loss_and_grad(obj, _inputs(anchor=t, advantages=a))
    moved, g2 = _loss_and_grad(obj, _inputs(advantages=a + t))
    torch.testing.assert_close(anchored.loss_sum, moved.loss_sum)
    torch.testing.assert_close(g1, g2)
    mask = _inputs().mask_BT
    assert float(anchored.metrics["anchor/abs_advantage"]) == pytest.approx(
        float((t.abs()[:, None] * mask).sum())
    )


def test_anchor_in_reverse_kl_sampled_against_hand_computation():
    """loss = -sum_t ratio_t (coef (log pi_T - log pi_old)_t + anchor_i), on-policy values."""
    t = torch.tensor([0.4, -0.1, -0.3])
    x = _inputs(anchor=t)
    obj = build_objective("reverse_kl", {"estimator": "sampled"})
    out, grad = _loss_and_grad(obj, x)
    y = _inputs(anchor=t)
    adv = (y.teacher.logprobs_BT - y.old_logprobs_BT) + t[:, None]
    ratio = torch.exp(y.logprobs_BT - y.old_logprobs_BT)
    want = -(ratio * adv * y.mask_BT).sum()
    want.backward()
    torch.testing.assert_close(out.loss_sum, want)
    torch.testing.assert_close(grad, y.logprobs_BT.grad)
    assert obj.anchor_use() == "advantage"
    assert build_objective("reverse_kl", {"estimator": "topk"}).anchor_use() is None


def test_sft_weights_each_sequence():
    w = torch.tensor([1.5, 0.5, 1.0])
    x = _inputs(anchor=w)
    obj = build_objective("sft", {})
    out, grad = _loss_and_grad(obj, x)
    y = _inputs()
    want = -(y.logprobs_BT * y.mask_BT * w[:, None]).sum()
    torch.testing.assert_close(out.loss_sum, want)
    torch.testing.assert_close(grad, -(y.mask_BT * w[:, None]))
    # the reported nll stays the unweighted one
    assert float(out.metrics["sft/nll"]) == pytest.approx(
        float(-(y.logprobs_BT.detach() * y.mask_BT).sum())
    )


# -- the discriminator -------------------------------------------------------------------------


def test_sentences_cut_after_each_end_and_give_the_text_back():
    text = "First 6 plus 3. So 9!  Then\n\nthe end"
    parts = sentences(text)
    assert parts == ["First 6 plus 3. ", "So 9!  ", "Then\n\n", "the end"]
    assert "".join(parts) == text
    assert sentences("") == [] and sentences("  \n") == []


def _toy(tiny_pair, n=60):
    """Expert: the tiny corpus's worked answers; policy: the same words shuffled."""
    rows = [json.loads(line) for line in tiny_pair["train"].read_text().splitlines()][:n]
    rng = random.Random(0)
    expert, policy = [], []
    for r in rows:
        messages = [{"role": "user", "content": r["question"]}]
        words = r["answer"].split()
        rng.shuffle(words)
        expert.append((messages, r["answer"]))
        policy.append((messages, " ".join(words)))
    return expert, policy


@pytest.fixture(scope="module")
def toy_disc(tiny_pair, tmp_path_factory):
    expert, policy = _toy(tiny_pair)
    disc = train(expert, policy, str(tiny_pair["teacher"]), heldout_fraction=0.3, seed=0)
    out = disc.save(tmp_path_factory.mktemp("disc") / "d")
    return disc, out, expert, policy


def test_discriminator_separates_a_separable_set_on_held_out_prompts(toy_disc):
    disc, out, _, _ = toy_disc
    held = disc.meta["metrics"]["heldout"]
    assert held["n"] >= 20 and 0 < held["n_expert"] < held["n"]
    assert held["accuracy"] >= 0.9 and held["auc"] >= 0.95
    assert held["mean_D_expert"] > held["mean_D_policy"]
    assert read_meta(out)["metrics"] == disc.meta["metrics"]


def test_scoring_is_deterministic_and_survives_save_and_load(toy_disc):
    disc, out, expert, policy = toy_disc
    items = expert[:5] + policy[:5]
    messages, texts = [m for m, _ in items], [r for _, r in items]
    first = disc.score(messages, texts)
    assert disc.score(messages, texts) == first
    assert Discriminator.load(out).score(messages, texts) == first
    assert all(0.0 < d < 1.0 for d in first)


def test_a_different_encoder_is_refused(toy_disc, tiny_pair):
    _, out, _, _ = toy_disc
    with pytest.raises(ValueError, match="differs in its .*weights"):
        Discriminator.load(out, encoder=str(tiny_pair["student"]))


def test_the_artifact_is_never_overwritten_and_damage_is_named(toy_disc, tmp_path):
    disc, out, _, _ = toy_disc
    with pytest.raises(FileExistsError):
        disc.save(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "discriminator.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        read_meta(bad)
    with pytest.raises(ValueError, match="no discriminator here"):
        read_meta(tmp_path)


# -- the recipe block and the CLI --------------------------------------------------------------


def _recipe(tiny_pair, toy_disc, *extra):
    from pathlib import Path

    recipe = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"
    base = [
        f"student.path={tiny_pair['student']}",
        f"teacher.path={tiny_pair['teacher']}",
        f"data.train_path={tiny_pair['train']}",
        f"anchor.path={toy_disc[1]}",
        "rollout.samples_per_prompt=2",
    ]
    return check_resources(load_config(recipe, [*base, *extra]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["objective.params.estimator=topk"], "no advantage or sequence weights"),
        (["rollout.samples_per_prompt=1"], "samples_per_prompt=1 must be >= 2"),
        (["anchor.path=/nonexistent/disc"], "anchor.path: .*no discriminator here"),
    ],
)
def test_anchor_block_is_checked_at_validation(tiny_pair, toy_disc, extra, message):
    with pytest.raises(ConfigError, match=message):
        _recipe(tiny_pair, toy_disc, *extra)


def test_cli_names_the_bad_line_and_refuses_an_existing_out(tiny_pair, toy_disc, tmp_path, capsys):
    bad = tmp_path / "expert.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q2"}\n')
    args = ["discriminator", "train", "--expert", str(bad), "--policy", str(bad)]
    args += ["--encoder", str(tiny_pair["teacher"])]
    assert main([*args, "--out", str(tmp_path / "d")]) == 2
    assert "line 2: no 'response' text" in capsys.readouterr().err
    assert main([*args, "--out", str(toy_disc[1])]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_fits_and_writes_the_artifact(tiny_pair, tmp_path, capsys):
    expert, policy = _toy(tiny_pair)
    files = {}
    for name, pairs in (("expert", expert), ("policy", policy)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(
            "".join(json.dumps({"prompt": m[0]["content"], "response": r}) + "\n" for m, r in pairs)
        )
    out = tmp_path / "disc"
    code = main(
        ["discriminator", "train", "--expert", str(files["expert"]), "--policy",
         str(files["policy"]), "--encoder", str(tiny_pair["teacher"]), "--heldout", "0.3",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["heldout"]["accuracy"] >= 0.9
    assert read_meta(out)["inputs"]["n_policy"] == len(policy)
