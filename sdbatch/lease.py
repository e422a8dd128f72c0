"""Who may write a shard (or a plan), and when: leases with fencing on a shared filesystem.

A lease on a resource is a folder `<resource>/g<N>`, made with mkdir (atomic and exclusive on a local disk and over
NFS), where N is the generation: the fencing token. Its mtime is the heartbeat: a holder renews it every few
seconds from a thread of its own, whatever its batches do, and it expires `lease_s` after the last renewal. A
worker takes a resource only when the newest generation has expired (or was released, or its process is certainly
gone: same host, same boot, same PID namespace, and that PID no longer runs the same process), by making the
folder of the next generation; only one mkdir of a name can succeed, so two takers never both win.

The generation folder is also where the holder stages every file it writes for the resource (images, ledgers, the
plan): a write is a rename from there into place. Before reading the resource's state, a new holder fences the
older generations by deleting their folders, so a superseded holder's late rename finds no source file and fails
(LeaseLost): either its write landed before the fence, and the new holder sees it, or it never lands. Names of
generations are never reused (the newest folder is kept, released or not), so a fenced folder cannot come back.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("sdbatch")
HOLDER_FILE = "holder.json"


class LeaseLost(Exception):
    """This worker's lease was taken over (or never held): it must not write the resource any more."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: enough to log it, and to tell for certain that its process is gone."""
    token: str
    worker: str  # e.g. "worker 3 of 8", for people reading logs
    host: str
    boot_id: str
    pid_namespace: str
    pid: int
    process_start: str  # the process's start time in clock ticks since boot: tells a reused PID apart

    @classmethod
    def this_process(cls, worker: str) -> "Holder":
        return cls(uuid.uuid4().hex, worker, socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"),
                   _namespace("pid"), os.getpid(), _process_start(os.getpid()))

    def certainly_gone(self, other: dict) -> bool:
        """True only when `other` ran in this very PID namespace of this boot of this host and has exited."""
        same_place = (other.get("host"), other.get("boot_id"), other.get("pid_namespace")) == (
            self.host, self.boot_id, self.pid_namespace)
        if not (same_place and self.boot_id and self.pid_namespace and isinstance(other.get("pid"), int)):
            return False
        return _process_start(other["pid"]) != other.get("process_start")


@dataclass(frozen=True)
class Busy:
    """A live lease held by someone else."""
    generation: int
    holder: dict
    expires_at: float

    def describe(self) -> str:
        who = self.holder.get("worker") or "a worker"
        where = f"{self.holder.get('host', '?')}:{self.holder.get('pid', '?')}"
        until = datetime.fromtimestamp(self.expires_at, timezone.utc).strftime("%H:%M:%S UTC")
        return f"{who} ({where}, generation {self.generation}) until at least {until} unless renewed"


