"""The pool's batch policy, on plain numbers and a fake clock."""

from __future__ import annotations

from aecho.offload import batching


def test_cheap_handlers_get_large_batches_costly_ones_small() -> None:
    assert batching.min_batch(0.0) == batching.MAX_MIN_BATCH  # nothing measured yet
    assert batching.min_batch(1e-7) == batching.MAX_MIN_BATCH  # echo: IPC dominates
    assert batching.min_batch(1e-5) == 20
    assert batching.min_batch(1e-3) == 1  # burn: one message is worth a task


def test_tasks_are_cut_to_free_positions_and_even_shares() -> None:
    assert batching.task_count(queued=1000, free_positions=4, smallest=20) == 4
    assert batching.task_count(queued=30, free_positions=4, smallest=20) == 2
    assert batching.task_count(queued=5, free_positions=4, smallest=20) == 1
    assert batching.task_size(queued=1000, tasks_left=4) == 250
    assert batching.task_size(queued=10_000, tasks_left=2) == batching.MAX_BATCH


def test_a_small_queue_waits_only_for_tasks_still_due() -> None:
    now = 100.0
    started = now - 0.001
    due = batching.due_at(started, cost=1e-4, messages=10)
    assert due == started + batching.DUE_GRACE_S + 2e-3
    # A task due back later: wait for it (its return flushes the queue).
    assert batching.next_return([due], now) == due
    # A task past its due time (a stuck handler) holds nobody up.
    assert batching.next_return([now - 1.0], now) is None
    assert batching.next_return([now - 1.0, due, due + 1], now) == due
    assert batching.next_return([], now) is None


def test_a_task_is_late_past_fifty_milliseconds_or_four_times_its_expected_work() -> None:
    assert batching.late_at(10.0, cost=0.0, messages=32) == 10.0 + batching.LATE_AFTER_S
    assert batching.late_at(10.0, cost=1e-6, messages=1024) == 10.0 + batching.LATE_AFTER_S
    assert batching.late_at(10.0, cost=1e-3, messages=20) == 10.0 + 0.08
