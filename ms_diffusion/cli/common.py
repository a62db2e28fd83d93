"""What every command shares: errors as their whole message without a traceback (``--debug`` for it), runtime set-up."""
from __future__ import annotations

import argparse
import errno
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional

__all__ = ["run_command", "add_runtime_args", "add_prompt_args", "read_prompts", "parse_key_values", "UsageError"]


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


def add_prompt_args(group) -> None:
    """--prompt (repeatable), --prompts-file and --negative-prompt on a parser or argument group."""
    group.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    group.add_argument("--prompts-file", default=None, help="a text file of prompts, one per line")
    group.add_argument("--negative-prompt", default=None, help="what guidance steers away from (default: nothing)")


def read_prompts(args: argparse.Namespace) -> List[str]:
    """The prompts of --prompt and then --prompts-file (its non-blank lines), in order."""
    from pathlib import Path

    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def refuse_text_args(prompts: List[str], negative_prompt: Optional[str], text: bool, others: str = "") -> None:
    """Prompts (or a negative prompt) for a model that takes no text are a usage error; ``others``: what else
    of this command takes them (e.g. " or a Stable Diffusion model")."""
    if (prompts or negative_prompt is not None) and not text:
        raise UsageError(f"--prompt / --prompts-file / --negative-prompt need a text-conditional model (trained with "
                         f"diffusion.text){others}; this checkpoint's model takes no text")


def generation_options(args: argparse.Namespace, sample: Any, classes: Optional[List[int]], text: bool,
                       prompts: Optional[List[str]] = None) -> Dict[str, Any]:
    """``pipeline.generate``'s options for a run: its ``sample:`` section overridden by --sampler / --steps / --eta /
    --guidance-scale / --guidance-rescale (and --negative-prompt and ``prompts``, one per image, for a ``text``
    model); guidance needs ``classes`` (one per image) or text."""
    sampling = sample.generate_options(classes is not None, text=text, sampler=args.sampler, steps=args.steps,
                                       eta=args.eta, guidance_scale=args.guidance_scale,
                                       guidance_rescale=args.guidance_rescale,
                                       **({"negative_prompt": args.negative_prompt} if text else {}))
    if sampling["guidance_scale"] != 1.0 and classes is None and not text:
        raise UsageError("--guidance-scale needs a class- or text-conditional model")
    if text:
        sampling["prompts"] = list(prompts or [])
    return sampling


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="auto (default), CPU, GPU or Ascend")
    parser.add_argument("--mode", default=None, choices=("graph", "pynative"),
                        help="graph: compile the hot functions with ms.jit (default); pynative: eager, for debugging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: no usage dump, exit code 2, like ours
        self.exit(2, f"{self.prog}: error: {message}\n")


def error_message(err: BaseException) -> str:
    """Every line of ``err``'s message, less MindSpore's C++ call stack (a framework trailer, not a message)."""
    lines = str(err).strip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("- C++ Call Stack"):
            lines = lines[:i - 1 if i and set(lines[i - 1].strip()) == {"-"} else i]
            break
    return "\n".join(lines).strip()


_OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space there or write elsewhere",
    errno.EROFS: "that file system is read-only: write elsewhere",
}


def os_error_message(err: OSError) -> str:
    """``err`` as one message that names its file (when it has one) and, for a full or read-only disk, the fix."""
    if err.strerror is None:
        text = error_message(err) or type(err).__name__
    elif err.filename and str(err.filename) in err.strerror:
        text = err.strerror
    elif err.filename:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = err.strerror
    hint = _OS_ERROR_HINTS.get(err.errno)
    return f"{text} ({hint})" if hint else text


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


def run_command(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
                argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` and run ``main``; a user error prints its whole message (no traceback) and exits non-zero."""
    args = parser.parse_args(argv)
    try:
        return int(main(args) or 0)
    except KeyboardInterrupt as err:   # training.interrupt.Interrupted carries its signal: 130 SIGINT, 143 SIGTERM
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return int(getattr(err, "exit_code", 130))
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"{parser.prog}: error: {error_message(err) or type(err).__name__}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only file system, an I/O error: the user's to fix, at that path
        if args.debug:
            traceback.print_exc()
        print(f"{parser.prog}: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug or a framework failure: say so, keep the trace for --debug
        if args.debug:
            traceback.print_exc()
        print(f"{parser.prog}: error: {type(err).__name__}: {error_message(err)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
