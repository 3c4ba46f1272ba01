"""The training data plan: which samples each rank and loader worker reads, step by step.

    plan = epoch_plan([4096, 4096, 1200], seed=0, epoch=3, batch_size=128, world=8, loader_workers=4)
    plan.steps, plan.remainder            # steps this epoch; samples left out (< one global batch)
    plan.worker_windows(rank=2, worker=1) # [[(step, sample ids), ...], ...] in the order read

A pure function of (seed, epoch, world size, loader workers, shard sample counts, global batch,
block, buffer, and the segments already run this epoch): no Ray, no torch, no I/O, so every
guarantee below is tested directly (tests/test_plan.py) for world sizes 1..64, 1..8 loader
workers and 1..500 uneven shards.

Samples are numbered 0..N-1 shard after shard. Each epoch:
1. Every shard is cut into blocks of ``block`` consecutive samples (the cut points move by a
   seeded phase each epoch) and the blocks of all shards are shuffled together. A block is one
   seek on disk or one ranged GET on S3; the shard stage already stored each shard's samples in
   a seeded random order, so consecutive samples are not of one class.
2. ``steps = N // batch_size`` global batches are used; the remainder (fewer than one global
   batch) is left out of this epoch: a seeded random choice of samples, another each epoch, so
   none is left out for good and none more often than another.
3. Step s takes the next ``batch_size`` samples; rank r takes its slice of them
   (``batch_size // world`` each, the first ``batch_size % world`` ranks one more). So every rank
   runs the same number of steps and every used sample is read exactly once, at any number of
   shards, however uneven.
4. A rank's steps go round-robin to its loader workers (step s to worker s % W), which is the
   order torch's DataLoader collects batches from its workers; each worker owns its steps' samples
   and shuffles them within windows of about ``buffer`` samples (the shuffle buffer, without its
   warm-up or its bias), reading a window's samples as runs of consecutive samples.

Resume and elastic workers: a checkpoint stores, per epoch, the segments run so far as
(world, loader_workers, steps done). A resume with the same world and loader workers continues
the same segment at the next step: the rest of the epoch is what an uninterrupted run does. A
resume with another world (a node lost, or regained) ends the segment: its unread samples (and
the epoch's remainder) are dealt anew over the new world, in their epoch order, so within the
epoch no sample is read twice and none is skipped beyond the remainder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

BLOCK = 64  # ~2 MB of 256 px q90 JPEGs: one sequential read, large enough for S3's per-request cost
BUFFER = 2000  # samples a loader worker shuffles among (~60 MB of JPEG bytes at 256 px)


def seed_for(*parts) -> int:
    """A 63-bit seed derived from any parts, e.g. (seed, epoch, rank, worker)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def rank_batches(batch_size: int, world: int) -> list[int]:
    """Per-rank batch sizes summing to the global batch: the first batch_size % world ranks take one more."""
    q, r = divmod(batch_size, world)
    return [q + (i < r) for i in range(world)]


def epoch_order(counts: list[int], *, seed: int, epoch: int, block: int = BLOCK) -> np.ndarray:
    """Every sample id 0..N-1 once: blocks of consecutive samples within a shard, shuffled."""
    rng = np.random.default_rng(seed_for(seed, epoch, "blocks"))
    starts, lengths, base = [], [], 0
    for n in counts:
        if n:
            phase = int(rng.integers(0, min(block, n)))  # moves the cut points every epoch
            cuts = sorted({0, n, *range(phase or block, n, block)})
            starts += [base + a for a in cuts[:-1]]
            lengths += [b - a for a, b in zip(cuts, cuts[1:])]
        base += n
    if not starts:
        return np.zeros(0, dtype=np.int64)
    perm = rng.permutation(len(starts))
    starts, lengths = np.asarray(starts, np.int64)[perm], np.asarray(lengths, np.int64)[perm]
    # ids = start of each sample's block + its offset inside the block, without a Python loop
    offsets = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


