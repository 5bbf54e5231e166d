"""One way to read a command line, shared by every entry point (``python -m pipeline.<stage>`` and the
``plw-*`` console scripts).

A command line is: an optional command (``sweep run|status``, ``analysis regress|collect|suggest``),
options (``--dry-run``, ``--force``, ...; argparse, so ``--help`` lists them) and Hydra overrides
(``key=value``, ``group=option``, ``+key=value``). The config is composed and validated once
(:func:`compose`), then the entry point passes the typed sections inward.

Errors the user can fix end the command with one line on stderr and no traceback: exit 2 for a bad
command line or configuration, 1 for bad input data or a failed stage (:func:`run`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence, Tuple, Type

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import Config, ConfigError, compose_config, config_error, validate

# Errors in the command line or the configuration (exit 2).
CONFIG_ERRORS: Tuple[Type[BaseException], ...] = (ConfigError, HydraException, OmegaConfBaseException)


class UsageError(ValueError):
    """A bad command line (exit 2)."""


def parser(
    prog: str, doc: Optional[str], commands: Sequence[str] = (), default_command: Optional[str] = None
) -> argparse.ArgumentParser:
    """An argparse parser with the module docstring as its help and, if given, a command argument."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if commands:
        ap.add_argument(
            "command", choices=list(commands), help=f"default: {default_command}" if default_command else None
        )
        ap.set_defaults(_default_command=default_command)
    return ap


def parse(ap: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, list]:
    """Options and command from ``argv`` (default ``sys.argv[1:]``); the rest must be Hydra overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    default = ap.get_default("_default_command")
    if default is not None:  # no command given: the first word that is not an option is an override
        words = [a for a in argv if not a.startswith("-")]
        if not words or "=" in words[0]:
            argv = [default, *argv]
    args, rest = ap.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        ap.error(f"unrecognised arguments {bad} (overrides are key=value; see --help)")
    return args, rest


def compose(overrides: Sequence[str]) -> Tuple[DictConfig, Config]:
    """The composed config and its validated, typed form (raises :class:`ConfigError`, one line naming
    the key: an unknown key however it is spelled, ``+key=value`` included, a wrong type, a missing or
    out-of-range value)."""
    cfg = compose_config(list(overrides))
    return cfg, validate(cfg)


def setup_logging(level: int = logging.INFO, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=logging.WARNING, format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger("pipeline").setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(body: Callable[[], int], user_errors: Tuple[Type[BaseException], ...] = ()) -> int:
    """Call ``body``; configuration errors print one line and give 2, ``user_errors`` one line and 1."""
    try:
        return int(body() or 0)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CONFIG_ERRORS as e:
        print(f"error: {config_error(e)}", file=sys.stderr)  # one line naming the key
        return 2
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
