"""The `loopdyn` command line.

Exit codes (docs/design.md §6): 0 success; 1 bad input, a full disk, or an internal error (one
line on stderr, no traceback); 2 usage; 3 `--strict` and the verdict is not `stable`; 130
interrupted (Ctrl-C, at any moment, also while PyTorch is still importing).

Nothing a user can cause prints a traceback. An internal error (a bug in loopdyn) prints one line
and how to get the traceback: `--debug` (anywhere on the command line) or LOOPDYN_DEBUG=1.

This module imports nothing heavy at the top: the console script imports it before `main` runs,
and only inside `main` can a Ctrl-C during the PyTorch import be turned into exit 130.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_UNSTABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEBUG_ENV = "LOOPDYN_DEBUG"


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("loopdyn")
    except Exception:  # not installed (run from a source tree)
        return "unknown"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help shows its default: appended as "(default: X)" unless the help text
    already says what the default is. Flags (store_true) are off by default and say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is argparse.SUPPRESS or not action.option_strings
                or action.required):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                               argparse._VersionAction, argparse._StoreConstAction)):
            return text
        default = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {default})".strip()


def build_parser() -> argparse.ArgumentParser:
    from loopdyn.commands import COMMANDS
    import importlib

    parser = argparse.ArgumentParser(
        prog="loopdyn", formatter_class=HelpFormatter,
        description="Stability of looped language models: train, audit, compare, alert.",
    )
    parser.add_argument("--version", action="version", version=f"loopdyn {version()}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an internal error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    real_add = sub.add_parser

    def add_parser(name, **kwargs):  # every subcommand: the same formatter and a --debug flag
        kwargs.setdefault("formatter_class", HelpFormatter)
        p = real_add(name, **kwargs)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=f"show the traceback of an internal error (or set {DEBUG_ENV}=1)")
        return p

    sub.add_parser = add_parser
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"loopdyn.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"loopdyn.commands.{name}":
                continue  # a command that is not built yet
            raise
        module.register(sub)
    return parser


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _name(argv: list[str]) -> str:
    words = [a for a in argv if not a.startswith("-")]
    return f"loopdyn {words[0]}" if words else "loopdyn"


_interrupted = False  # set by the first Ctrl-C / SIGTERM: errors after it are its consequences
_deferred = False  # while heavy modules import, a Ctrl-C is recorded, not raised (see _heavy_imports)
_name_now = "loopdyn"


def _interrupt(signum, frame):  # SIGINT and SIGTERM: unwind, so temporary files are removed
    global _interrupted
    if _deferred:
        if _interrupted:  # a second Ctrl-C while PyTorch imports: stop now
            _exit_interrupted(_name_now)
        _interrupted = True
        return
    _interrupted = True
    raise KeyboardInterrupt


def _exit_interrupted(name: str) -> None:
    """One line, exit 130, nothing more: no atexit handler, no late warning can print after it."""
    try:
        sys.stderr.write(f"{name}: interrupted\n")
    except (OSError, ValueError):
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_INTERRUPTED)


def _late_interrupt(signum, frame):  # the work is done and the process exits: a Ctrl-C now ends it at once
    _exit_interrupted(_name_now)


def _quiet_after_interrupt() -> None:
    """Once interrupted, exceptions that Python would report as 'Exception ignored in ...' (in a
    destructor, an atexit callback) or from a thread are consequences of the interrupt: silent."""
    unraisable, thread_hook = sys.unraisablehook, __import__("threading").excepthook

    def on_unraisable(info):
        if not _interrupted:
            unraisable(info)

    def on_thread(args):
        if not (_interrupted or issubclass(args.exc_type, KeyboardInterrupt)):
            thread_hook(args)

    sys.unraisablehook = on_unraisable
    __import__("threading").excepthook = on_thread


def _heavy_imports() -> None:
    """Import PyTorch (and loopdyn's models) with Ctrl-C deferred: a KeyboardInterrupt raised
    inside PyTorch's import can end in a C++ std::terminate or be swallowed by an import guard;
    recorded instead, it becomes exit 130 right after the import."""
    global _deferred
    _deferred = True
    try:
        import torch  # noqa: F401
        import loopdyn.models.errors  # noqa: F401
    finally:
        _deferred = False
    if _interrupted:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code. Called without `argv` (as the program), an
    interrupted run ends the process at once with 130 after its clean-up, so nothing left
    half-imported by the interrupt can print at interpreter exit."""
    global _interrupted, _name_now
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _name_now = _name(argv)
    debug = _debug(argv)
    _interrupted = False
    if as_program:
        _quiet_after_interrupt()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if current in (signal.SIG_DFL, signal.default_int_handler):  # never override SIG_IGN or a user's
            try:
                previous[sig] = signal.signal(sig, _interrupt)
            except ValueError:  # not the main thread
                pass
    try:
        code = _main(argv, name, debug)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException:
        if not _interrupted or debug:
            raise
        code = EXIT_INTERRUPTED  # e.g. a module left half-imported by the Ctrl-C
    finally:
        for sig, handler in previous.items():
            # as the program, a Ctrl-C after the work (while the interpreter exits) ends it at once
            signal.signal(sig, _late_interrupt if as_program else handler)
    if code == EXIT_INTERRUPTED:
        if as_program:
            _exit_interrupted(name)
        print(f"{name}: interrupted", file=sys.stderr)
    return code


def _main(argv: list[str], name: str, debug: bool) -> int:
    global _name_now
    from loopdyn.allocator import keep_freed_memory

    keep_freed_memory()  # freed activations kept for the next pass (loopdyn/allocator.py)
    _heavy_imports()
    from loopdyn.models.errors import InputError

    try:
        args = build_parser().parse_args(argv)
        name = _name_now = f"loopdyn {args.command}"
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        raise
    except InputError as err:
        if debug:
            raise
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # e.g. `loopdyn audit ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except MemoryError:
        if debug:
            raise
        print(f"{name}: error: out of memory", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        if debug:
            raise
        from loopdyn.io import describe_os_error

        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"{name}: error: {describe_os_error(err)}{where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback on request
        if debug or _interrupted:
            raise
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        if "out of memory" in text.lower() or "can't allocate memory" in text.lower():
            print(f"{name}: error: out of memory ({text})", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{name}: internal error: {type(err).__name__}: {text} "
              f"(run again with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return EXIT_BAD_INPUT
