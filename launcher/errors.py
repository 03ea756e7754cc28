"""The one user-error type: every stage raises it for a user's mistake, and every command turns
it into one line per problem ("what, where, how to fix") and exit code 2. Anything else is an
internal error and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A user's mistake: one or more lines, each saying what, where and how to fix."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP reached `launch`: the command stops what it started, then ends."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(signal.Signals(signum).name)
