"""The runner's one error type: a problem with what it was given (exit status 2).

Not tools.errors.UserInputError: that class lives in autodl_core, and the runner must not import the
solver's packages (under `tools package --verify` they would look like imports the submission made from
outside its own files). `tools kit` turns a KitRunError into a UserInputError.
"""


class KitRunError(Exception):
    """A usage or setup problem: no kit, a dataset folder that is not kit-style, no model.py, ..."""
