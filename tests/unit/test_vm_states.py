"""The VM's state machine (``pyvirt.vmm.control``): every action in every state."""

from __future__ import annotations

import pytest

from pyvirt.vmm.control import ACTIONS, ActionRefused, VmState, refuse_unless

LEGAL = {
    "start": {"created"},
    "pause": {"running"},
    "resume": {"paused"},
    "power-button": {"running"},
    "ctrl-alt-del": {"running"},
    "reset": {"running", "paused"},
    "force-stop": {"created", "running", "paused", "crashed"},
    "snapshot": {"paused"},
    "disk-overlay": {"paused"},
    "nic-link": {"created", "running", "paused"},
}


def test_the_table_is_the_documented_one() -> None:
    assert {a: {s.value for s in states} for a, states in ACTIONS.items()} == LEGAL


@pytest.mark.parametrize("action", sorted(LEGAL))
@pytest.mark.parametrize("state", list(VmState))
def test_each_action_in_each_state(action: str, state: VmState) -> None:
    if state.value in LEGAL[action]:
        refuse_unless(action, state)
        return
    with pytest.raises(ActionRefused) as err:
        refuse_unless(action, state)
    text = str(err.value)
    assert text.startswith(f"{action}: the VM is")
    assert "\n" not in text


def test_the_reasons_say_what_to_do() -> None:
    with pytest.raises(ActionRefused, match="pause it first"):
        refuse_unless("snapshot", VmState.RUNNING)
    with pytest.raises(ActionRefused, match="resume it first"):
        refuse_unless("power-button", VmState.PAUSED)
    with pytest.raises(ActionRefused, match="already paused"):
        refuse_unless("pause", VmState.PAUSED)
