"""The one exception type the CLI prints as a user mistake (one line, exit code 2)."""


class UserError(RuntimeError):
    """Something the user can fix: a missing bootstrap, a stage that kept nothing."""
