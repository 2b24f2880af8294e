"""Where output goes: a file under a temporary name renamed into place on success, standard output as a stream,
and every write error as one `OutputError` naming the output.

Standard output redirected to a regular file (`> out.wav`) is cut back to where it started when the command
fails, so a failure leaves nothing partial there either; on a pipe, what was written has been read already.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from codec.errors import OutputError

STDOUT = "stdout"


def output_error(name: str | os.PathLike, exc: OSError) -> OutputError:
    """The one message for an output that cannot be written: "cannot write NAME: CAUSE"."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"cannot write {name}: {cause[0].lower() + cause[1:]}")


class Sink:
    """A writable binary file whose OSErrors become `OutputError` naming `name` (a closed pipe stays a
    BrokenPipeError); a write is retried until all of it is written.

    seekable: what `seekable()` answers (default: the file's own answer).
    """

    def __init__(self, f: BinaryIO, name: str | os.PathLike, seekable: bool | None = None) -> None:
        self._f, self.name, self._seekable = f, str(name), seekable

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise output_error(self.name, exc) from None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        with self._mapped():
            while view:
                n = self._f.write(view)
                view = view[len(view) if n is None else n :]
        return total

    def flush(self) -> None:
        with self._mapped():
            self._f.flush()

    def seekable(self) -> bool:
        return self._f.seekable() if self._seekable is None else self._seekable

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        with self._mapped():
            return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


@contextlib.contextmanager
def open_output(dst: str | os.PathLike | BinaryIO) -> Iterator[BinaryIO]:
    """A binary sink for `dst`: a path (written as `.NAME.*.part` beside it, renamed into place on success,
    removed on failure), `-` for standard output, or a file object as it is."""
    if dst == "-":
        with _stdout() as sink:
            yield sink
    elif isinstance(dst, (str, os.PathLike)):
        with _file(Path(dst)) as sink:
            yield sink
    else:
        yield dst


def check_destination(path: str | os.PathLike) -> None:
    """OutputError when `path` can never be written as a file: a directory, or in a folder that does not exist."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: the folder {path.parent} does not exist")


@contextlib.contextmanager
def _file(path: Path) -> Iterator[Sink]:
    check_destination(path)
    if path.exists() and not path.is_file():  # a device or a named pipe: written in place, never replaced
        try:
            raw = io.FileIO(path, "wb")
        except OSError as exc:
            raise output_error(path, exc) from None
        with raw:
            yield Sink(raw, path)
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as exc:
        raise output_error(path, exc) from None
    try:
        with io.FileIO(fd, "wb") as raw:  # unbuffered: an error surfaces at the write that caused it
            yield Sink(raw, path)
        try:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            raise output_error(path, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _stdout() -> Iterator[Sink]:
    """Standard output, unbuffered (nothing is left in a buffer when a command fails); a regular file there is
    truncated back to its starting length on failure, and is seekable only when written from its start."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.buffer.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an in-memory stream (a notebook, a test)
        sink = Sink(sys.stdout.buffer, STDOUT)
        yield sink
        sink.flush()
        return
    sys.stdout.buffer.flush()
    info = os.fstat(fd)
    regular = stat.S_ISREG(info.st_mode)
    appending = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
    with io.FileIO(os.dup(fd), "wb") as raw:
        start = (info.st_size if appending else raw.tell()) if regular else 0
        try:
            yield Sink(raw, STDOUT, seekable=regular and not appending and start == 0)
        except BaseException:
            if regular:
                with contextlib.suppress(OSError):
                    os.ftruncate(raw.fileno(), start)
                    raw.seek(start)
            raise
