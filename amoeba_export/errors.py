"""User-facing errors.

Everything a user can get wrong (a bad shape, a missing file, a strategy for another model) raises
`UserError`; the CLI prints its one line and exits with code 2. Anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""

    exit_code = 2
