"""Named crash points for crash tests: `failpoint("name")` kills the process on the spot (as `kill -9`
would: no cleanup, no flush) when the environment variable FAILPOINTS lists that name. Unset in
production, where each call costs one dictionary lookup."""

from __future__ import annotations

import os

_ARMED = frozenset(filter(None, os.environ.get("FAILPOINTS", "").split(",")))


def failpoint(name: str) -> None:
    if name in _ARMED:
        os._exit(137)  # the status of a SIGKILLed process, as the tests expect from a crash
