"""Writing the files a command was asked for, and checking where they go before any work.

Every write goes through :func:`atomic_path` (temp file + rename: a failed write leaves the
previous file, or none, never a half-written one), and every refusal of the operating system
(a full disk, no permission, a read-only file system, a file where a folder should be) becomes a
:class:`WriteError`: one line naming the path and the cause. No torch import here: the CLI
checks output paths with it before it loads anything heavy.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from leaps.errors import LeapsError

# errno -> (the cause in words, what to do about it).
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space or write elsewhere"),
    errno.EFBIG: ("file too large for the file system", "write elsewhere"),
    errno.EACCES: ("permission denied", "write to a folder you can write to"),
    errno.EPERM: ("operation not permitted", "write to a folder you can write to"),
    errno.EROFS: ("read-only file system", "write to a writable file system"),
    errno.ENOTDIR: ("a parent of it is a file, not a folder", "choose a path under a folder"),
    errno.EISDIR: ("it is a folder", "give a file path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ENOENT: ("a parent folder does not exist or was removed", "choose an existing folder"),
    errno.EIO: ("input/output error of the device", "check the device, or write elsewhere"),
}


class WriteError(LeapsError, OSError):
    """The operating system refused a write. ``path`` is the file that was being written,
    ``cause`` the reason in words and ``fix`` what to do; ``errno`` is the OS error number.

    It is an OSError too, so code that handles failed writes as OSError keeps working."""

    def __init__(self, path: str | Path, error: OSError) -> None:
        self.path = Path(path)
        self.cause, self.fix = describe(error)
        super().__init__(f"cannot write {self.path}: {self.cause}; {self.fix}")
        self.errno = error.errno

    def with_fix(self, fix: str) -> LeapsError:
        """The same failure with another remedy (e.g. how to resume the run it interrupted)."""
        return LeapsError(f"cannot write {self.path}: {self.cause}; {fix}")


def describe(error: OSError) -> tuple[str, str]:
    """An OSError as (cause in words, remedy), without errno numbers or library prefixes."""
    if isinstance(error, WriteError):
        return error.cause, error.fix
    if error.errno in _CAUSES:
        return _CAUSES[error.errno]
    text = error.strerror or str(error) or type(error).__name__
    return text.splitlines()[0], "write elsewhere"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was; an OSError
    (of the write itself or of creating the missing parent folders) is raised as a
    :class:`WriteError` naming ``path``. The temporary name keeps ``path``'s extension, so
    writers that infer the format from it still work.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:12]}.tmp{target.suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        os.replace(temporary, target)
    except WriteError:
        _remove(temporary)
        raise
    except OSError as error:
        _remove(temporary)
        raise WriteError(target, error) from None
    except BaseException:
        _remove(temporary)
        raise


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the folder itself may be gone or unreadable; the original error matters


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_path`)."""
    return write_bytes(path, text.encode("utf-8"))


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, a folder that cannot be created or written: one under a file,
    in a folder without write permission or on a read-only file system."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LeapsError(f"{option} {path} is a file, not a folder; pass a folder path")
    _check_parent(path, option)


def check_output_file(path: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, a file path that cannot be written: a folder, a path under a
    file, in a folder without write permission; an existing file there is replaced."""
    path = Path(path)
    if path.is_dir():
        raise LeapsError(f"{option} {path} is a folder; give a file path")
    _check_parent(path, option)


def _check_parent(path: Path, option: str) -> None:
    existing = _nearest_existing(path)
    if existing == Path(os.path.abspath(path)):
        existing = existing.parent if not path.is_dir() else existing
    if not existing.is_dir():
        raise LeapsError(f"{option} {path} lies under {existing}, which is a file, not a "
                         "folder; pass a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        cause = "read-only file system" if _read_only(existing) else "permission denied"
        raise LeapsError(f"{option} {path}: cannot write in {existing} ({cause}); pass a "
                         "path you can write to")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# --------------------------------------------------------------------------- reading torch files
def load_torch_file(path: str | Path, safe_globals: list[object] | tuple[object, ...] = ()
                    ) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is a :class:`LeapsError`
    whose message is :func:`why_unreadable` (the caller adds what the file is and what to do).

    Every torch file leaps reads goes through here, so no message ever repeats torch's advice
    to turn ``weights_only`` off: leaps never unpickles code from a file."""
    import torch

    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or hostile file makes it raise
        raise LeapsError(why_unreadable(Path(path), exc)) from None


def why_unreadable(path: Path, exc: BaseException) -> str:
    """Why a torch file could not be loaded, in a few words: empty, truncated, not a torch file,
    pickling something leaps does not load. Never torch's own advice, which suggests the
    unsafe load."""
    import re

    text = str(exc)
    try:
        empty = path.stat().st_size == 0
    except OSError as error:
        return f"cannot be read ({describe(error)[0]})"
    if empty:
        return "is empty (0 bytes)"
    refused = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if refused:
        return (f"pickles {refused.group(1)}, which leaps does not unpickle: loading never runs "
                "code from a file")
    if isinstance(exc, EOFError) or re.search(r"central directory|zip archive|PytorchStreamReader"
                                              r"|unexpected EOF|truncated", text, re.IGNORECASE):
        return "is truncated or damaged, not a complete torch file"
    if isinstance(exc, OSError):
        return f"cannot be read ({describe(exc)[0]})"
    return f"is damaged or not a torch file ({type(exc).__name__} while unpickling it)"
