"""Loggers of the supervisor side.

A library is silent unless its user configures logging: the ``sandbox`` logger gets a
``NullHandler`` here, not in the package's ``__init__``, which every zygote imports (the
``logging`` module brings ``threading``, whose fork hook would run in every worker's birth).
"""

from __future__ import annotations

import logging

__all__ = ["get_logger"]

logging.getLogger("sandbox").addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, with the package's ``NullHandler`` in place."""
    return logging.getLogger(name)
