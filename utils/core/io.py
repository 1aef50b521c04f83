"""Files, the one way: read records, write atomically, append durably, publish folders, lock a run's output.

- `read_records`: a JSON array or JSON Lines (lines split on `\\n` only: U+2028/U+2029/U+0085 are valid inside JSON
  strings), every problem one `UserError` naming the file, the line and the field.
- `read_jsonl_tolerant`: an append-only sidecar (progress, a judge's cache) where a crash may have torn the last
  line, even in the middle of a UTF-8 character: torn lines are skipped, their item is simply done again.
- `atomic_write`: a temporary file in the same folder, fsynced, renamed over the target; readable by the group and
  others as the umask allows (temporary files start at 0600).
- `publish_files` / `replace_folder`: the same for a folder of files (an adapter, a checkpoint).
- `check_output_file` / `check_output_dir`: writable, of the right kind, not an input, checked before any work.
- `RunLock`: one run at a time per output; a second run is refused with one line naming the holder. The lock is an
  `fcntl.flock`, so the kernel releases it when the holder dies (no stale locks after a kill).
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

from utils.core.errors import UserError, redact

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file: temporary files start at 0600


# --- reading ------------------------------------------------------------------------------------------------------

_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _not_utf8(path: Path, raw: bytes, error: UnicodeDecodeError) -> UserError:
    line = raw[: error.start].count(b"\n") + 1
    for bom, name in _BOMS:
        if raw.startswith(bom):
            return UserError(f"{path}: the file is {name}, expected UTF-8; re-encode it, e.g. "
                             f"`iconv -f {name} -t UTF-8 {path} > fixed.json`")
    if raw[:200].count(b"\x00") > 20:
        return UserError(f"{path}: the file looks like UTF-16 (many NUL bytes), expected UTF-8; re-encode it, e.g. "
                         f"`iconv -f UTF-16 -t UTF-8 {path} > fixed.json`")
    try:
        raw.decode("gbk")
        guess = "probably GBK"
        source = "GBK"
    except UnicodeDecodeError:
        guess, source = "an unknown encoding", "YOUR_ENCODING"
    return UserError(f"{path} line {line}: not UTF-8 (byte 0x{raw[error.start]:02x}, {guess}); re-encode the file, "
                     f"e.g. `iconv -f {source} -t UTF-8 {path} > fixed.json`")


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file (a BOM is dropped); one clear error for a missing file, a folder or another encoding."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")
    if not path.is_file():  # a FIFO, a socket or a device such as /dev/zero: reading it may never end
        raise UserError(f"{path}: is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, raw, error) from None


def parse_json(text: str, where: str) -> Any:
    """`json.loads`, with every failure (bad syntax, nesting too deep to parse, a number too long to convert) as one
    `UserError` naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = f" line {error.lineno}" if "\n" in text else ""
        raise UserError(f"{where}{line}: invalid JSON ({error.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: the JSON is nested too deeply to read") from None
    except ValueError as error:  # e.g. an integer of more than 4300 digits (Python's int conversion limit)
        raise UserError(f"{where}: invalid JSON ({str(error).split(';')[0]})") from None


def read_json_object(path: str | Path, where: str = "", hint: str = "") -> dict[str, Any]:
    """A JSON file that must hold one object (a config, a template): the object, or one `UserError` that starts with
    `where` (default: the path; e.g. "--deepspeed x.json") for a missing or unreadable file, bad JSON or another
    type, and ends with `hint` (e.g. which files would do)."""
    where = where or str(path)
    tail = f"; {hint}" if hint else ""
    try:
        text = read_text(path)
    except UserError as error:
        message, named = str(error), str(Path(path))
        message = where + message[len(named):] if message.startswith(named) else f"{where}: {message}"
        raise UserError(message + tail) from None
    try:
        data = parse_json(text, where)
    except UserError as error:
        raise UserError(f"{error}{tail}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a JSON object, got {type(data).__name__}{tail}")
    return data


