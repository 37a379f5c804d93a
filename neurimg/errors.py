"""The one domain exception (library code raises it; only the CLI turns it into exit codes),
and the wording every message shares."""

import os


class NeurimgError(Exception):
    """A problem the user can fix (bad input, bad option, damaged file).

    `exit_code` is 2 for usage and input errors; other failures (e.g. divergence) use 1.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


def count(n: int, noun: str) -> str:
    """'1 image', '3 images': a number and its noun, singular or plural."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summarised(lines: list[str], limit: int = 3) -> list[str]:
    """At most `limit` of `lines`, then one line for the rest ("... and 997 more like these")."""
    if len(lines) <= limit:
        return list(lines)
    return lines[: limit - 1] + [f"... and {len(lines) - limit + 1} more like these"]


def missing(path: os.PathLike | str, what: str = "file or folder") -> NeurimgError:
    """The error for a path that does not exist: a link that leads nowhere says so (a loop or a
    dangling target), rather than "no such file"."""
    if os.path.islink(path):
        return NeurimgError(f"{path}: a symbolic link that leads nowhere (a loop, or its target is gone)")
    return NeurimgError(f"{path}: no such {what}")
