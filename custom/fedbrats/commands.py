"""The command line's one runner: a command's parser, logging, and errors turned into one line and an exit code.

Every ``fedbrats`` command (``fedbrats evaluate``, ``fedbrats prepare``, ...) is a module with ``add_arguments(parser)``
and ``run(args) -> int``; :mod:`fedbrats.cli` lists them in one table and runs the chosen one through
:func:`run_command`, which each module's ``main(argv)`` (``python -m``, tests) calls too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from fedbrats.logging_setup import add_log_level_argument, configure_logging

logger = logging.getLogger("fedbrats")

#: Errors that mean "wrong options, files or data": said in one line (the message names the fix), exit status 1.
USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)
#: Exit status of a command stopped with Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def command_parser(name: str, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``fedbrats <name>`` (or ``prog``), with the ``--log-level`` option every command has."""
    parser = argparse.ArgumentParser(prog=prog or f"fedbrats {name}", description=description)
    add_log_level_argument(parser)
    return parser


def run_command(
    name: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> int:
    """Parse ``argv`` for command ``name``, configure logging, run it, and map its errors to an exit status.

    Returns:
        What ``run`` returns (0 when it returns None); 1 after one logged line for a usage error
        (:data:`USAGE_ERRORS`); :data:`INTERRUPTED` after Ctrl-C. argparse itself exits with 2 on bad options.
    """
    parser = command_parser(name, description, prog)
    add_arguments(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    configure_logging(args.log_level)
    try:
        return int(run(args) or 0)
    except USAGE_ERRORS as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("fedbrats %s: interrupted", name)
        return INTERRUPTED


__all__ = ["INTERRUPTED", "USAGE_ERRORS", "command_parser", "run_command"]
