"""The shared-memory primitive under the admission budget and the pool's lease table:
files that are not ours are refused with their name, budget files leave with their
last user, and the liveness check and the fair queue behave as both tables need."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import uuid
from pathlib import Path

import numpy as np
import pytest

from engine_runtime.memory import SharedBudget, SharedBudgetError, budget_path, remove_unused_budgets
from engine_runtime.memory._shm import (
    SharedMemoryFileError,
    TicketQueue,
    dead_among,
    process_alive,
    process_start,
    this_process,
)
from engine_runtime.memory.pool._lease_table import LeaseTable

CTX = mp.get_context("spawn")


@pytest.fixture
def key(tmp_path):
    return f"test-{uuid.uuid4().hex[:12]}"


def _open_and_wait(key, directory, ready, done):
    budget = SharedBudget(key, directory=directory)
    ready.set()
    done.wait(30)
    budget.close()


def _open_and_die(key, directory, ready):
    SharedBudget(key, directory=directory)
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


# -- files that are not ours ------------------------------------------------------


def test_budget_refuses_a_symlink_at_its_path(key, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, budget_path(key, str(tmp_path)))
    with pytest.raises(SharedBudgetError, match="symbolic link") as err:
        SharedBudget(key, directory=str(tmp_path))
    assert budget_path(key, str(tmp_path)) in str(err.value)
    assert target.read_bytes() == b""  # nothing was written through the link


def test_budget_refuses_a_file_others_may_write(key, tmp_path):
    path = budget_path(key, str(tmp_path))
    SharedBudget(key, capacity_bytes=5, directory=str(tmp_path))
    os.chmod(path, 0o666)
    with pytest.raises(SharedBudgetError, match="mode 666") as err:
        SharedBudget(key, directory=str(tmp_path))
    assert path in str(err.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_budget_refuses_another_users_file(key, tmp_path):
    path = budget_path(key, str(tmp_path))
    SharedBudget(key, directory=str(tmp_path))
    os.chown(path, 65534, 65534)
    with pytest.raises(SharedBudgetError, match="owned by uid 65534"):
        SharedBudget(key, directory=str(tmp_path))


def test_budget_file_is_created_private(key, tmp_path):
    SharedBudget(key, directory=str(tmp_path)).close()
    budget = SharedBudget(key, directory=str(tmp_path))
    assert stat.S_IMODE(os.stat(budget.path).st_mode) == 0o600
    budget.close()


def test_lease_table_refuses_a_symlink_and_a_writable_file(tmp_path):
    real = tmp_path / "table"
    LeaseTable.create(real, max_chunks=2, chunk_bytes=4096).close()
    link = tmp_path / "link"
    os.symlink(real, link)
    with pytest.raises(SharedMemoryFileError, match="symbolic link") as err:
        LeaseTable.open(link)
    assert str(link) in str(err.value)
    os.chmod(real, 0o622)
    with pytest.raises(SharedMemoryFileError, match="mode 622"):
        LeaseTable.open(real)


def test_lease_table_create_leaves_no_temporary_file(tmp_path):
    table = LeaseTable.create(tmp_path / "t", max_chunks=2, chunk_bytes=4096)
    table.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert stat.S_IMODE(os.stat(tmp_path / "t").st_mode) == 0o600


# -- the budget file's life -------------------------------------------------------


def test_budget_names_carry_the_user(key):
    assert f"-u{os.geteuid()}-" in Path(budget_path(key)).name


def test_last_user_removes_the_budget_file(key, tmp_path):
    directory = str(tmp_path)
    ready, done = CTX.Event(), CTX.Event()
    other = CTX.Process(target=_open_and_wait, args=(key, directory, ready, done))
    other.start()
    try:
        assert ready.wait(30)
        budget = SharedBudget(key, capacity_bytes=7, directory=directory)
        second = SharedBudget(key, directory=directory)
        budget.close()
        second.close()
        assert os.path.exists(budget.path)  # the other process still uses it
        done.set()
        other.join(30)
        assert other.exitcode == 0
        assert not os.path.exists(budget.path)
    finally:
        done.set()
        other.join(30)


def test_one_handle_closing_keeps_the_processes_place(key, tmp_path):
    first = SharedBudget(key, capacity_bytes=7, directory=str(tmp_path))
    second = SharedBudget(key, directory=str(tmp_path))
    first.close()
    first.close()  # idempotent
    assert os.path.exists(second.path)
    assert second.snapshot().capacity_bytes == 7
    second.close()
    assert not os.path.exists(second.path)


def test_budget_files_of_dead_processes_are_swept(key, tmp_path):
    directory = str(tmp_path)
    ready = CTX.Event()
    dead = CTX.Process(target=_open_and_die, args=(key, directory, ready))
    dead.start()
    assert ready.wait(30)
    dead.join(30)
    live = SharedBudget(f"{key}-live", directory=directory)
    stale = budget_path(key, directory)
    assert os.path.exists(stale)
    assert remove_unused_budgets(directory) == [stale]
    assert not os.path.exists(stale) and os.path.exists(live.path)
    live.close()


def test_budget_reopened_after_its_removal_is_fresh(key, tmp_path):
    budget = SharedBudget(key, capacity_bytes=9, directory=str(tmp_path))
    budget.close()
    again = SharedBudget(key, directory=str(tmp_path))
    assert again.snapshot().capacity_bytes is None
    again.close()


# -- liveness and the queue -------------------------------------------------------


def test_liveness_by_pid_and_start_time():
    me = this_process()
    assert process_alive(*me)
    assert not process_alive(me[0], me[1] + 1)  # our pid, another start: a process before us
    assert not process_alive(0, 0)
    assert dead_among({me, (me[0], me[1] + 1)}, me) == {(me[0], me[1] + 1)}
    assert process_start(os.getpid()) == me[1] > 0


def test_ticket_queue_is_first_come_first_served():
    counters = np.zeros(2, np.int64)
    cols = {k: np.zeros(3, np.int64) for k in ("ticket", "pid", "start", "wanted")}
    q = TicketQueue(counters, 0, 1, **cols)
    a, b, c = q.enqueue((1, 1), 10), q.enqueue((2, 2), 20), q.enqueue((3, 3), 30)
    assert 0 < a < b < c and q.waiting == 3
    assert q.enqueue((4, 4), 40) == 0  # full
    assert q.head() == a and [q.ahead_of(t) for t in (a, b, c)] == [0, 1, 2]
    q.dequeue(a)
    assert q.head() == b and q.ahead_of(c) == 1
    assert q.drop({(2, 2)}) == 1 and q.head() == c and q.members() == {(3, 3)}
    q.dequeue(c)
    assert q.waiting == 0 and q.head() == 0
