"""Signal set-up for tests that send a child a Ctrl-C."""

from __future__ import annotations

import signal


def ctrl_c_reaches_it() -> None:
    """`preexec_fn` of a child the test sends SIGINT, as a terminal's foreground job gets it.
    A test run started in the background of a non-interactive shell inherits SIGINT ignored
    (POSIX), Python keeps it ignored, and the child would run on, exit 0, and fail the test
    for a reason of the runner's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
