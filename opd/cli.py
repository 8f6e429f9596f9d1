"""`opd train | validate RECIPE.yaml [dotted.key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from opd.config import ConfigError, check_resources, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "run a recipe (resumes from its latest checkpoint)"),
        ("validate", "check a recipe without starting anything"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe")
        p.add_argument("overrides", nargs="*", help="dotted.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    from opd.loop import train

    run_dir = train(cfg)
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
