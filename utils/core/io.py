"""Files, the one way: read records, write atomically, append durably, publish folders, lock a run's output.

- `read_records`: a JSON array or JSON Lines (split on `\\n` only: U+2028/U+2029/U+0085 are valid inside JSON
  strings), UTF-8 (a BOM is fine); every problem one `UserError` naming the file, the line and the field.
- `atomic_write` / `publish_files` / `replace_folder`: a temporary file or folder beside the target, flushed, renamed
  into place, read back; the modes the umask gives (temporary files start at 0600).
- `output_file_problems` / `output_dir_problems`: an output that can be written, of the right kind, not an input
  or inside a model, checked before any work.
- `RunLock`: one run at a time per output (`filelock`: the kernel drops it when its holder dies).
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from utils.core.errors import UserError, did_you_mean, raise_problems, redact

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file
_SURROGATE = re.compile("[\ud800-\udfff]")


# --- reading ------------------------------------------------------------------------------------------------------


def nearest(path: Path, folders: bool = False) -> str:
    """` (did you mean data/llama_data.json?)`: the file (or, with `folders`, the folder) beside a missing `path`
    whose name is closest, or ``."""
    try:
        names = [entry.name for entry in path.parent.iterdir() if entry.is_dir() or not folders]
    except OSError:
        return ""
    prefix = "" if str(path.parent) == "." else f"{path.parent}/"
    return did_you_mean(path.name, names, prefix=prefix)


def file_problems(path: str | Path, flag: str = "") -> list[str]:
    """`path` is no file to read: missing (with the nearest name beside it), a folder, a FIFO or a device (reading
    one may never end)."""
    path = Path(path)
    if path.is_file():
        return []
    what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else (
        f"no such file{nearest(path)}")
    return [f"{flag} {path}: {what}".lstrip()]


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file (a BOM is dropped); one clear error for what `file_problems` finds, or another
    encoding."""
    path = Path(path)
    try:
        raise_problems(file_problems(path))
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not UTF-8 (byte 0x{raw[error.start]:02x}); re-encode the file, e.g. "
                        f"`iconv -f GBK -t UTF-8 {path} > fixed.json` for GBK") from None


def parse_json(text: str, where: str) -> Any:
    """`json.loads`, with every failure (bad syntax, nesting too deep, a number too long to convert) as one
    `UserError` naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = f" line {error.lineno}" if "\n" in text else ""
        raise UserError(f"{where}{line}: invalid JSON ({error.msg})") from None
    except (RecursionError, ValueError) as error:  # nesting too deep; an int of more than 4300 digits
        raise UserError(f"{where}: invalid JSON ({str(error).split(';')[0] or 'nested too deeply'})") from None


def read_json_object(path: str | Path, where: str = "") -> dict[str, Any]:
    """A JSON file that must hold one object (a config, a template); errors start with `where` (default: the path)."""
    data = parse_json(read_text(path), where or str(path))
    if not isinstance(data, dict):
        raise UserError(f"{where or path} must be a JSON object, got {type(data).__name__}")
    return data


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSON array (the first character is `[`) or a JSON Lines file (blank lines skipped), each with its
    location (`row 3`, `line 3`); every row a JSON object."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):
        rows = parse_json(text, str(path))
        located = [(f"row {index}", row) for index, row in enumerate(rows, start=1)] if isinstance(rows, list) else []
    else:
        located = [(f"line {number}", parse_json(line, f"{path} line {number}"))
                   for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not located:
        raise UserError(f"{path}: holds no rows (expected JSON Lines or a JSON array of objects)")
    for where, row in located:
        if not isinstance(row, dict):
            raise UserError(f"{path} {where}: expected a JSON object, got {type(row).__name__}")
    return located


def check_string_fields(path: str | Path, located_rows: Iterable[tuple[str, dict[str, Any]]],
                        required: Iterable[str], optional: Iterable[str] = ()) -> None:
    """Fail on the first row where a required field is missing (None counts as absent), or a field is not text."""
    required, optional = tuple(required), tuple(optional)
    for where, row in located_rows:
        for field in required:
            if row.get(field) is None:
                raise UserError(f"{path} {where}: missing field `{field}`")
        for field in required + optional:
            value = row.get(field)
            if value is not None and not isinstance(value, str):
                raise UserError(f"{path} {where}: field `{field}` must be a string, got {type(value).__name__}")
            if value and _SURROGATE.search(value):  # valid JSON (`\\ud800`), but no text can be encoded from it
                raise UserError(f"{path} {where}: field `{field}` holds an unpaired UTF-16 surrogate; fix or drop it")


# --- writing -------------------------------------------------------------------------------------------------------


def jsonl_text(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def json_array_text(records: Sequence[dict[str, Any]]) -> str:
    """A JSON array with one row a line: valid JSON, and a diff shows which rows changed."""
    rows = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    return f"[\n{rows}\n]\n" if records else "[]\n"


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk, so that a rename never publishes data still in the page cache."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a folder cannot be opened on some platforms; the rename is still atomic
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` through a flushed temporary file and a rename, then read it back: a
    crash, a full disk or a kill leaves the old file (or none), never a half-written one."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # short: any valid target name fits
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(name, FILE_MODE)
        os.replace(name, path)
    except OSError as error:
        error.filename = str(path)  # the file meant, not the temporary one
        raise
    finally:
        if name:
            Path(name).unlink(missing_ok=True)
    _fsync(path.parent)
    if path.read_bytes() != payload:
        raise UserError(f"{path}: what was written does not read back")
    return path


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def make_readable(folder: Path) -> None:
    """Files as the umask allows (libraries write some through 0600 temporary files), folders searchable."""
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(path, FILE_MODE | (0o111 & ~_UMASK) if path.is_dir() else FILE_MODE)


def _seal(folder: Path) -> list[Path]:
    """The files of a staging folder, readable as the umask allows and flushed to disk; sorted."""
    make_readable(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    for path in [*files, folder]:
        _fsync(path)
    return files


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder `staging` at `target` by renaming; an existing `target` is swapped out first."""
    _seal(staging)
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=".old-"))  # short: any valid target name fits beside it
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)


