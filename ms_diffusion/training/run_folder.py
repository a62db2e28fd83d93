"""One run folder, one run: an ownership lock, no silent overwrite of a previous run, no debris from failed starts.

``train.py`` claims its run folder once everything it can check before training has been checked
(config, data, model, the resumed checkpoint against the model) and releases it when it ends:

* **lock** -- ``<run>/.lock`` holds a POSIX record lock (``fcntl.lockf``) for the run's life and one
  JSON line naming its owner: ``{"pid", "host", "user", "started", "command"}``. The system drops
  the lock when the owner's process ends in any way (``kill -9`` included; a forked data worker does
  not inherit it), so a lock left by a dead run never blocks: a lock file whose lock nobody holds is
  stale and is taken over, and the run says whose it was. A second run on a held folder is refused at
  once, naming the holder, without writing anything. On NFS the lock goes through the NFS lock
  manager (lockd / NFSv4), so it also holds between nodes that share the folder. A clean end
  removes ``.lock``.
* **previous run** -- a folder holding step checkpoints, ``model.safetensors``/``best.safetensors``
  or a non-empty ``log.jsonl`` belongs to an earlier run: a new run (no ``--resume``) is refused
  unless ``overwrite``, which deletes only what runs write there (``RUN_OUTPUTS``) and keeps every
  other file.
* **failed start** -- if the run ends with an error before its first update, the folder is put back
  as it was: the files the run created are removed, ``config.yaml`` and ``log.jsonl`` get their
  previous bytes back, and a folder the run created is removed again (when it holds nothing else).

Only rank 0 of a data-parallel job owns the folder; the other ranks never lock or write it.
"""
from __future__ import annotations

import errno
import getpass
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ms_diffusion.io.checkpoint import list_checkpoints

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no lock, the other protections stay
    fcntl = None

__all__ = ["RunFolder", "RunFolderError", "RunFolderBusy", "previous_run", "read_lock_owner", "LOCK_NAME",
           "RUN_OUTPUTS"]

LOCK_NAME = ".lock"
#: What runs write into a run folder (files, and folders with the patterns of their files); ``overwrite``
#: deletes these and nothing else. Dot-names are the temporaries of atomic writes.
RUN_OUTPUTS: Dict[str, Tuple[str, ...]] = {
    ".": ("config.yaml", "log.jsonl", "loss.png", "model.safetensors", "best.safetensors",
          ".config.yaml.tmp-*", ".model.safetensors.tmp-*", ".best.safetensors.tmp-*"),
    "checkpoints": ("step_*.ckpt", ".step_*.tmp-*"),
    "samples": ("step_*.png",),
    "reconstructions": ("step_*.png",),
    "tokenizer": ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"),
}
_WAIT_FOR_OWNER_S = 2.0   # a holder writes its details right after locking: how long to wait for them
#: Folders this process holds: POSIX locks do not exclude their own process (and closing any descriptor of the
#: lock file would drop the lock), so a second claim from this process is refused here.
_HELD: Dict[str, "RunFolder"] = {}


class RunFolderError(ValueError):
    """The run folder cannot be used for this run (a user error: the message says what to do)."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock."""


def _describe_owner(owner: Optional[dict]) -> str:
    if not owner:
        return "a process that has not written its details yet"
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    text = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
    if owner.get("user"):
        text += f" (user {owner['user']})"
    text += f", started {when}"
    if owner.get("command"):
        text += f": {owner['command']}"
    return text


def _parse_owner(data: bytes) -> Optional[dict]:
    try:
        owner = json.loads(data.decode()) if data.strip() else None
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


def read_lock_owner(folder) -> Optional[dict]:
    """The owner details in ``folder/.lock`` (the current holder's or, if nobody holds it, the last one's).
    Not for the holder itself: closing a descriptor of the lock file drops this process's lock."""
    try:
        return _parse_owner((Path(folder) / LOCK_NAME).read_bytes())
    except OSError:
        return None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    return True


def _holder(folder: Path) -> Optional[dict]:
    """The details of the process holding the lock, waiting briefly for a holder that has just locked."""
    deadline = time.monotonic() + _WAIT_FOR_OWNER_S
    while True:
        owner = read_lock_owner(folder)
        current = owner is not None and (owner.get("host") != socket.gethostname() or _pid_alive(owner.get("pid")))
        if current or time.monotonic() > deadline:
            return owner
        time.sleep(0.05)


def _try_lock(fd: int, exclusive: bool = True) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _busy_error(folder: Path) -> RunFolderBusy:
    return RunFolderBusy(
        f"run folder {folder} is in use by another training run ({_describe_owner(_holder(folder))}); wait for it "
        f"to end or stop it, or train into another --out-dir (the lock is {folder / LOCK_NAME}, released by the "
        f"system as soon as that process ends)")


