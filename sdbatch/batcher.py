"""Which shards this worker takes (its own, then others' that nobody holds), and full static-shape batches drawn
from all the shards it holds at once, so a nightly run's few changed rows per shard still fill the GPU."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque

from sdbatch import SdbatchError
from sdbatch.lease import Busy
from sdbatch.manifest import ImageJob
from sdbatch.shard import Context, Shard, complete
from sdbatch.workers import shards_for, steal_order
from sdbatch.writer import describe_os_error

log = logging.getLogger("sdbatch")
MARKS_EVERY_S = 5.0  # how often the plan's completion marks are listed again
LEDGER_FLUSH_S = 30.0  # an open shard's ledger is rewritten at least this often
MAX_WAIT_BATCHES = 8  # a job waits at most this many batches for its group to fill


class ShardQueue:
    """The order in which this worker looks at shards: its own first, then (with stealing) everyone else's."""

    def __init__(self, ctx: Context, steal: bool):
        count = ctx.plan.num_shards
        self.ctx = ctx
        self.own = shards_for(ctx.worker, count)
        self.own_set = set(self.own)
        self.order = self.own + (steal_order(ctx.worker, count) if steal else [])
        self.cursor = 0
        self.complete: set[int] = set()
        self.taken: set[int] = set()  # opened by this worker in this run
        self.busy: dict[int, Busy] = {}  # seen held by another worker
        self.told: dict[int, int] = {}  # own shard -> the holder generation already logged
        self.stats = Counter()
        self._marks, self._marks_at = {}, 0.0

    def claim(self) -> Shard | None:
        """The next shard in order that has work and no live holder, leased and examined."""
        while self.cursor < len(self.order):
            shard = self.order[self.cursor]
            self.cursor += 1
            opened = self._try(shard)
            if opened:
                return opened
        return None

    def retry_busy(self) -> Shard | None:
        """A shard seen held by another worker whose lease has expired (or been released) since."""
        for shard in sorted(self.busy, key=lambda s: (s not in self.own_set, s)):
            opened = self._try(shard)
            if opened:
                return opened
        return None

    def nothing_to_do(self) -> bool:
        """Every shard this worker would look at is complete already (read from the plan's marks alone)."""
        marks = self._marks_now()
        for shard in self.order:
            if not complete(self.ctx, shard, marks.get(shard), examined_here=False):
                return False
        for shard in self.order:
            self._done_elsewhere(shard, marks[shard])
        return True

    def own_left(self) -> list[int]:
        return [s for s in self.own if s not in self.complete]

    def finished(self, shard: int) -> None:
        self.complete.add(shard)

    def lost(self, shard: int) -> None:
        """Our lease on this shard was taken over: it is someone else's now, and waited for if it is ours."""
        self.taken.discard(shard)
        self.busy[shard] = None

    def wait(self, seconds: float) -> None:
        """Log who holds this worker's unfinished shards (once per holder), then sleep."""
        for shard in self.own_left():
            busy = self.busy.get(shard)
            if busy is not None and self.told.get(shard) != busy.generation:
                log.info("shard %d is held by %s; waiting for it to finish (or for its lease to expire)",
                         shard, busy.describe())
                self.told[shard] = busy.generation
        time.sleep(seconds)

    def _try(self, shard: int) -> Shard | None:
        if shard in self.complete or shard in self.taken:
            return None
        mark = self._marks_now().get(shard)
        if complete(self.ctx, shard, mark, examined_here=False):
            return self._done_elsewhere(shard, mark)
        lease = self.ctx.lease(shard)
        busy = lease.acquire()
        if busy:
            self.busy[shard] = busy
            return None
        self.busy.pop(shard, None)
        mark = self.ctx.plan.mark(shard)  # again, now that no one else can be working on it
        if complete(self.ctx, shard, mark, examined_here=False):
            lease.release()
            return self._done_elsewhere(shard, mark)
        self.ctx.heartbeat.add(lease)
        self.taken.add(shard)
        self.stats["own" if shard in self.own_set else "helped"] += 1
        try:
            return Shard(self.ctx, shard, lease)
        except BaseException:
            self.ctx.heartbeat.remove(lease)
            lease.release()
            raise

    def _done_elsewhere(self, shard: int, mark: dict) -> None:
        if shard in self.complete:
            return None
        self.complete.add(shard)
        if shard in self.own_set:
            self.ctx.counts["unchanged"] += mark.get("ok", 0)
            if mark.get("worker") not in (None, self.ctx.worker.index):
                self.stats["own done by others"] += 1
        return None

    def _marks_now(self) -> dict:
        if time.monotonic() - self._marks_at > MARKS_EVERY_S:
            self._marks, self._marks_at = self.ctx.plan.done_marks(), time.monotonic()
        return self._marks


