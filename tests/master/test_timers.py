from cbas.master.timers import Deadlines
from cbas.master.worker_manager import WorkerManager
from cbas.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_deadlines_expire_once_in_order() -> None:
    deadlines = Deadlines()
    deadlines.arm("b", 10)
    deadlines.arm("a", 5)
    deadlines.shorten("b", 20)  # never later
    assert deadlines.due("b") == 10
    assert deadlines.pop_expired(4.9) == []
    assert deadlines.pop_expired(10) == ["a", "b"]
    assert deadlines.pop_expired(100) == []


def test_worker_dead_after_missed_pings() -> None:
    clock = Clock()
    manager = WorkerManager(Settings(ping_interval=30, ping_missed_max=4, boot_timeout=300), clock=clock)
    manager.launched("i-1")
    clock.now += 299
    assert manager.dead() == []
    manager.pinged("i-1")  # announced itself: now on the ping deadline
    clock.now += 119
    assert manager.dead() == []
    manager.pinged("i-1")
    clock.now += 120
    assert manager.dead() == ["i-1"]
    assert manager.dead() == []


def test_never_announced_machine_dies_at_boot_timeout() -> None:
    clock = Clock()
    manager = WorkerManager(Settings(boot_timeout=60), clock=clock)
    manager.launched("i-2")
    clock.now += 60
    assert manager.dead() == ["i-2"]


def test_notice_brings_death_forward_and_pings_cannot_postpone_it() -> None:
    clock = Clock()
    manager = WorkerManager(Settings(ping_interval=30, ping_missed_max=4), clock=clock)
    manager.pinged("i-3")
    manager.noticed("i-3", ends_at=clock.now + 10)
    manager.pinged("i-3")
    clock.now += 10 + 5
    assert manager.dead() == ["i-3"]
    assert manager.was_noticed("i-3")
    manager.forget("i-3")
    assert not manager.was_noticed("i-3")