class Lease:
    """One worker's claim on one resource folder (e.g. leases/shard-00007)."""

    def __init__(self, folder: Path, holder: Holder, lease_s: float):
        self.folder, self.holder, self.lease_s = Path(folder), holder, lease_s
        self.generation: int | None = None
        self.lost = False

    @property
    def staging(self) -> Path:
        """This generation's folder: stage files here, then commit() them into place."""
        if self.generation is None:
            raise LeaseLost(f"{self.folder} is not held")
        return self.folder / generation_name(self.generation)

    def staging_exists(self) -> bool:
        return self.generation is not None and self.staging.is_dir()

    def acquire(self) -> Busy | None:
        """Take the resource: None when this worker now holds it, else who holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            newest = newest_generation(self.folder)
            if newest is not None:
                busy = self._live(newest)
                if busy:
                    return busy
            wanted = (newest or 0) + 1
            try:
                (self.folder / generation_name(wanted)).mkdir()
            except FileExistsError:
                continue  # another worker took this generation first: look again
            self.generation, self.lost = wanted, False
            self._write_holder()
            self._fence_older()
            return None
        raise LeaseLost(f"could not take {self.folder}: it changed hands 100 times in a row")

    def renew(self) -> bool:
        """Heartbeat: push the expiry on. False (and `lost`) once the lease was fenced by a newer holder."""
        if self.lost or self.generation is None:
            return False
        try:
            os.utime(self.staging)
            return True
        except FileNotFoundError:
            self.lost = True
            log.warning("the lease on %s was taken over by another worker; leaving that resource to it",
                        self.folder.name)
            return False

    def release(self) -> None:
        """Expire the lease now (its folder stays: a generation's name is never used again)."""
        if self.generation is None or self.lost:
            return
        try:
            os.utime(self.staging, (0, 0))
        except FileNotFoundError:
            pass
        self.generation = None

    def commit(self, temp: Path, destination: Path) -> None:
        """Move a file staged in this generation's folder into place, unless a newer holder has fenced us."""
        newest = newest_generation(self.folder)
        if self.lost or self.generation is None or newest != self.generation:
            self.lost = True
            raise LeaseLost(f"{self.folder.name}: generation {self.generation} was superseded by {newest}")
        try:
            os.replace(temp, destination)
        except FileNotFoundError:
            if not self.staging.is_dir():  # our folder is gone: a newer holder fenced us
                self.lost = True
                raise LeaseLost(f"{self.folder.name}: fenced by a newer generation") from None
            raise

    def _live(self, generation: int) -> Busy | None:
        path = self.folder / generation_name(generation)
        try:
            renewed = path.stat().st_mtime
        except FileNotFoundError:
            return None  # fenced a moment ago by a newer generation, which the caller's mkdir will meet
        holder = _read_json(path / HOLDER_FILE)
        expires_at = renewed + self.lease_s
        if time.time() >= expires_at or self.holder.certainly_gone(holder):
            return None
        return Busy(generation, holder, expires_at)

    def _write_holder(self) -> None:
        temp = self.staging / f".{HOLDER_FILE}.tmp"
        temp.write_text(json.dumps(asdict(self.holder)))
        os.replace(temp, self.staging / HOLDER_FILE)

    def _fence_older(self) -> None:
        for name in os.listdir(self.folder):
            generation = parse_generation(name)
            if generation is not None and generation < self.generation:
                remove_tree(self.folder / name)


def generation_name(generation: int) -> str:
    return f"g{generation:09d}"


def parse_generation(name: str) -> int | None:
    return int(name[1:]) if name.startswith("g") and name[1:].isdigit() else None


def newest_generation(folder: Path) -> int | None:
    try:
        generations = [parse_generation(name) for name in os.listdir(folder)]
    except FileNotFoundError:
        return None
    return max((g for g in generations if g is not None), default=None)


def remove_tree(path: Path) -> None:
    """Delete a folder and everything in it, also while a fenced holder may still be creating files there."""
    for _ in range(1000):
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    remove_tree(Path(entry.path))
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # not empty: the fenced holder created a file meanwhile; go round again
            continue
    raise OSError(f"could not remove {path}: files keep appearing in it")


class Heartbeat:
    """Renews every lease this worker holds, every lease_s/4, on a thread of its own."""

    def __init__(self, lease_s: float):
        self.interval = lease_s / 4
        self.leases: set[Lease] = set()
        self.guard = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="sdbatch-heartbeat", daemon=True)
        self.thread.start()

    def add(self, lease: Lease) -> None:
        with self.guard:
            self.leases.add(lease)

    def remove(self, lease: Lease) -> None:
        with self.guard:
            self.leases.discard(lease)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.guard:
                leases = list(self.leases)
            for lease in leases:
                try:
                    lease.renew()
                except OSError as error:  # a flaky disk: try again next beat; expiry takes care of the rest
                    log.warning("could not renew the lease on %s: %s", lease.folder.name, error)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _namespace(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time since boot), or "" when there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[19] if stat else ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
