"""Logging for the command-line tools: one format, and the ``--log-level`` option they all share."""

from __future__ import annotations

import argparse
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` (INFO by default) to a command's parser."""
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr with the package's format, unless the caller (e.g. the ``fedbrats`` command) already did."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    else:
        logging.getLogger("fedbrats").setLevel(level)
