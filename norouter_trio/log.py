"""Logging set-up: one line per event on stderr.

The manager prefixes a timestamp; an agent does not, because the manager relays its stderr
into its own log (``stderr[NAME(VIP)]: LINE``) and would stamp it twice.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(debug: bool = False, *, agent: bool = False) -> None:
    fmt = "%(levelname)s: %(message)s" if agent else \
        "%(asctime)s %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Third-party chatter (trio-websocket, ...) stays at INFO even with --debug.
    for name in ("trio-websocket", "trio_websocket"):
        logging.getLogger(name).setLevel(logging.INFO)
