"""`InputError`: "the input is wrong", as opposed to a bug in loopdyn (docs/design.md, exit codes).

The command line turns an `InputError` into one line on stderr and exit code 1; any other
exception is a bug and keeps its traceback. It lives here, in a module that imports nothing,
so that `loopdyn.io` (which `loopdyn.models` uses) can raise it without importing torch;
`loopdyn.models.errors` re-exports it with the model-specific subclasses.
"""


class InputError(ValueError):
    """Bad input from the user: a file, a config, an option, or data that cannot be used."""
