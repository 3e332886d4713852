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
from pathlib import Path

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


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints and exports can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
