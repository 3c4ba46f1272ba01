"""The epoch plan as the pure function it is: every guarantee checked over world sizes 1..64,
loader workers 1..8 and 1..500 shards of uneven sizes (no Ray, no files)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipelines import plan


def _deal(seg):
    """{(rank, worker): [(epoch step, ids), ...]} of everything the segment still has to read."""
    return {
        (r, w): [b for win in seg.worker_windows(r, w) for b in win]
        for r in range(seg.world)
        for w in range(seg.loader_workers)
    }


def _check(counts, batch, world, workers, seed=0, epoch=1):
    seg = plan.epoch_plan(counts, seed=seed, epoch=epoch, batch_size=batch, world=world, loader_workers=workers)
    total = sum(counts)
    assert seg.steps == total // batch and seg.remainder == total - seg.steps * batch < batch
    dealt = _deal(seg)
    sizes = plan.rank_batches(batch, world)
    ids = []
    for r in range(world):
        # equal steps per rank: its workers together hold every step once, in round-robin order
        steps = sorted(s for w in range(workers) for s, _ in dealt[(r, w)])
        assert steps == list(range(seg.steps)), (r, steps[:5])
        for w in range(workers):
            mine = dealt[(r, w)]
            assert [s for s, _ in mine] == list(range(w, seg.steps, workers))  # step s -> worker s % W
            assert all(len(b) == sizes[r] for _, b in mine)
            ids += [b for _, b in mine]
        # equal shares per loader worker: within one batch
        shares = [len(dealt[(r, w)]) for w in range(workers)]
        assert max(shares) - min(shares) <= 1
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    assert len(ids) == len(np.unique(ids)) == seg.steps * batch  # each sample at most once
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < total
    # the same plan for the same inputs, another for the next epoch
    again = plan.epoch_plan(counts, seed=seed, epoch=epoch, batch_size=batch, world=world, loader_workers=workers)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(_flat(dealt), _flat(_deal(again))))
    return seg, ids


def _flat(dealt):
    return [b for k in sorted(dealt) for b in dealt[k]]


@pytest.mark.parametrize(
    "counts,batch,world,workers",
    [
        ([120], 16, 2, 2),  # one shard, two workers: both run and nothing runs dry
        ([1200], 128, 8, 8),  # one shard, more readers than blocks
        ([50, 50, 20], 16, 2, 2),  # the training tests' dataset
        ([4096] * 312 + [3263], 1024, 64, 8),  # ImageNet's 1,281,167 at 4,096 a shard on 64 GPUs x 8
        ([5, 1, 0, 7], 13, 13, 3),  # an empty shard, one sample per rank
        ([3] * 500, 100, 7, 5),  # 500 tiny shards, a batch that does not divide by the world
    ],
)
def test_plan_cases(counts, batch, world, workers):
    _check(counts, batch, world, workers)


def test_plan_over_a_grid_of_worlds_loader_workers_and_uneven_shards():
    rng = random.Random(0)
    for case in range(120):
        world, workers = rng.randint(1, 64), rng.randint(1, 8)
        shards = rng.choice([1, 2, 3, rng.randint(4, 50), rng.randint(50, 500)])
        counts = [rng.randint(0, 400) for _ in range(shards)]
        counts[0] = max(counts[0], 1)
        batch = rng.randint(world, max(world, min(4 * world + 7, sum(counts))))
        if sum(counts) < batch:
            counts[0] += batch
        _check(counts, batch, world, workers, seed=case, epoch=case % 3)


def test_blocks_keep_reads_sequential_and_epochs_differ():
    counts = [4096] * 10
    a = plan.epoch_order(counts, seed=0, epoch=1)
    b = plan.epoch_order(counts, seed=0, epoch=2)
    assert sorted(a.tolist()) == list(range(40960)) and not np.array_equal(a, b)
    runs = 1 + int(np.count_nonzero(np.diff(a) != 1))
    assert runs <= 40960 // plan.BLOCK + 10 + 1  # about one run per block: one read each


@pytest.mark.parametrize("old,new", [((2, 2), (2, 2)), ((3, 2), (2, 2)), ((2, 1), (3, 4)), ((64, 8), (61, 8))])
def test_resume_and_new_world_sizes_read_each_sample_of_the_epoch_once(old, new):
    counts = [517, 333, 1000, 12]
    batch = 64
    first = plan.epoch_plan(counts, seed=3, epoch=2, batch_size=batch, world=old[0], loader_workers=old[1])
    for done in (0, 1, first.steps // 2, first.steps - 1):
        read = first.consumed(done)
        assert len(read) == done * batch
        seg = plan.epoch_plan(
            counts, seed=3, epoch=2, batch_size=batch, world=new[0], loader_workers=new[1], segments=[(*old, done)]
        )
        rest = np.concatenate([b for bs in _deal(seg).values() for _, b in bs] or [np.zeros(0, np.int64)])
        both = np.concatenate([read, rest])
        assert len(both) == len(np.unique(both)) == first.steps * batch  # none twice, none skipped
        assert seg.epoch_steps == first.steps and seg.remainder == first.remainder
        if old == new:  # a resume on the same shape is the uninterrupted run's tail, step for step
            assert (seg.index, seg.start, seg.first_step) == (0, done, 0)
            for r in range(old[0]):
                whole = {s: b for w in range(old[1]) for s, b in _deal(first)[(r, w)]}
                tail = {s: b for w in range(old[1]) for s, b in _deal(seg)[(r, w)]}
                assert sorted(tail) == [s for s in sorted(whole) if s >= done]
                assert all(np.array_equal(whole[s], b) for s, b in tail.items())
                # DataLoader worker i now serves the stream of step done + i: steps still arrive in order
                firsts = [_deal(seg)[(r, w)][0][0] for w in range(old[1]) if _deal(seg)[(r, w)]]
                assert firsts == list(range(done, min(done + old[1], first.steps)))
        else:
            assert (seg.index, seg.start, seg.first_step) == (1, 0, done)


def test_two_world_changes_in_one_epoch():
    counts = [900, 700]
    segs = []
    for world, done in ((4, 3), (3, 5), (5, 2)):
        seg = plan.epoch_plan(counts, seed=0, epoch=1, batch_size=40, world=world, loader_workers=2, segments=segs)
        segs.append((world, 2, done))
    seg = plan.epoch_plan(counts, seed=0, epoch=1, batch_size=40, world=2, loader_workers=2, segments=segs)
    assert seg.first_step == 10 and seg.epoch_steps == 1600 // 40


def test_plan_errors_name_the_value_and_the_fix():
    with pytest.raises(
        ValueError, match="100 training samples cannot fill one global batch of 128: lower --batch-size"
    ):
        plan.epoch_plan([100], seed=0, epoch=1, batch_size=128, world=2, loader_workers=1)
    with pytest.raises(ValueError, match="use --batch-size >= 8"):
        plan.epoch_plan([100], seed=0, epoch=1, batch_size=4, world=8, loader_workers=1)


def test_validation_reads_every_sample_once_over_ranks_and_workers():
    for counts, world, workers in (([7, 5, 2], 3, 2), ([50000 // 64] * 64, 64, 8), ([3], 8, 4)):
        ids = [
            b
            for r in range(world)
            for batches in plan.eval_share(counts, rank=r, world=world, loader_workers=workers, batch_size=5)
            for b in batches
        ]
        ids = np.concatenate(ids) if ids else np.zeros(0)
        assert sorted(ids.tolist()) == list(range(sum(counts)))


def test_the_left_out_samples_are_a_new_random_choice_every_epoch():
    left = []
    for epoch in range(1, 31):
        seg = plan.epoch_plan([120], seed=0, epoch=epoch, batch_size=16, world=2, loader_workers=2)
        used = np.concatenate([b for bs in _deal(seg).values() for _, b in bs])
        left.append(set(range(120)) - set(used.tolist()))
        assert len(left[-1]) == seg.remainder == 8
    assert len(set().union(*left)) > 100  # 30 epochs x 8: nearly every sample is left out once, none always
    assert max(sum(i in s for s in left) for i in range(120)) <= 8
