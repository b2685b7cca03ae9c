"""Error types shared by the `tools` subcommands (a leaf module, so any tools module can import it without cycles)."""


class UserInputError(ValueError):
    """Bad input from the user (missing folder, wrong label width...): printed as a clear message, exit 2."""