def previous_run(folder) -> List[str]:
    """What of an earlier run ``folder`` holds (empty if nothing): checkpoints, exported weights, a log."""
    folder = Path(folder)
    found = []
    ckpts = list_checkpoints(folder / "checkpoints")
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint(s) up to step {ckpts[-1][0]}")
    for name in ("model.safetensors", "best.safetensors"):
        if (folder / name).is_file():
            found.append(name)
    log = folder / "log.jsonl"
    if log.is_file() and log.stat().st_size > 0:
        found.append("log.jsonl")
    return found


def _outputs(folder: Path) -> List[Path]:
    """Every file in ``folder`` that runs write (``RUN_OUTPUTS``), the lock excluded."""
    found = []
    for sub, patterns in RUN_OUTPUTS.items():
        base = folder / sub
        if not base.is_dir():
            continue
        for pattern in patterns:
            found.extend(p for p in base.glob(pattern) if p.is_file() or p.is_symlink())
    return sorted(set(found))


class RunFolder:
    """Ownership of one run folder by this process (rank 0): ``check`` (read-only, early), ``claim``,
    ``write_config``, ``release``.

    ``resume``: the run continues the folder's run (it may hold one); ``overwrite``: the run replaces it.
    ``log`` prints what was done to the folder (a stale lock taken over, a previous run deleted).
    """

    def __init__(self, path, *, resume: bool = False, overwrite: bool = False,
                 log: Callable[[str], None] = print):
        if resume and overwrite:
            raise RunFolderError("--overwrite starts a new run in place of the previous one; it cannot be combined "
                                 "with --resume")
        self.path = Path(path)
        self.resume, self.overwrite, self.log = bool(resume), bool(overwrite), log
        self._fd: Optional[int] = None
        self._created: List[Path] = []          # folders this claim created, deepest first
        self._lock_existed = False
        self._before: set = set()               # run outputs present after claim
        self._dirs_before: set = set()
        self._saved_bytes: Dict[Path, Optional[bytes]] = {}

    # ------------------------------------------------------------------ checks

    def _refuse_previous_run(self) -> None:
        if self.resume or self.overwrite:
            return
        found = previous_run(self.path)
        if found:
            raise RunFolderError(
                f"run folder {self.path} already holds a run ({', '.join(found)}); not overwriting it. Continue "
                f"that run with --resume, start a new one in a fresh --out-dir, or pass --overwrite to delete its "
                f"checkpoints, exported weights and log first")

    def _refuse_own_claim(self) -> None:
        if _key(self.path) in _HELD and _HELD[_key(self.path)] is not self:
            raise RunFolderBusy(f"run folder {self.path} is in use by another training run in this process "
                                f"(pid {os.getpid()}); train into another --out-dir")

    def check(self) -> None:
        """Read-only checks before anything is built: refuse a folder another run holds, or one holding a
        previous run when neither ``resume`` nor ``overwrite`` is set. ``claim`` checks again, locked."""
        self._refuse_own_claim()
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise RunFolderError(f"run folder {self.path} exists and is not a folder; choose another --out-dir")
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDONLY)
        except OSError:
            fd = None  # no lock file (or unreadable): claim decides
        if fd is not None:
            try:
                try:
                    free = _try_lock(fd, exclusive=False)
                except OSError:
                    free = True   # no locks on this file system: claim says so
                if not free:
                    raise _busy_error(self.path)
            finally:
                os.close(fd)   # also drops the shared probe lock
        self._refuse_previous_run()

    # ------------------------------------------------------------------ claim / release

    @property
    def claimed(self) -> bool:
        return self._fd is not None

    def _make_folder(self) -> None:
        missing = []
        p = self.path
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"run folder {self.path} exists and is not a folder; choose another --out-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first

    def _lock(self) -> Optional[dict]:
        """Take the lock (or raise ``RunFolderBusy``); returns the details a stale lock file held."""
        lock = self.path / LOCK_NAME
        for _ in range(20):
            existed = lock.exists()
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    locked = _try_lock(fd)
                except OSError as err:   # ENOLCK: a file system without locks (an NFS mount without lockd)
                    raise OSError(err.errno, f"cannot lock {lock}: {err.strerror or err} (does this file system "
                                             f"support file locks?)", str(lock)) from err
                if not locked:
                    raise _busy_error(self.path)
                # the holder we waited for may have removed the file meanwhile: lock the file at the path
                st = os.fstat(fd)
                try:
                    now = os.stat(lock)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                    os.close(fd)
                    continue
            except BaseException:
                if self._fd != fd:
                    os.close(fd)
                raise
            self._fd, self._lock_existed = fd, existed
            _HELD[_key(self.path)] = self
            # read through this descriptor: with POSIX locks, closing any other descriptor of the file that
            # this process opened would drop the lock
            return _parse_owner(os.pread(fd, 1 << 16, 0)) if existed else None
        raise RunFolderError(f"could not lock {lock}: it keeps being replaced by another process")

    def claim(self) -> "RunFolder":
        """Create the folder if needed, lock it, refuse a previous run (unless resume/overwrite), delete the
        previous run's outputs with ``overwrite``, and remember the folder's state for ``release``."""
        if self.claimed:
            return self
        self._refuse_own_claim()
        self._make_folder()
        try:
            stale = self._lock()
            self._refuse_previous_run()
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "user": _user(), "started": time.time(),
                     "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:])}
            try:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, (json.dumps(owner) + "\n").encode(), 0)
            except OSError as err:
                lock = self.path / LOCK_NAME
                raise OSError(err.errno, f"cannot write {lock}: {err.strerror or err}", str(lock)) from err
            if stale:
                self.log(f"run folder {self.path}: taking over the lock of a run that ended without releasing it "
                         f"({_describe_owner(stale)})")
            if self.overwrite:
                removed = self._delete_outputs()
                if removed:
                    self.log(f"--overwrite: deleted the previous run in {self.path} ({removed})")
            self._dirs_before = {sub for sub in RUN_OUTPUTS if (self.path / sub).is_dir()}
            self._before = set(_outputs(self.path))
            self._saved_bytes = {}
            for name in ("config.yaml", "log.jsonl"):
                p = self.path / name
                self._saved_bytes[p] = p.read_bytes() if p.is_file() else None
        except BaseException:
            self._unlock(remove_lock_file=not self._lock_existed)
            self._remove_created_folders()
            raise
        return self

    def write_config(self, text: str) -> Path:
        """Atomically write ``config.yaml`` (after validation; ``release`` restores the old one on a failed start)."""
        path = self.path / "config.yaml"
        tmp = self.path / f".config.yaml.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def release(self, *, restore: bool = False) -> None:
        """Unlock and remove ``.lock``. ``restore`` (a start that failed before its first update): put the folder
        back as it was at ``claim`` -- new run outputs removed, config.yaml / log.jsonl bytes restored, folders
        this claim created removed when empty."""
        if not self.claimed:
            return
        try:
            if restore:
                try:
                    self._restore()
                except OSError as err:  # best effort: never hide the error that ended the run
                    self.log(f"run folder {self.path}: could not put it back as it was: {err}")
        finally:
            self._unlock(remove_lock_file=True)
            if restore:
                self._remove_created_folders()

    # ------------------------------------------------------------------ helpers

    def _unlock(self, *, remove_lock_file: bool) -> None:
        if self._fd is None:
            return
        try:
            if remove_lock_file:  # while still holding the lock (a waiting process re-checks the path)
                try:
                    (self.path / LOCK_NAME).unlink()
                except FileNotFoundError:
                    pass
        finally:
            os.close(self._fd)  # drops the lock
            self._fd = None
            _HELD.pop(_key(self.path), None)

    def _remove_created_folders(self) -> None:
        for folder in self._created:   # deepest first; only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def _delete_outputs(self) -> str:
        files = _outputs(self.path)
        ckpts = sum(1 for p in files if p.parent.name == "checkpoints" and p.suffix == ".ckpt")
        names = sorted({p.name for p in files if p.parent == self.path and not p.name.startswith(".")})
        for p in files:
            p.unlink()
        for sub in RUN_OUTPUTS:
            if sub != ".":
                try:
                    (self.path / sub).rmdir()
                except OSError:
                    pass
        parts = ([f"{ckpts} checkpoint(s)"] if ckpts else []) + names
        other = len(files) - ckpts - len(names)
        if other:
            parts.append(f"{other} other run file(s)")
        return ", ".join(parts)

    def _restore(self) -> None:
        for p in _outputs(self.path):
            if p not in self._before:
                p.unlink()
        for p, data in self._saved_bytes.items():
            if data is None:
                if p.exists():
                    p.unlink()
            elif not p.is_file() or p.read_bytes() != data:
                tmp = p.with_name(f".{p.name}.restore-{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, p)
        for sub in RUN_OUTPUTS:
            if sub != "." and sub not in self._dirs_before:
                try:
                    (self.path / sub).rmdir()
                except OSError:
                    pass


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _user() -> Optional[str]:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return None
