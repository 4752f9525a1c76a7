"""Failpoints: named places where a test can slow a real node down (etcd's gofail, reduced).

A node reads ``KEVO_REPL_FAILPOINTS`` from its environment once, as ``name=seconds[,...]``;
each name is a place in the code that waits that long when it is set. Unset (production) the
check is one lookup in an empty dict. A malformed value is a ConfigError (the node exits 2).

Failpoints:

* ``snapshot_chunk_delay``: a primary waits this long before each snapshot chunk, so a test can
  interrupt a bootstrap halfway.
"""

from __future__ import annotations

import functools
import math
import os

from kevo_repl.errors import ConfigError

ENV = "KEVO_REPL_FAILPOINTS"
KNOWN = frozenset({"snapshot_chunk_delay"})


@functools.cache
def active() -> dict[str, float]:
    return parse(os.environ.get(ENV, ""))


def parse(text: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in KNOWN:
            raise ConfigError(
                f"{ENV}: {item!r} is not name=seconds with a name among {', '.join(sorted(KNOWN))}"
            )
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(f"{ENV}: {name} needs a number of seconds, got {value!r}") from None
        if not 0 <= seconds < math.inf:
            raise ConfigError(f"{ENV}: {name} must be a finite, non-negative number of seconds")
        points[name] = seconds
    return points


def delay_s(name: str) -> float:
    """How long the failpoint `name` waits (0.0 when it is not set)."""
    return active().get(name, 0.0)
