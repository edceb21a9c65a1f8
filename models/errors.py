"""Errors that mean "the input is wrong", as opposed to a bug in loopdyn.

The command line turns an `InputError` into one line on stderr and exit code 1; any other
exception is a bug and keeps its traceback. Every package (models, dynamics, probes, loopdyn)
raises subclasses of `InputError` for bad user input.
"""

from loopdyn.errors import InputError  # defined without imports, for loopdyn.io

__all__ = ["InputError", "ConfigError", "CheckpointError"]


class ConfigError(InputError):
    """A model configuration that is invalid or inconsistent."""


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable, unsafe or does not match its config."""