def split_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) on `\\n` only (a trailing `\\r` dropped): JSON strings may hold U+2028, U+2029, U+0085."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSON array or a JSON Lines file, each with a location like `line 3` or `row 3`.

    The format is told by the first character: `[` is a JSON array, anything else JSON Lines. Blank lines in
    JSON Lines are skipped. Every row must be a JSON object.
    """
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    located: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        rows = parse_json(text, str(path))
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON array of objects")
        located = [(f"row {index}", row) for index, row in enumerate(rows, start=1)]
    else:
        for number, line in split_lines(text):
            if line.strip():
                located.append((f"line {number}", parse_json(line, f"{path} line {number}")))
    if not located:
        raise UserError(f"{path}: holds no rows")
    for where, row in located:
        if not isinstance(row, dict):
            raise UserError(f"{path} {where}: expected a JSON object, got {type(row).__name__}")
    return located


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_string_fields(
    path: str | Path,
    located_rows: Iterable[tuple[str, dict[str, Any]]],
    required: Iterable[str],
    optional: Iterable[str] = (),
) -> None:
    """Fail on the first row where a required field is missing, a field is not a string (None counts as absent), or
    a string holds an unpaired surrogate (`\\ud800`: valid JSON, but no text can be encoded from it)."""
    required, optional = tuple(required), tuple(optional)
    for where, row in located_rows:
        for field in required:
            if field not in row or row[field] is None:
                raise UserError(f"{path} {where}: missing field `{field}`")
        for field in required + optional:
            value = row.get(field)
            if value is None:
                continue
            if not isinstance(value, str):
                raise UserError(f"{path} {where}: field `{field}` must be a string, got {type(value).__name__}")
            if _has_lone_surrogate(value):
                raise UserError(f"{path} {where}: field `{field}` holds an unpaired UTF-16 surrogate (an escape such "
                                "as \\ud800 without its partner); fix or drop that character")


def read_jsonl_tolerant(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of an append-only JSON Lines file (none when it is absent).

    A line torn by a crash mid-write (cut JSON, or cut inside a UTF-8 character) is skipped, not an error: the
    writer of such a file redoes the item that line stood for.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None
    rows = []
    for line in raw.split(b"\n"):
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # torn, cut mid-character, or not JSON at all: redone, not fatal
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- writing -------------------------------------------------------------------------------------------------------


def jsonl_text(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def json_array_text(records: Sequence[dict[str, Any]]) -> str:
    """A JSON array with one row a line: valid JSON, and a diff shows which rows changed."""
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(record, ensure_ascii=False) for record in records) + "\n]\n"


_WRITE_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than the file system or the file-size limit (ulimit -f) allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "it is a folder",
    errno.ENOTDIR: "a part of the path is a file",
    errno.EIO: "an input/output error (a failing disk or a lost network mount)",
}
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
# Libraries written in Rust (safetensors, tokenizers) or C++ (torch.save) raise their own exception types for a
# failed write; the OS error survives only in the message: "... (os error 28)", "Os { code: 28, ... }".
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")
_TORCH_WRITE_FAILED = ("file write failed", "PytorchStreamWriter failed writing")


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, in words, when `error` is a storage failure (a full disk, a quota, the file-size limit,
    a read-only file system, an I/O error), also when a Rust or C++ library raised it; None for anything else."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return _WRITE_REASONS[error.errno]
    if isinstance(error, OSError):
        return None
    text = str(error)
    match = _OS_ERROR_IN_TEXT.search(text)
    if match:
        code = int(match.group(1) or match.group(2))
        return _WRITE_REASONS[code] if code in _STORAGE_ERRNOS else None
    if any(marker in text for marker in _TORCH_WRITE_FAILED):
        return "the write failed (is the disk full?)"
    return None


def _write_error(path: Path, error: OSError) -> UserError:
    reason = error.strerror or str(error)
    return UserError(f"cannot write {path}: {_WRITE_REASONS.get(error.errno or 0, reason)}")


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never publishes data still in the page cache.

    A storage failure reported by the flush (a full disk, a quota, an I/O error: file systems with delayed
    allocation and network file systems report them only here) raises; a file system that cannot flush a folder
    does not matter."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return  # folders cannot be opened on some platforms (Windows); the rename is still atomic
    try:
        os.fsync(descriptor)
    except OSError as error:
        if write_failure(error):
            raise _write_error(path, error) from error
    finally:
        os.close(descriptor)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` through a temporary file and a rename: a crash, a full disk or a kill
    leaves the old file (or none), never a half-written one. A problem is one `UserError`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        temporary = Path(name)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise _write_error(path, error) from None
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def append_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records to a JSON Lines file and fsync: once this returns, they survive a crash."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(jsonl_text(records))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise _write_error(path, error) from None


def drop_torn_tail(path: str | Path) -> None:
    """Cut a last line that a crash left without its newline, so appended rows start on a line of their own."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write(path, data[: data.rfind(b"\n") + 1])


