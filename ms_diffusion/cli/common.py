"""What every command shares: one-line errors (``--debug`` for the traceback) and runtime set-up."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional

__all__ = ["run_command", "add_runtime_args", "parse_key_values", "UsageError"]


class UsageError(ValueError):
    """A bad combination of command-line arguments."""


def parse_key_values(items: List[str], what: str = "--option") -> Dict[str, Any]:
    """``["order=3", "karras=true"]`` -> {"order": 3, "karras": True} (values read as YAML; '-' in keys -> '_')."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{what} {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="auto (default), CPU, GPU or Ascend")
    parser.add_argument("--mode", default=None, choices=("graph", "pynative"),
                        help="graph: compile the hot functions with ms.jit (default); pynative: eager, for debugging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line and exit code 2, like ours
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


def run_command(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
                argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` and run ``main``; user errors become one line on stderr and a non-zero exit."""
    args = parser.parse_args(argv)
    try:
        return int(main(args) or 0)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as err:
        if args.debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug or a framework failure: say so in one line, keep the trace for --debug
        if args.debug:
            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{parser.prog}: error: {type(err).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
