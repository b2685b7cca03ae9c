"""Error types of the `tools` subcommands; the class lives below every layer (autodl_core.errors) so
that the dataset I/O and the store can raise it too."""
from autodl_core.errors import UserInputError

__all__ = ["UserInputError"]
