"""Publishing output directories and files atomically, with ordinary permissions.

Every command that writes a directory (checkpoint, export, model repository) builds it in a
temporary sibling ``.NAME.tmp-HOST-PID-RANDOM`` and renames it into place. This module owns the
three things that get wrong easily:

- **Atomic "create, never replace".** Without ``overwrite`` the rename must fail if NAME appeared
  meanwhile (another process exporting to the same OUT): ``renameat2(RENAME_NOREPLACE)`` where
  the kernel and file system have it, else ``rename``, which also refuses a non-empty directory.
  So of two racing writers exactly one wins; the other gets ``FileExistsError``.
- **Stale leftovers.** A writer killed with SIGKILL leaves its ``.NAME.tmp-*`` behind, and an
  interrupted replace its ``.NAME.old-*``. Their names carry the writer's host tag and PID; the
  next writer to NAME removes those whose process is gone (never those of a live process, or of
  another host sharing the file system).
- **Permissions.** ``mkdtemp``/``mkstemp`` create 0700/0600, which a server running as another
  user (Triton in a container) cannot read. Published output gets what ``mkdir``/``open`` would
  have given under the process umask (0755/0644 under umask 022).
- **What ``--force`` may replace** (``check_output``): only an empty directory or one this project
  wrote (a checkpoint, an export or a model repository, recognised by its marker file), never a
  command's own input, a plain file, the current directory, or a folder of other files. Every
  command with ``--force`` calls it before any work, and ``publish_dir`` checks again just before
  the old directory is moved aside (it may have changed meanwhile).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

# sha256_file lives with the export's integrity check (artifacts); it is imported from here too
from .artifacts import DEPLOY_RECORD_FILE, MANIFEST_FILE, sha256_file  # noqa: F401

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def host_tag() -> str:
    """8 hex digits naming this host, so a PID is only ever judged on the host that owns it."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_dir_for(target: str | os.PathLike) -> Path:
    """A new empty directory next to ``target`` (same file system, so the final rename is atomic),
    named ``.NAME.tmp-HOST-PID-RANDOM`` and with the umask's ordinary directory mode."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{host_tag()}-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp made it 0700
    return tmp


def set_default_mode(path: str | os.PathLike) -> None:
    """Give a file made by ``mkstemp`` (0600) the mode ``open()`` would have given it."""
    os.chmod(path, file_mode())


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the bytes only: ``shutil.copy2`` would also copy a 0600 source's mode."""
    shutil.copyfile(src, dst)


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``, raising ``FileExistsError`` if ``dst`` exists (atomically where
    the kernel supports RENAME_NOREPLACE)."""
    src_b, dst_b = os.fsencode(src), os.fsencode(dst)
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        fn = None
    if fn is not None:
        if fn(_AT_FDCWD, src_b, _AT_FDCWD, dst_b, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), os.fsdecode(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), os.fsdecode(dst))
    # Fallback: rename refuses to replace a non-empty directory, which every published output is.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst)) from None
        raise


def _remove(path: Path) -> None:
    """Remove a leftover: a symlink is unlinked (never what it points to), a directory removed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike, *, overwrite: bool) -> None:
    """Move the finished directory ``tmp`` to ``target``.

    Without ``overwrite``: ``FileExistsError`` if ``target`` exists, even if it appeared after the
    caller's own check. With ``overwrite``: the old ``target`` (a directory, or a symlink, which is
    replaced and never followed) is moved aside and removed once the new one is in place.
    """
    tmp, target = Path(tmp), Path(target)
    if not overwrite:
        rename_noreplace(tmp, target)
        return
    old = None
    if os.path.lexists(target):
        check_replaceable(target)  # again: it may have become something else since the command began
        old = target.parent / f".{target.name}.old-{host_tag()}-{os.getpid()}"
        _remove(old)
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not os.path.lexists(target):
            os.rename(old, target)  # put the previous output back
        raise
    if old is not None:
        _remove(old)


# What marks a directory as written by this project: (kind, marker file, key its JSON object must
# have; None: the file's presence suffices). A training run holds trainer_state.pt before its
# first checkpoint is saved (train.py).
PROJECT_MARKERS: tuple[tuple[str, str, str | None], ...] = (
    ("export", MANIFEST_FILE, "target"),
    ("model repository", DEPLOY_RECORD_FILE, "models"),
    ("checkpoint", "metadata.json", "format_version"),
    ("training run", "trainer_state.pt", None),
)


