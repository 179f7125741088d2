"""The ``cattn`` logger: a default handler whose lines name the logger, and the verbosity setting.

The level comes from ``CATTN_LOG_LEVEL`` (a name such as ``info`` or a number; default ``warning``)
and `set_verbosity`. The default handler writes to stderr only while the application has configured
no logging of its own: once the root logger has a handler, records go there alone (no line twice).
"""
from __future__ import annotations

import logging
import os

LEVEL_ENV = "CATTN_LOG_LEVEL"
FORMAT = "[%(name)s] %(levelname)s: %(message)s"
logger = logging.getLogger("cattn")


def _level(value: str | int, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{argument} must be a level name or number, got {type(value).__name__}")
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise ValueError(f"{argument} must be one of debug, info, warning, error, critical or a number; "
                         f"got {value!r}")
    return level


def set_verbosity(level: str | int) -> None:
    """Set the level of every ``cattn`` logger: ``"debug"``, ``"info"``, ``"warning"`` (the default),
    ``"error"``, ``"critical"`` or a `logging` number."""
    logger.setLevel(_level(level, "level"))


def _install() -> None:
    if any(getattr(h, "cattn_default", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(lambda record: not logging.getLogger().handlers)
    handler.cattn_default = True
    logger.addHandler(handler)
    logger.setLevel(_level(os.environ.get(LEVEL_ENV) or "warning", LEVEL_ENV))


_install()
