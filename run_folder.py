"""What a run folder says about the run in it, beyond its checkpoints: the arguments that define
the run (`run_identity.json`, written when the run starts, compared on every rerun) and which
process is training it now (`run.lock`, held for the run's life).

The lock is an advisory `flock` on `run.lock`: the kernel drops it when its holder exits however
it exits (a kill -9 leaves at most a stale file, which locks nothing), and while it is held the file
names the holder (pid, host, start time, command) so that a refused process can say who has it. Over NFS, Linux emulates `flock` with
byte-range locks that the server sees, so processes on two hosts exclude each other too (a
filesystem mounted with `-o nolock`, or Lustre without `-o flock`, does not: there the lock only
keeps processes of one host apart).
"""
import contextlib
import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path


# The exit status of a run stopped by a signal after saving its checkpoint: 75 is EX_TEMPFAIL
# (sysexits.h, "try again later"), apart from 0, from 1 (an error) and from 128 + N (killed by
# signal N), so that a launcher can tell "resume me" from a failure. Here, with the folder's
# layout, so that a launcher's job process reads both without importing torch (checkpoints.py
# re-exports them).
PREEMPTED_EXIT_CODE = 75
# The signals a run saves and exits on (checkpoints.StopRequest); preemptible_torchrun.py passes
# them on to its workers.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def list_checkpoints(out):
    """[(step, folder)] of the checkpoint-N folders in `out`, oldest first."""
    found = []
    for path in Path(out).glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)

IDENTITY_FILE = "run_identity.json"
LOCK_FILE = "run.lock"
NOT_RECORDED = "(not recorded)"
SHOWN_CHANGES = 5  # changed flags named in a refusal's one line; the rest are counted


class RunFolderLocked(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


def write_identity(folder, identity):
    """Store `identity` ({flag: value}) in `folder`, atomically (a kill never leaves half a file)."""
    path = Path(folder) / IDENTITY_FILE
    partial = path.with_name(f".{IDENTITY_FILE}.tmp{os.getpid()}")
    partial.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def read_identity(folder, flags):
    """The identity recorded in `folder` ({flag: value}), or None when nothing is recorded. A run
    written before run_identity.json existed is read from its config.json's arguments (those among
    `flags`)."""
    folder = Path(folder)
    if (folder / IDENTITY_FILE).is_file():
        return json.loads((folder / IDENTITY_FILE).read_text())
    if (folder / "config.json").is_file():
        recorded = json.loads((folder / "config.json").read_text()).get("args", {})
        return {flag: recorded[flag] for flag in flags if flag in recorded}
    return None


def _shown(value):
    return value if isinstance(value, str) else json.dumps(value)


def identity_changes(then, now):
    """["--flag THEN → NOW", ...] for every flag of `now` whose value differs from `then`'s (a flag
    `then` lacks counts as changed). Values compare as JSON gives them back (tuples as lists)."""
    now = json.loads(json.dumps(now))
    return [f"--{flag} {_shown(then[flag]) if flag in then else NOT_RECORDED} → {_shown(value)}"
            for flag, value in now.items() if flag not in then or then[flag] != value]


def describe_changes(changes):
    """The changes for one line: the first SHOWN_CHANGES, then how many more."""
    more = len(changes) - SHOWN_CHANGES
    return ", ".join(changes[:SHOWN_CHANGES]) + (f" and {more} more" if more > 0 else "")


def describe_holder(folder):
    """One phrase naming the process that holds `folder`'s lock."""
    found = holder(folder)
    if not found:
        return "another process (it has not written its name yet)"
    command = found.get("command", "")
    command = command if len(command) <= 100 else command[:97] + "..."
    return f"pid {found.get('pid')} on {found.get('host')}, since {found.get('started')} ({command})"


class RunLock:
    """The lock on one run folder, held from acquire() to release() or the process's end. The lock
    file exists while it is held: release() removes it, and the folders acquire() created if
    nothing else was written into them, so that a run refused later (a bad input) changes nothing."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd = None
        self._created = []  # folders acquire() made, deepest first

    def acquire(self, command):
        """Take the lock (creating the folder), recording this process and its `command` (a list);
        RunFolderLocked naming the holder when another process has it. Returns self."""
        self._created = [p for p in [self.folder, *self.folder.absolute().parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderLocked(f"{self.folder} is in use by {describe_holder(self.folder)}") from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
            os.close(fd)  # its holder removed the file between our open and our lock: lock the new one
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": " ".join(str(part) for part in command)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self):
        """What the holder wrote into the lock file (this process's, while it holds it)."""
        return json.loads(self.path.read_text() or "{}")

    def release(self):
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):  # the folder removed under us: nothing left to tidy
            os.unlink(self.path)  # while held: whoever opened it meanwhile finds it gone and retries
        fcntl.flock(self._fd, fcntl.LOCK_UN)  # also for DataLoader workers forked with the descriptor
        os.close(self._fd)
        self._fd = None
        for folder in self._created:
            try:
                os.rmdir(folder)  # only when empty: nothing of a run was written there
            except OSError:
                break


def holder(folder):
    """None when no process holds `folder`'s lock, else what its holder wrote ({} before it wrote)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = path.read_text().strip()
            try:
                return json.loads(text) if text else {}
            except ValueError:  # caught mid-write
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)

