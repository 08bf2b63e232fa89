"""Errors in what the user gave (a config value, a data row, a model folder), as opposed to
bugs: the command line reports these as one ``error:`` line with exit code 2, never a trace."""


class UserError(ValueError):
    """Bad input: the message names the config key, or the file, row and field."""
