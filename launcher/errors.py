"""The one exception type that means "the user's input is wrong" (exit code 2, no traceback)."""


class UserError(Exception):
    """A problem with the job spec, an override or an input file; the message names the field or file."""
