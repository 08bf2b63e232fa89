"""Errors in what the user gave (a config value, a data row, a model folder), as opposed to
bugs: the command line reports these as one ``error:`` line with exit code 2, never a trace."""


from collections.abc import Iterator


class UserError(ValueError):
    """Bad input: the message names the config key, or the file, row and field."""


def chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err``, then what it was raised from or during, innermost last (each once)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
