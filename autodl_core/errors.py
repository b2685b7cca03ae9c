"""Errors shared by every layer: a user's bad input, reported as a clear message (the `tools` command
line prints it and exits 2). A leaf module: anything may import it."""


class UserInputError(ValueError):
    """Bad input from the user (missing folder, wrong label width...): printed as a clear message, exit 2."""
