"""Errors carry the one line a user should read; each role's entry point prints it."""
from dkvm import log


class DkvmError(Exception):
    """A failure with a user-facing message and the exit code to leave with."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def run_role(body, argv):
    """Run a role's body, turning a DkvmError into its one line and its exit code."""
    import sys
    try:
        code = body(argv)
    except DkvmError as err:
        log.warn(err.message)
        code = err.exit_code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code or 0)
