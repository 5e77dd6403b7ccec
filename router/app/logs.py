"""Logging for the CLI and for every Ray worker the CLI starts.

Ray runs `setup_worker_logging` in each worker process before it imports anything
of ours (`worker_process_setup_hook`), so replicas and the router log at the level
given to `kvroute up --log-level`; with `log_to_driver` their lines reach the
terminal that started them.
"""

from __future__ import annotations

import logging
import os

LOG_LEVEL_ENV = "KVROUTE_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "WARNING"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Send records at `level` and above to stderr; replaces any earlier setup."""
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    logging.basicConfig(level=level.upper(), format=_FORMAT, force=True)


def setup_worker_logging() -> None:
    """The Ray worker hook: the level the driver chose, through the environment."""
    configure_logging(os.environ.get(LOG_LEVEL_ENV, DEFAULT_LOG_LEVEL))


def ray_runtime_env(level: str) -> dict[str, object]:
    """The runtime environment that gives every worker of a job this log level."""
    return {
        "env_vars": {LOG_LEVEL_ENV: level.upper()},
        "worker_process_setup_hook": f"{__name__}.setup_worker_logging",
    }