@dataclass(frozen=True)
class Segment:
    """The part of an epoch run at one (world, loader_workers): its samples, in epoch order."""

    order: np.ndarray  # the sample ids this segment deals (used, then the remainder)
    batch_size: int  # global batch
    world: int
    loader_workers: int
    seed: int
    epoch: int
    index: int = 0  # which segment of the epoch (0 unless the world changed mid-epoch)
    first_step: int = 0  # the epoch's step number of this segment's step 0
    start: int = 0  # steps of this segment already done (a resume continues after them)
    buffer: int = BUFFER

    @property
    def steps(self) -> int:
        """Steps of this segment, done or not."""
        return len(self.order) // self.batch_size

    @property
    def remainder(self) -> int:
        """Samples this epoch leaves out: fewer than one global batch."""
        return len(self.order) - self.steps * self.batch_size

    @property
    def epoch_steps(self) -> int:
        """Steps of the whole epoch: the same whatever the segments, as each deals what is left."""
        return self.first_step + self.steps

    def _slice(self, step: int, rank: int) -> np.ndarray:
        sizes = rank_batches(self.batch_size, self.world)
        at = step * self.batch_size + sum(sizes[:rank])
        return self.order[at : at + sizes[rank]]

    def stream(self, rank: int, worker: int) -> list[tuple[list[int], np.ndarray]]:
        """Loader worker ``worker`` of ``rank``: windows of (segment steps, their samples shuffled).

        Each window's samples are its steps' slices concatenated and permuted; batch k of the
        window is permuted[k*b:(k+1)*b]."""
        b = rank_batches(self.batch_size, self.world)[rank]
        steps = list(range(worker, self.steps, self.loader_workers))
        per_window = max(1, self.buffer // max(b, 1))
        out = []
        for w0 in range(0, len(steps), per_window):
            ws = steps[w0 : w0 + per_window]
            ids = np.concatenate([self._slice(s, rank) for s in ws]) if ws else np.zeros(0, np.int64)
            rng = np.random.default_rng(seed_for(self.seed, self.epoch, self.index, rank, worker, w0))
            out.append((ws, ids[rng.permutation(len(ids))]))
        return out

    def worker_windows(self, rank: int, worker: int) -> list[list[tuple[int, np.ndarray]]]:
        """What DataLoader worker ``worker`` of ``rank`` yields from step ``start`` on, as windows
        of (epoch step, sample ids), each window read at once.

        The DataLoader collects batches round-robin from worker 0; after a resume at step
        ``start`` its worker i serves stream (start + i) % W, so the batches still arrive in
        step order."""
        stream = (self.start + worker) % self.loader_workers
        b = rank_batches(self.batch_size, self.world)[rank]
        out = []
        for ws, ids in self.stream(rank, stream):
            window = [(self.first_step + s, ids[k * b : (k + 1) * b]) for k, s in enumerate(ws) if s >= self.start]
            if window:
                out.append(window)
        return out

    def consumed(self, steps_done: int) -> np.ndarray:
        """The sample ids that the first ``steps_done`` steps of this segment read, over all ranks."""
        parts = []
        for rank in range(self.world):
            for worker in range(self.loader_workers):
                b = rank_batches(self.batch_size, self.world)[rank]
                for ws, ids in self.stream(rank, worker):
                    done = sum(1 for s in ws if s < steps_done)
                    parts.append(ids[: done * b])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def rest(self, steps_done: int) -> np.ndarray:
        """This segment's samples not read by its first ``steps_done`` steps, in epoch order."""
        return self.order[~np.isin(self.order, self.consumed(steps_done))]


def epoch_plan(
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    world: int,
    loader_workers: int,
    block: int = BLOCK,
    buffer: int = BUFFER,
    segments: list | tuple = (),
) -> Segment:
    """The segment this (world, loader_workers) runs now, given the ``segments`` already run in
    this epoch as (world, loader_workers, steps done) triples (empty at the epoch's start)."""
    if batch_size < world:
        raise ValueError(
            f"A global batch of {batch_size} cannot give each of {world} workers a sample: use --batch-size >= {world}."
        )
    if world < 1 or loader_workers < 1:
        raise ValueError(f"world {world} and loader workers {loader_workers} must both be at least 1.")
    total = sum(counts)
    if total < batch_size:
        raise ValueError(
            f"{total} training samples cannot fill one global batch of {batch_size}: "
            f"lower --batch-size to at most {total}."
        )
    order = epoch_order(counts, seed=seed, epoch=epoch, block=block)
    left_out = total % batch_size
    if left_out:  # a seeded random choice, moved to the end: any sample may be the one left out
        out = np.zeros(total, dtype=bool)
        out[np.random.default_rng(seed_for(seed, epoch, "left out")).choice(total, left_out, replace=False)] = True
        order = np.concatenate([order[~out], order[out]])
    first = 0
    for i, (w, lw, done) in enumerate(segments):
        seg = Segment(order, batch_size, int(w), int(lw), seed, epoch, i, first, int(done), buffer)
        last = i == len(segments) - 1
        if last and (seg.world, seg.loader_workers) == (world, loader_workers):
            return seg  # same shape: carry on where it stopped
        order, first = seg.rest(int(done)), first + int(done)
    return Segment(order, batch_size, world, loader_workers, seed, epoch, len(segments), first, 0, buffer)


def eval_share(
    counts: list[int], *, rank: int, world: int, loader_workers: int, batch_size: int
) -> list[list[np.ndarray]]:
    """Validation: every sample exactly once over all ranks. Rank r takes a contiguous share
    (sizes differ by at most one), split into contiguous parts per loader worker, in batches."""
    total = sum(counts)
    lo, hi = total * rank // world, total * (rank + 1) // world
    out = []
    for w in range(loader_workers):
        a, b = lo + (hi - lo) * w // loader_workers, lo + (hi - lo) * (w + 1) // loader_workers
        out.append([np.arange(i, min(i + batch_size, b), dtype=np.int64) for i in range(a, b, batch_size)])
    return out