# --- folders -------------------------------------------------------------------------------------------------------


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_path(path)
    fsync_path(folder)


def make_readable(folder: Path) -> None:
    """Files as the umask allows (libraries write some through 0600 temporary files), folders searchable."""
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(path, FILE_MODE | (0o111 & ~_UMASK) if path.is_dir() else FILE_MODE)


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder `staging` at `target` by renaming; an existing `target` is swapped out first."""
    make_readable(staging)
    fsync_tree(staging)
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)
    fsync_path(target.parent)


def publish_files(
    output_dir: str | Path, write: Callable[[Path], None], last: Sequence[str] = (), staging_name: str = ".tmp-publish"
) -> list[Path]:
    """Call `write(folder)` on a staging folder inside `output_dir`, then move each file into `output_dir` with
    `os.replace` (atomic per file), the files named in `last` at the end.

    A kill or a full disk while `write` runs leaves `output_dir` as it was; the move itself takes microseconds.
    Returns the files now in `output_dir`.
    """
    output = Path(output_dir)
    staging = output / staging_name
    try:
        output.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write(staging)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise _write_error(Path(getattr(error, "filename", None) or output), error) from error
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure(error)
        if reason:  # safetensors/tokenizers/torch report a full disk with their own exception types
            raise UserError(f"cannot write {output}: {reason}; nothing in it was replaced") from error
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    make_readable(staging)
    files = sorted(path for path in staging.rglob("*") if path.is_file())
    for path in files:
        fsync_path(path)
    ordered = [p for p in files if p.name not in last] + [p for name in last for p in files if p.name == name]
    moved = []
    try:
        for path in ordered:
            target = output / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    except OSError as error:  # a rename within one folder needs no space; this is a folder changed under us
        raise _write_error(Path(getattr(error, "filename", None) or output), error) from error
    shutil.rmtree(staging, ignore_errors=True)
    fsync_path(output)
    return moved


# --- checking outputs before any work ----------------------------------------------------------------------------


def _probe_writable(folder: Path, prefix: str = ".write-probe-") -> str | None:
    """None when a file can be created in `folder` (a temporary file named like `prefix`...), else why not."""
    try:
        descriptor, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
        os.close(descriptor)
        os.unlink(name)
    except OSError as error:
        return _WRITE_REASONS.get(error.errno or 0, error.strerror or str(error))
    return None


NAME_MAX = 255  # bytes in one file or folder name on Linux, macOS and Windows file systems


def _name_problem(path: Path, existing: Path) -> str | None:
    """A name between `existing` and `path` (the folders still to create, the file) longer than a file system takes;
    the temporary files of an atomic write add about 20 characters to the last one."""
    missing = path.relative_to(existing).parts if path != existing else ()
    for index, part in enumerate(missing):
        room = NAME_MAX - (20 if index == len(missing) - 1 else 0)
        if len(part.encode("utf-8")) > room:
            return f"the name {part[:20]}… is {len(part.encode('utf-8'))} bytes long, more than a file system takes"
    return None


def _checked_path(check: Callable[[], Path], path: str | Path, flag: str) -> Path:
    """Run an output check; a path the OS cannot even look at (a symlink loop, a name too long) is one line."""
    try:
        return check()
    except (OSError, RuntimeError) as error:  # RuntimeError: pathlib's "Symlink loop"
        reason = getattr(error, "strerror", None) or str(error)
        raise UserError(f"{flag} {path}: cannot use this path ({reason})") from None
    except UserError as error:
        if str(error).startswith(flag):
            raise
        raise UserError(f"{flag} {path}: cannot use this path ({error})") from None


def _existing_ancestor(path: Path) -> Path:
    """The nearest of `path` and its parents that exists; a symbolic link on the way that leads nowhere (broken, or a
    loop) is an error: creating a folder there would fail only when the run writes its results."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
        if candidate.is_symlink():
            raise UserError(f"{candidate} is a symbolic link that leads nowhere (broken, or a loop)")
    return Path(".")


def same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def check_output_file(path: str | Path, flag: str, inputs: Sequence[str | Path] = (),
                      protected: dict[str, str | Path] | None = None) -> Path:
    """`path` can be written: not a folder, not one of `inputs`, not inside a `protected` folder (a model, an adapter),
    its folder writable (or creatable), its name one the file system takes. Nothing is created."""
    return _checked_path(lambda: _check_output_file(Path(path).expanduser(), flag, inputs, protected or {}), path,
                         flag)