class Batcher:
    """Jobs of every open shard, grouped by what lets them share a batch; shards committed once written."""

    def __init__(self, ctx: Context, queue: ShardQueue, batch_size: int, max_open: int, batch_key, on_open=None):
        self.ctx, self.queue, self.batch_size, self.max_open = ctx, queue, batch_size, max_open
        self.batch_key = batch_key  # jobs with equal keys can share one static-shape batch
        self.on_open = on_open or (lambda shard: None)
        self.open: dict[int, Shard] = {}
        self.groups: dict[tuple, deque] = {}
        self.unbatched: Counter = Counter()  # shard -> jobs still waiting in a group
        self.batches = 0
        self.flushed_at = time.monotonic()

    def next_batch(self) -> list[ImageJob] | None:
        """A full batch when one can be had: claims more shards until some group fills, else the fullest."""
        while True:
            self._drop_lost()
            ripe = self._ripe()
            if ripe is not None:
                return self._take(ripe)
            if len(self.open) < self.max_open:
                shard = self.queue.claim()
                if shard is not None:
                    self.add(shard)
                    continue
            fullest = max(self.groups, key=lambda k: len(self.groups[k]), default=None)
            return self._take(fullest) if fullest is not None else None

    def add(self, shard: Shard) -> None:
        self.open[shard.number] = shard
        shard.in_flight = len(shard.todo)
        self.on_open(shard)
        for job in shard.todo:
            self.groups.setdefault(self.batch_key(job), deque()).append((self.batches, job))
        self.unbatched[shard.number] = len(shard.todo)
        if not shard.todo:
            self.commit_ready()

    def commit_ready(self, everything: bool = False) -> None:
        """Commit every open shard whose images are all written (and release it); every LEDGER_FLUSH_S, also
        record the others' progress. A failed write ends the run here, after recording what was written."""
        flush = everything or time.monotonic() - self.flushed_at > LEDGER_FLUSH_S
        for number, shard in list(self.open.items()):
            if shard.write_error is not None:
                self._fail(shard)
            if shard.lost:
                self._close(shard)
            elif self.unbatched[number] == 0 and shard.written:
                self._commit(shard, final=True)
            elif flush:
                self._commit(shard, final=False)
        if flush:
            self.flushed_at = time.monotonic()

    def close(self) -> None:
        """Stopping: record what is written of every open shard and let the shards go."""
        for shard in list(self.open.values()):
            if not shard.lost:
                final = self.unbatched[shard.number] == 0 and shard.written
                self._commit(shard, final=final)
            self._close(shard)

    def _commit(self, shard: Shard, final: bool) -> None:
        try:
            shard.commit(final)
        except Exception as error:
            if shard.lost or not shard.lease.staging_exists():
                shard.lease.lost = True
                self._close(shard)
                return
            raise SdbatchError(f"Writing the ledger of shard {shard.number} ({shard.ledger_file}) failed: "
                               f"{describe_os_error(error)}. The images written so far stay on disk and carry their "
                               f"ledger rows; fix the disk and rerun to record them.") from None
        if final:
            self.ctx.counts["removed"] += shard.removed
            self.ctx.counts["unchanged"] += shard.kept.num_rows
            self.ctx.counts["skipped"] += len(shard.skipped)
            self.ctx.skipped_names += [s["id"] or s["reason"] for s in shard.skipped[:5]]
            self.queue.finished(shard.number)
            self._close(shard)

    def _close(self, shard: Shard) -> None:
        if shard.lost:
            log.warning("shard %d was taken over by another worker (this worker stalled past its lease); its "
                        "images from here on are that worker's", shard.number)
            self.queue.lost(shard.number)
            self._forget_jobs(shard.number)
        shard.release()
        self.open.pop(shard.number, None)

    def _fail(self, shard: Shard) -> None:
        """A write failed: record what every open shard has written, let them all go, and stop the run."""
        error = shard.write_error
        for other in list(self.open.values()):
            if not other.lost and other.written:
                self._commit(other, final=False)
        self.abandon()
        raise SdbatchError(f"Writing an image under {shard.image_dir} failed: {describe_os_error(error)}. The "
                           f"images already written are recorded in {shard.ledger_file}; fix the disk and rerun.")

    def abandon(self) -> None:
        """Let every open shard go without recording anything more (the next holder adopts what was written)."""
        for shard in list(self.open.values()):
            shard.release()
            self.open.pop(shard.number, None)

    def _drop_lost(self) -> None:
        for shard in list(self.open.values()):
            if shard.lost:
                self._close(shard)

    def _forget_jobs(self, number: int) -> None:
        for key, jobs in list(self.groups.items()):
            kept = deque(item for item in jobs if item[1].shard != number)
            if kept:
                self.groups[key] = kept
            else:
                del self.groups[key]
        self.unbatched.pop(number, None)

    def _ripe(self) -> tuple | None:
        """A group that can fill a batch, or whose oldest job has waited long enough."""
        for key, jobs in self.groups.items():
            if len(jobs) >= self.batch_size or self.batches - jobs[0][0] >= MAX_WAIT_BATCHES:
                return key
        return None

    def _take(self, key: tuple) -> list[ImageJob]:
        jobs = self.groups[key]
        batch = [jobs.popleft()[1] for _ in range(min(self.batch_size, len(jobs)))]
        if not jobs:
            del self.groups[key]
        for job in batch:
            self.unbatched[job.shard] -= 1
        self.batches += 1
        return batch
