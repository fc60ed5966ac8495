"""When a study is complete: the pure rule over monotonic times."""

from __future__ import annotations

from agent.assembly.policy import PARTIAL, QUIET_PERIOD, Decision, Interrupted, decide


def rule(now: float, **times: object) -> Decision:
    options: dict[str, object] = {"last_arrival": 0.0, "opened": 0.0, "quiet_seconds": 30.0}
    options.update(times)
    return decide(now, **options)  # type: ignore[arg-type]


def test_not_complete_before_the_quiet_period() -> None:
    assert rule(29.9) == Decision(False)


def test_complete_at_and_after_the_quiet_period() -> None:
    assert rule(30.0) == Decision(True, QUIET_PERIOD)
    assert rule(3600.0) == Decision(True, QUIET_PERIOD)


def test_an_interrupted_delivery_waits_for_the_sender_then_is_sealed_as_partial() -> None:
    cut = Interrupted(since=5.0, what="association aborted after 30 instances")
    waiting = rule(40.0, interrupted=cut, sender_retry_seconds=300.0)
    assert not waiting.seal
    assert waiting.waiting == (
        "waiting up to 300 s for the sender to send again: association aborted after 30 instances"
    )
    # The wait counts from the interruption, not from the end of the quiet period.
    assert not rule(304.9, interrupted=cut, sender_retry_seconds=300.0).seal
    sealed = rule(305.0, interrupted=cut, sender_retry_seconds=300.0)
    assert sealed.seal
    assert sealed.why == (
        f"not sent again: {PARTIAL} (association aborted after 30 instances; waited 300 s)"
    )


def test_an_interruption_never_shortens_the_quiet_period() -> None:
    cut = Interrupted(since=0.0, what="connection lost after 3 instances")
    assert rule(10.0, last_arrival=5.0, interrupted=cut, sender_retry_seconds=1.0) == Decision(
        False
    )


def test_a_study_that_never_falls_silent_is_sealed_at_the_cap() -> None:
    # An instance every 29 s: never 30 s of silence.
    assert not rule(3599.0, last_arrival=3590.0, max_wait_seconds=3600.0).seal
    capped = rule(3600.0, last_arrival=3590.0, max_wait_seconds=3600.0)
    assert capped.seal
    assert capped.why == f"receiving for 3600 s: {PARTIAL} (instances still arriving)"
    # The cap counts from when the study opened (again), not from its first instance ever.
    assert not rule(5000.0, opened=2000.0, last_arrival=4990.0, max_wait_seconds=3600.0).seal