def _inside_protected(path: Path, flag: str, protected: dict[str, str | Path]) -> None:
    for what, folder in protected.items():
        if folder and Path(folder).expanduser().is_dir():
            resolved, guarded = path.resolve(), Path(folder).expanduser().resolve()
            if resolved == guarded or guarded in resolved.parents:
                raise UserError(f"{flag} {path}: is {what} ({folder}); writing there would change it, choose "
                                "another folder")


def _check_output_file(path: Path, flag: str, inputs: Sequence[str | Path], protected: dict[str, str | Path]) -> Path:
    _inside_protected(path, flag, protected)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file name")
    if path.is_symlink() and path.exists():  # an atomic write replaces the link itself, never its target
        raise UserError(f"{flag} {path}: is a symbolic link (to {os.readlink(path)}); writing would replace the link, "
                        "not the file it points to: name the file itself")
    if path.exists() and not path.is_file():
        raise UserError(f"{flag} {path}: is not a regular file (a pipe, socket or device); name a file to write")
    for source in inputs:
        if source and same_path(path, source):
            raise UserError(f"{flag} {path}: is an input of this run; choose another file")
    ancestor = _existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, not a folder")
    reason = _name_problem(path, ancestor) or _probe_writable(ancestor)
    if reason:
        raise UserError(f"{flag} {path}: cannot write in {ancestor} ({reason})")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: the file is read-only")
    return path


def check_output_dir(path: str | Path, flag: str, protected: dict[str, str | Path] | None = None) -> Path:
    """`path` can take a run's output: not a file, not (inside) a protected folder such as the base model, and
    writable (or creatable: the nearest existing folder is writable). Nothing is created: a refused run changes
    nothing on disk."""
    return _checked_path(lambda: _check_output_dir(Path(path).expanduser(), flag, protected or {}), path, flag)


def _check_output_dir(path: Path, flag: str, protected: dict[str, str | Path]) -> Path:
    _inside_protected(path, flag, protected)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a folder")
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, not a folder")
    reason = _name_problem(path, ancestor) or _probe_writable(ancestor)
    if reason:
        raise UserError(f"{flag} {path}: cannot write in {ancestor} ({reason})")
    return path


# --- one run at a time ---------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on `path` (a lock file) for as long as a run writes an output.

    `acquire()` refuses, with one `UserError` naming the holder (pid, host, command, start time), when another
    process holds it. The kernel drops the lock when its process exits, however it exits. On platforms without
    `fcntl` (Windows) it is a no-op.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._handle: Any = None
        self._made: list[Path] = []  # the folders acquire() created, removed again if the run left them empty

    def check_free(self) -> None:
        """Refuse now, naming the holder, when another run holds the lock; creates nothing (so a run can check this
        with its other options, before it decides to write anything)."""
        try:
            import fcntl
        except ImportError:
            return
        try:
            handle = open(self.path, encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError:
            return  # no lock file: nobody holds it (acquire() will tell an unwritable folder)
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise self._in_use(handle.read().strip()) from None
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _in_use(self, holder: str) -> UserError:
        return UserError(f"{self.what} is in use by another run ({self._describe(holder)}); wait for it to finish, or "
                         f"stop it (the lock is {self.path})")

    def acquire(self) -> Self:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            return self
        missing = [folder for folder in (self.path.parent, *self.path.parent.parents) if not folder.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _write_error(self.path, error) from None
        self._made = missing
        for _ in range(10):  # the holder may remove the file between our open and our lock: try again
            try:
                handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
            except FileNotFoundError:  # a refused run just removed the folder it had made: make it again
                with contextlib.suppress(OSError):
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as error:
                raise _write_error(self.path, error) from None
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise self._in_use(holder) from None
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "command": redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))[:300],
                                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}, ensure_ascii=False))
                handle.flush()
                self._handle = handle
                return self
            handle.close()
        raise UserError(f"could not lock {self.path}: it keeps being replaced")

    @staticmethod
    def _describe(holder: str) -> str:
        try:
            info = json.loads(holder)
            return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
        except (json.JSONDecodeError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._handle.close()  # closing drops the flock
        self._handle = None
        for folder in self._made:  # innermost first: a refused run leaves no empty output folder behind
            with contextlib.suppress(OSError):  # not empty: the run wrote there; keep it
                folder.rmdir()
        self._made = []

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
