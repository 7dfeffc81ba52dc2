"""The error type the command line turns into a one-line message and exit status 2, and the one way of making a
message one line: :func:`one_line` for text, :func:`describe` for an exception, :func:`short_repr` for a quoted value.

Kept free of heavy imports so that the CLI can name it without loading torch.
"""

import reprlib


class HaganError(ValueError):
    """A problem with the user's input (file, argument, config) described in one line."""


#: Longest message the command line prints for an error; longer ones are cut (a quoted value can be megabytes).
MESSAGE_LIMIT = 300


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters with '...'."""
    flat = " ".join(str(text)[: 4 * limit].split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe(err: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    """An exception as one line of at most ``limit`` characters: a HaganError by its message (written for the
    user), anything else by its type and message (``ValueError: ...``), so that an unexpected failure is told
    apart from a refusal."""
    text = str(err) if isinstance(err, HaganError) else f"{type(err).__name__}: {err}"
    return one_line(text, limit)


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting a user's value in a message.

    A value from a hostile file may be huge, deeply nested or self-referencing: reprlib bounds the work (a few
    items per level, a few levels), and a repr that fails (an int too long to print) gives the type's name.
    """
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxstring, bounded.maxother, bounded.maxlong = 3, limit, limit, limit
    bounded.maxdict = bounded.maxlist = bounded.maxtuple = bounded.maxset = 4
    try:
        text = bounded.repr(value)
    except Exception:  # a failing repr must not hide the error being reported
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
