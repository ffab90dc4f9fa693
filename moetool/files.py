"""Files the user names: the one output writer every `-o`-like option uses, the check of an output
location before the work starts, and bounded reads of input files.

Writing (`write_output`):
- a regular file (or a new one) is written atomically: a temporary `.moetool-*` file beside the
  real target (symlinks followed), flushed, given the existing file's mode (or, for a new file,
  0666 less the umask, as `open()` would), then renamed over it; any failure, SIGTERM included
  (the CLI turns it into an exception), removes the temporary file and leaves the target as it was;
- anything else that exists (a device such as /dev/full or /dev/stdout, a FIFO, a socket) is
  written in place: renaming over it would replace the device or pipe with a regular file;
- every OSError becomes one line (`MoetoolError`, exit 2) naming the path and the reason.

Reading (`read_bounded`): at most `limit` bytes, so `--file /dev/zero` fails in one line instead
of growing without bound.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import Optional

from .errors import MoetoolError

TEMP_PREFIX = ".moetool-"
MAX_TEXT_BYTES = 256 * 1024 * 1024  # prompts, calibration text, traces, baselines


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device (disk full)"
    return e.strerror or e.__class__.__name__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _target(path: str, say: str) -> Optional[os.stat_result]:
    """The stat of an output target (None: it does not exist yet); a directory is refused."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MoetoolError(f"{say}: {_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MoetoolError(f"{say}: is a directory; name a file")
    return st


def check_output(path: str, flag: str = "-o") -> None:
    """Refuse an output location that cannot work, before any computation: a directory, a missing
    or unwritable parent directory, an existing file that may not be written."""
    if not path:
        raise MoetoolError(f"{flag}: empty path")
    st = _target(path, f"{flag} {path}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        if not os.access(path, os.W_OK):
            raise MoetoolError(f"{flag} {path}: permission denied")
        return  # a device or FIFO: written in place
    real = os.path.realpath(path)
    directory = os.path.dirname(real) or "."
    if not os.path.isdir(directory):
        raise MoetoolError(f"{flag} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise MoetoolError(f"{flag} {path}: directory {directory} is not writable (permission denied)")
    if st is not None and not os.access(real, os.W_OK):
        raise MoetoolError(f"{flag} {path}: permission denied (the file is read-only)")


def write_output(path: str, data: bytes) -> None:
    """Write `data` to `path`: atomically for a regular file, in place for a device or FIFO."""
    st = _target(path, f"cannot write {path}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        _write_in_place(path, data)
        return
    real = os.path.realpath(path)  # a symlink's target is replaced, the link stays
    directory = os.path.dirname(real) or "."
    if not os.path.isdir(directory):
        raise MoetoolError(f"cannot write {path}: directory {directory} does not exist")
    mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, real)
        tmp = None
    except OSError as e:
        raise MoetoolError(f"cannot write {path}: {_reason(e)}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _write_in_place(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise MoetoolError(f"cannot write {path}: {_reason(e)}") from None


def read_bounded(path: str, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of `path`, refusing more than `limit` (a device like /dev/zero never ends)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except IsADirectoryError:
        raise MoetoolError(f"{path}: is a directory, expected a {what} file") from None
    except OSError as e:
        raise MoetoolError(f"{path}: cannot read {what} ({_reason(e)})") from None
    if len(data) > limit:
        raise MoetoolError(f"{path}: {what} is larger than {limit // (1024 * 1024)} MiB; refusing to read it")
    return data


def read_text_bounded(path: str, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    try:
        return read_bounded(path, what, limit).decode("utf-8")
    except UnicodeDecodeError:
        raise MoetoolError(f"{path}: cannot read {what} (not UTF-8 text)") from None
