"""Planner decisions on a scripted load: hysteresis, cooldown, bounds. No Ray."""

import pytest

from tokenforge.cluster.planner import FleetSample, Planner, PlannerConfig

CFG = PlannerConfig(min_replicas=1, max_replicas=3, target_ttft=1.0, queue_high=4, queue_low=0.5, up_after=3,
                    down_after=4, cooldown=10.0, interval=1.0)


def run(planner, samples, start=0.0, step=1.0):
    return [planner.decide(s, start + i * step) for i, s in enumerate(samples)]


def test_scale_up_needs_sustained_overload_then_cools_down():
    planner = Planner(CFG)
    hot = FleetSample(1, 10, 3.0)
    ok = FleetSample(1, 1, 0.6)
    # a single spike does nothing; three overloaded ticks in a row add one replica
    assert run(planner, [hot, ok, hot, hot, hot]) == [0, 0, 0, 0, 1]
    # still overloaded with two replicas, but within the cooldown nothing moves
    hot2 = FleetSample(2, 20, 3.0)
    assert run(planner, [hot2] * 5, start=5.0) == [0, 0, 0, 0, 0]
    assert run(planner, [hot2], start=15.0) == [1]
    assert run(planner, [FleetSample(3, 40, 5.0)] * 5, start=40.0) == [0, 0, 0, 0, 0]  # at max_replicas


def test_ttft_alone_counts_as_overload():
    planner = Planner(CFG)
    assert run(planner, [FleetSample(1, 0, 1.5)] * 3) == [0, 0, 1]


def test_scale_down_after_a_quiet_spell_never_below_min():
    planner = Planner(CFG)
    quiet = FleetSample(3, 0, 0.1)
    assert run(planner, [quiet] * 4) == [0, 0, 0, -1]
    assert run(planner, [FleetSample(2, 0, None)] * 4, start=20.0) == [0, 0, 0, -1]
    assert run(planner, [FleetSample(1, 0, None)] * 10, start=40.0) == [0] * 10
    # a TTFT near the target is not "idle", even with an empty queue
    planner = Planner(CFG)
    assert run(planner, [FleetSample(2, 0, 0.8)] * 10) == [0] * 10


def test_bounds_are_restored_first():
    planner = Planner(CFG)
    assert planner.decide(FleetSample(0, 0, None), 0.0) == 1
    assert planner.decide(FleetSample(4, 0, None), 100.0) == -1


def test_config_is_checked():
    with pytest.raises(ValueError, match="min-replicas"):
        PlannerConfig(min_replicas=3, max_replicas=2)
