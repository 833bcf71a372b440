"""The `kangaroo` command (also `python -m kangaroo_ext`)."""
import argparse
import sys


def _info(args):
    from .info import print_info
    print_info()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kangaroo", description="Kangaroo self-speculative decoding")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and compiled architectures").set_defaults(func=_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        print(f"kangaroo {args.command}: error: {e}", file=sys.stderr)
        return 2
