"""Exceptions raised by dfrn.

Every error that a user can cause by bad input is a :class:`DfrnInputError`. Its message
is one line that names the subject, file or column at fault; the command-line interface
prints it without a traceback and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Sequence


class DfrnError(Exception):
    """Base class of every dfrn error."""


class DfrnInputError(DfrnError, ValueError):
    """Bad user input: a cohort table, image, config or results folder that cannot be used."""


class ResultsFolderError(DfrnInputError):
    """A results folder that holds a different run and must not be overwritten."""


class ResultsIntegrityError(DfrnError):
    """Finished work that fails its check: a missing prediction, or a file that changed."""


class DiskSpaceError(DfrnError, OSError):
    """The disk (or quota) ran out while dfrn was writing a file."""

    def __str__(self) -> str:
        return str(self.strerror or super().__str__())


class PrepFailedError(DfrnError):
    """``dfrn prep`` finished, but one or more subjects failed (listed in ``qc.tsv``)."""


#: Exceptions a task is retried on, by Ray or SLURM (besides its worker or job dying); user
#: errors never are.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


def listed(items: Sequence[object], limit: int = 5, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, then `` and N more``: for one-line errors."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(str(x) for x in list(items)[:limit]) + more
