"""The idle-deadline wheel (``server/idle.py``): one timer for every connection's deadline."""

from __future__ import annotations

from twisted.internet.task import Clock

from teltonika_ingest.server.idle import IdleWheel


def wheel() -> tuple[Clock, IdleWheel[str], list[tuple[float, str]]]:
    clock = Clock()
    fired: list[tuple[float, str]] = []
    return clock, IdleWheel(clock, lambda item: fired.append((clock.seconds(), item))), fired


def test_a_deadline_fires_at_its_second_not_before() -> None:
    clock, w, fired = wheel()
    w.watch("a", 10.2)
    clock.advance(10.9)
    assert fired == []
    clock.advance(0.1)  # 11.0: rounded up to the second
    assert fired == [(11.0, "a")]
    assert clock.getDelayedCalls() == []  # nothing watched: no timer


def test_one_timer_for_many_and_an_earlier_deadline_moves_it() -> None:
    clock, w, fired = wheel()
    for i in range(1000):
        w.watch(f"late{i}", 600)
    w.watch("early", 5)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    assert fired == [(5, "early")]
    clock.advance(595)
    assert len(fired) == 1001 and {item for _, item in fired[1:]} == {
        f"late{i}" for i in range(1000)
    }
    assert len(w) == 0


def test_forgotten_items_are_not_checked_and_leave_no_timer() -> None:
    clock, w, fired = wheel()
    slot_a = w.watch("a", 30)
    slot_b = w.watch("b", 40)
    w.forget("a", slot_a)
    clock.advance(35)
    assert fired == []
    w.forget("b", slot_b)
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert fired == []
    w.forget("b", slot_b)  # twice: nothing


def test_an_item_watched_again_from_its_check() -> None:
    clock = Clock()
    seen: list[float] = []
    w: IdleWheel[str]

    def check(item: str) -> None:
        seen.append(clock.seconds())
        if len(seen) < 3:
            w.watch(item, clock.seconds() + 60)

    w = IdleWheel(clock, check)
    w.watch("x", 60)
    clock.pump([60, 60, 60, 60])
    assert seen == [60, 120, 180]
    assert clock.getDelayedCalls() == []


def test_stop_cancels_everything() -> None:
    clock, w, fired = wheel()
    w.watch("a", 3)
    w.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert fired == []