def publish_files(output_dir: str | Path, write: Callable[[Path], None], last: Sequence[str] = (),
                  staging_name: str = ".tmp-publish") -> list[Path]:
    """Call `write(folder)` on a staging folder inside `output_dir`, then move each file into `output_dir` with
    `os.replace` (atomic per file), the files named in `last` at the end. A kill or a full disk while `write` runs
    leaves `output_dir` as it was; the moves take microseconds. Returns the files now in `output_dir`."""
    output = Path(output_dir)
    staging = output / staging_name
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
        files, moved = _seal(staging), []
        for path in [p for p in files if p.name not in last] + [p for name in last for p in files if p.name == name]:
            target = output / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync(output)
    return moved


# --- checking outputs before any work ----------------------------------------------------------------------------


def same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def _where_problems(path: Path, flag: str, protected: Sequence[str | Path | None]) -> list[str]:
    """A path the OS refuses to look at (a name too long, a symlink loop, a file on the way), a path inside a model or
    an adapter, or a nearest existing folder this user cannot write in."""
    try:
        path.exists()
        ancestor = next(p for p in [path, *path.parents] if p.exists() or p == Path("."))
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: pathlib's "Symlink loop"
        return [f"{flag} {path}: cannot use this path ({getattr(error, 'strerror', None) or error})"]
    for folder in protected:
        guarded = Path(folder).expanduser().resolve() if folder and Path(folder).expanduser().is_dir() else None
        if guarded is not None and (resolved == guarded or guarded in resolved.parents):
            return [f"{flag} {path}: is inside {folder}, a model or adapter this run reads; choose another folder"]
    if ancestor != path and not ancestor.is_dir():
        return [f"{flag} {path}: {ancestor} is a file, not a folder"]
    if not os.access(ancestor if ancestor.is_dir() else ancestor.parent, os.W_OK):
        return [f"{flag} {path}: cannot write in {ancestor} (permission denied or a read-only file system)"]
    return []


def output_file_problems(path: str | Path, flag: str, inputs: Sequence[str | Path | None] = (),
                         protected: Sequence[str | Path | None] = ()) -> list[str]:
    """`path` can be written as a whole file: not a folder, pipe or device, not a symbolic link (an atomic write
    would replace the link, not its target), not one of `inputs`, not inside a `protected` folder."""
    path = Path(path).expanduser()
    problems = _where_problems(path, flag, protected)
    if problems:
        return problems
    if path.is_symlink():
        return [f"{flag} {path}: is a symbolic link; name the file itself (writing would replace the link)"]
    if path.exists() and not path.is_file():
        return [f"{flag} {path}: is {'a folder' if path.is_dir() else 'not a regular file'}, expected a file name"]
    if any(source and same_path(path, source) for source in inputs):
        return [f"{flag} {path}: is an input of this run; choose another file"]
    return []


def output_dir_problems(path: str | Path, flag: str, protected: Sequence[str | Path | None] = ()) -> list[str]:
    """`path` can take a run's output: a folder (or one that can be made), not inside a `protected` folder."""
    path = Path(path).expanduser()
    problems = _where_problems(path, flag, protected)
    if not problems and path.exists() and not path.is_dir():
        problems.append(f"{flag} {path}: is a file, expected a folder")
    return problems


# --- one run at a time ---------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock file for as long as a run writes an output; a second run is refused at once with one line
    naming the holder (pid, host, command, start). The lock file, and folders made for it that the run left empty,
    are removed on release, so a refused run leaves nothing behind."""

    def __init__(self, path: str | Path, what: str) -> None:
        from filelock import FileLock

        self.path, self.what, self._made = Path(path), what, []
        self._lock = FileLock(self.path, timeout=0, on_acquired=self._write_holder)

    def _write_holder(self, descriptor: int) -> None:
        command = redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))[:300]
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}"
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, holder.encode(), 0)

    def __enter__(self) -> Self:
        from filelock import Timeout

        try:
            self._made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout:
            holder = ""
            with contextlib.suppress(OSError):
                holder = self.path.read_text(encoding="utf-8", errors="replace")
            raise UserError(f"{self.what} is in use by another run ({holder or 'holder unknown'}); wait for it to "
                            f"finish, or stop it (the lock is {self.path})") from None
        except OSError as error:
            if error.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):  # a file system without flock
                print(f"warning: {self.path.parent} cannot be locked ({error.strerror}); make sure no other run writes "
                      "into it", file=sys.stderr, flush=True)
                self._lock = None
                return self
            self._remove_made()
            raise UserError(f"{self.what}: cannot write there ({error.strerror or error})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        # Removed while still held: no run waits on it (timeout=0), and one that opened it just now finds, once it
        # holds the lock, that the path names another file (filelock checks), and is refused.
        if self._lock is not None:
            self.path.unlink(missing_ok=True)
            self._lock.release()
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:  # innermost first; a folder the run wrote into is not empty and stays
            with contextlib.suppress(OSError):
                folder.rmdir()
