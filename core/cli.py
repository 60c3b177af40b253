"""Command line: `lora-resize inspect|convert|resize|batch ...`.

A first argument that is not a subcommand means `resize`, so the seed tool's call shape
`lora-resize CHECKPOINT LORA... -o DIR -r RECIPES` works unchanged.

Exit codes: 0 done; 2 the command line itself is wrong (argparse's own errors, a recipe, a device, a
merge weight, a dtype, an output path that can never work: a UsageError); 1 the run failed (a bad
file, a base that does not match, a folder that cannot be written now, a failed write, or a bug);
130 interrupted. A user never sees a traceback unless they ask with -vv: an unexpected exception is
one line naming its type.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from .batch import add_batch_parser
from .errors import LoraError, UsageError
from .resize_cli import add_resize_parser

log = logging.getLogger("lora_resize")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    log.setLevel(level)  # also when the host (or pytest) configured logging first


def cmd_inspect(args: argparse.Namespace) -> int:
    from .formats import read_lora
    from .inspect import format_summary, summarize

    infos = [summarize(read_lora(path, arch=args.arch)) for path in args.files]
    if args.json:
        json.dump(infos if len(infos) > 1 else infos[0], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print("\n\n".join(format_summary(info) for info in infos))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .formats import parse_dtype, read_lora, write_lora
    from .formats.writer import check_nameable
    from .metadata import file_sha256
    from .outputs import check_output_file

    try:
        dtype = parse_dtype(args.dtype)
    except LoraError as exc:
        raise UsageError(f"-t {args.dtype}: {exc.problem}", fix=exc.fix) from None
    check_output_file(args.output, overwrite=args.overwrite)  # before reading: a long read, then no place to write
    lora = read_lora(args.input, arch=args.arch)
    check_nameable(lora, args.format)
    size = write_lora(lora, args.output, convention=args.format, dtype=dtype,
                      operation="convert", sources=[{"file": os.path.basename(args.input),
                                                     "sha256": file_sha256(args.input)}],
                      overwrite=args.overwrite)
    extras = f" and {len(lora.passthrough)} entries carried as they are" if lora.passthrough else ""
    print(f"{args.output}: {len(lora)} layers{extras}, {size} bytes, {args.format} format (read back and checked)")
    return 0


FORMATS = ("kohya", "peft", "comfy", "keep")
FORMAT_HELP = ("output naming: kohya (default), peft (diffusers), comfy (ComfyUI's own) or keep (every layer and "
               "entry under the names it was read with)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    from .naming import ARCHITECTURES

    parser.add_argument("--arch", choices=tuple(ARCHITECTURES), default=None,
                        help="model family, when detection from key names and widths is not enough: "
                        + ", ".join(ARCHITECTURES))
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v summary, -vv one line per layer")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(prog="lora-resize", description="Resize, merge and convert LoRA files.")
    sub = parser.add_subparsers(dest="command")
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("inspect", help="what a LoRA file holds")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common(p)
    handlers["inspect"] = cmd_inspect

    p = sub.add_parser("convert", help="rewrite a LoRA in another naming convention or dtype (exact)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-f", "--format", default="kohya", choices=FORMATS, help=FORMAT_HELP)
    p.add_argument("-t", "--dtype", default=None, help="16, bf16 or 32 (default: as stored)")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    handlers["convert"] = cmd_convert

    add_resize_parser(sub, handlers, _add_common)
    add_batch_parser(sub, handlers, _add_common)
    return parser, handlers


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (never raises, SystemExit included)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, handlers = build_parser()
    if argv and argv[0] not in handlers and (argv[0] == "-" or not argv[0].startswith("-")):
        argv = ["resize", *argv]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage and the error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    if not args.command:
        parser.print_help()
        return 2
    verbosity = getattr(args, "verbose", 0)
    _setup_logging(verbosity)
    try:
        return handlers[args.command](args)
    except UsageError as exc:
        _traceback_if(verbosity)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LoraError as exc:
        _traceback_if(verbosity)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _traceback_if(verbosity)
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an OS failure: one line, the traceback only on request
        _traceback_if(verbosity)
        print(f"error: {unexpected(exc)}", file=sys.stderr)
        if verbosity < 2:
            print("run with -vv for the traceback", file=sys.stderr)
        return 1


def console_main() -> int:
    """The ``lora-resize`` command (and ``python -m core``): :func:`main` with torch's threads chosen for
    the command (core.devices.console_threads); ``main`` alone, as a library call, leaves them as they are."""
    from .devices import console_threads

    console_threads()
    return main()


def unexpected(exc: BaseException) -> str:
    """One line for an exception that is not the project's own: its type and its message."""
    message = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {message[:500]}"


def _traceback_if(verbosity: int) -> None:
    if verbosity >= 2:
        traceback.print_exc(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(console_main())
