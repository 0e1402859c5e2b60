"""The exceptions whose message is all the user needs: no traceback."""


class UserError(Exception):
    """A problem with the job spec, an override or an input file (exit code 2); the message names the field or file."""


class RunError(Exception):
    """The run could not go on for a reason outside the spec (a full disk, a loss that is not finite): exit 1."""