def project_kind(directory: str | os.PathLike) -> str | None:
    """The kind in ``PROJECT_MARKERS`` whose marker ``directory`` holds, else None. Checkpoints
    also need their ``config.json``."""
    import json

    d = Path(directory)
    for kind, marker, key in PROJECT_MARKERS:
        if key is None:
            if (d / marker).is_file():
                return kind
            continue
        try:
            obj = json.loads((d / marker).read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and key in obj and (kind != "checkpoint" or (d / "config.json").is_file()):
            return kind
    return None


def show_path(path: str | os.PathLike) -> str:
    """A path for a one-line message: control characters (a newline in a file name) escaped."""
    s = os.fsdecode(path)
    return s if s.isprintable() else s.encode("unicode_escape", "backslashreplace").decode("ascii")


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies under it (both resolved)."""
    return a == b or b in a.parents


def check_output(target: str | os.PathLike, *, force: bool, inputs: Iterable[object] = (),
                 what: str = "output", error: type[Exception] | None = None) -> Path:
    """Refuse, before any work, an output directory that the command must not write or replace.

    Without ``force`` an existing ``target`` is refused. With it, ``target`` may be replaced only
    if it is empty or a directory this project wrote (``project_kind``). Always refused: an empty
    path, the current directory or one above it, and a ``target`` that is, or holds, one of the
    command's ``inputs`` (paths; other objects, e.g. an in-memory model, are ignored). Raises
    ``error`` (default ``InputError``) with one line; returns ``Path(target)``.
    """
    from .errors import InputError

    try:
        return _check_output(target, force, inputs, what)
    except InputError as e:
        if error is None or isinstance(e, error):
            raise
        raise error(str(e)) from None


def _check_output(target: str | os.PathLike, force: bool, inputs: Iterable[object], what: str) -> Path:
    from .errors import InputError

    if not os.fspath(target):
        raise InputError(f"the {what} path is empty")
    out = Path(target)
    shown = show_path(out)
    real = out.resolve()
    if _inside(Path.cwd().resolve(), real):
        raise InputError(f"{shown} is the current directory or contains it: give the {what} a directory of its own")
    for inp in inputs:
        if not isinstance(inp, (str, os.PathLike)) or not os.fspath(inp):
            continue
        if _inside(Path(inp).resolve(), real):
            raise InputError(f"{shown} is or holds the input {show_path(inp)}: the {what} would replace it; "
                             "choose another directory")
    if not os.path.lexists(out):
        return out
    if not force:
        raise InputError(f"{shown} already exists (use --force to replace it)")
    check_replaceable(out)
    return out


def check_replaceable(target: str | os.PathLike) -> None:
    """``InputError`` unless the existing ``target`` is a symlink (replaced, never followed), an
    empty directory, or a directory this project wrote."""
    from .errors import InputError

    out = Path(target)
    shown = show_path(out)
    if out.is_symlink():
        return
    if not out.is_dir():
        raise InputError(f"{shown} exists and is not a directory: --force replaces only a checkpoint, export "
                         "or model repository directory")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise InputError(f"{shown}: cannot read it ({e.strerror})") from None
    if not empty and project_kind(out) is None:
        raise InputError(f"{shown} is not a checkpoint, export or model repository written by smlp (no "
                         "metadata.json + config.json, manifest.json or smlp_deploy.json): --force replaces "
                         "only those; choose a new directory or remove it yourself")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True
    return True


def stale_leftovers(target: str | os.PathLike) -> list[Path]:
    """``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of ``target`` whose writer (on this host) is dead."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    name = re.escape(target.name)
    # .NAME.tmp-HOST-PID-RANDOM and .NAME.old-HOST-PID; also .NAME.old-PID as written before host
    # tags (the older .NAME.tmp-RANDOM names carry no PID and are left alone)
    pat = re.compile(rf"^\.{name}\.(?:tmp-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-.+"
                     rf"|old-(?:(?P<ohost>[0-9a-f]{{8}})-)?(?P<opid>\d+))$")
    me, out = host_tag(), []
    for p in target.parent.iterdir():
        m = pat.match(p.name)
        if m is None:
            continue
        host, pid = (m.group("host"), m.group("pid")) if m.group("pid") else (m.group("ohost"), m.group("opid"))
        if host is not None and host != me:
            continue
        pid = int(pid)
        if pid != os.getpid() and not _pid_alive(pid):
            out.append(p)
    return sorted(out)


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of dead writers to ``target``; returns what was removed."""
    gone = stale_leftovers(target)
    for p in gone:
        _remove(p)
    return gone
