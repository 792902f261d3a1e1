"""One logger setup for every job, plus a warn-once helper."""

from __future__ import annotations

import logging
import os
import sys

_WARNED: set[str] = set()


def get_logger(name: str = "ditharos") -> logging.Logger:
    """The project logger; configured once (level from DITHAROS_LOG_LEVEL, default INFO)."""
    root = logging.getLogger("ditharos")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("DITHAROS_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return root if name == "ditharos" else root.getChild(name.removeprefix("ditharos."))


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log `message` as a warning the first time it is seen in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)
