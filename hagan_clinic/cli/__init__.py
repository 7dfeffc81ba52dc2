"""The ``hagan-clinic`` command line. Thin: parse flags, load the config, call one ``run(...)``, print its
``summary()`` to stdout. Heavy imports live inside the commands, so ``--help`` loads no torch.

Exit status: 0 done; 2 bad arguments, config, checkpoint or input, or a file the machine refuses (disk full,
read-only, no permission), in one line of at most 300 characters on stderr; 1 out of memory (with advice that fits
the command) or an unexpected internal error (one line; set HAGAN_CLINIC_DEBUG=1 for the traceback); 130
interrupted.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click

from ..errors import MESSAGE_LIMIT, HaganError, describe, one_line
from ..io.logs import configure, quiet_readers

# each module attaches its commands to the group (imported as X as X: a deliberate re-export)
from . import analysis as analysis
from . import cohort as cohort
from . import model as model
from .group import cli

__all__ = ["cli", "main"]

#: What to try when a command runs out of memory, by command (only generate and evaluate have --slab).
MEMORY_ADVICE = {
    "generate": "generate with --slab 4 (or smaller) to bound it",
    "evaluate": "use --slab 4 (or smaller) and a smaller --batch-size",
    "encode": "use --batch-size 1 and fewer --workers",
    "preprocess": "use fewer --workers",
    "qct": "use fewer --workers",
    "phantoms": "use a smaller --shape or fewer --workers",
    "train": "use a smaller train.batch_size or model.size (--set)",
    "augment": "use a smaller augment.batch_size or a larger augment.downsample (--set)",
}
#: OS errors that say the machine refused a file (a full, read-only or forbidden disk), not that our code is wrong.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
ACCESS_ERRORS = {errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EIO, errno.ELOOP,
                 errno.EMFILE, errno.ENFILE}  # fmt: skip


def _command_name(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), "")


def _disk_error(err: BaseException) -> OSError | None:
    """The OSError of a refused file in ``err`` or its chain (torch wraps a failed write in a RuntimeError)."""
    cause: BaseException | None = err
    for _ in range(4):
        if cause is None:
            return None
        if isinstance(cause, OSError) and cause.errno in WRITE_ERRORS | ACCESS_ERRORS:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _disk_message(err: OSError) -> str:
    verb = "write" if err.errno in WRITE_ERRORS else "access"
    name = f" {Path(os.fsdecode(err.filename)).name}" if err.filename else ""
    return f"cannot {verb}{name}: {err.strerror or os.strerror(err.errno or 0)}"


def _say(line: str) -> None:
    click.echo(one_line(line), err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and documented exit codes instead of tracebacks."""
    prog = "hagan-clinic"
    for stream in (sys.stdout, sys.stderr):  # an argument with bytes that are no UTF-8 must print, not crash
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    quiet_readers()
    configure(0)  # --quiet / --verbose, on the group or the command, change it while the flags are parsed
    try:
        args = sys.argv[1:] if argv is None else list(argv)
        cli.main(args=args, prog_name=prog, standalone_mode=False, obj={"argv": args})
        return 0
    except click.exceptions.Abort:
        _say(f"{prog}: interrupted")
        return 130
    except click.ClickException as err:
        hint = ""
        if isinstance(err, click.UsageError) and err.ctx is not None:
            hint = f" (see '{err.ctx.command_path} --help')"
        message = one_line(err.format_message(), MESSAGE_LIMIT - len(prog) - len(hint) - 9)
        _say(f"{prog}: error: {message}{hint}")
        return err.exit_code
    except HaganError as err:
        _say(f"{prog}: error: {err}")
        return 2
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return 130
    except Exception as err:  # an unexpected failure still ends in one line unless asked for more
        if os.environ.get("HAGAN_CLINIC_DEBUG"):
            raise
        refused = _disk_error(err)
        if refused is not None:
            _say(f"{prog}: error: {_disk_message(refused)}")
            return 2
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
            advice = MEMORY_ADVICE.get(_command_name(argv))
            _say(f"{prog}: error: out of memory" + (f"; {advice}" if advice else ""))
            return 1
        _say(f"{prog}: internal error: {describe(err, 200)} (HAGAN_CLINIC_DEBUG=1 shows the traceback)")
        return 1
