import pytest

from cbas.state import InvalidTransition, JobState, can_transition, check_transition

S = JobState
HAPPY_PATH = [S.SUBMITTING, S.QUEUED, S.PROVISIONING, S.STARTING, S.RUNNING, S.COMPLETED]


@pytest.mark.parametrize(("current", "target"), list(zip(HAPPY_PATH, HAPPY_PATH[1:])))
def test_happy_path(current: JobState, target: JobState) -> None:
    assert can_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target", "allowed"),
    [
        (S.RUNNING, S.PREEMPTED, True),
        (S.PROVISIONING, S.PREEMPTED, True),
        (S.STARTING, S.PREEMPTED, True),
        (S.PREEMPTED, S.QUEUED, True),
        (S.STARTING, S.COMPLETED, True),  # a very short job may finish before its first ping
        (S.QUEUED, S.RUNNING, False),
        (S.SUBMITTING, S.RUNNING, False),
        (S.PREEMPTED, S.RUNNING, False),
        (S.QUEUED, S.COMPLETED, False),
        (S.RUNNING, S.QUEUED, False),
        (S.COMPLETED, S.FAILED, False),
        (S.CANCELLED, S.QUEUED, False),
        (S.FAILED, S.CANCELLED, False),
    ],
)
def test_transitions(current: JobState, target: JobState, allowed: bool) -> None:
    assert can_transition(current, target) is allowed


@pytest.mark.parametrize("state", [s for s in JobState if not s.is_terminal()])
def test_any_live_state_can_fail_or_be_cancelled(state: JobState) -> None:
    assert can_transition(state, S.FAILED)
    assert can_transition(state, S.CANCELLED)


@pytest.mark.parametrize("state", [S.COMPLETED, S.FAILED, S.CANCELLED])
def test_terminal_states_are_final(state: JobState) -> None:
    assert state.is_terminal()
    for target in JobState:
        assert not can_transition(state, target)


def test_check_transition_names_both_states() -> None:
    with pytest.raises(InvalidTransition, match="from QUEUED to RUNNING"):
        check_transition(S.QUEUED, S.RUNNING)
