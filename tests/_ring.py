"""Looking into a Loader's ring from the tests."""

from __future__ import annotations

from shmfeed._engine.control import SlotState


def held_slots(loader) -> int:
    """Slots whose batch something still refers to (a view, or an array aliasing it)."""
    ctl = loader._ring.ctl
    return sum(ctl.slot(s)["state"] == SlotState.HELD for s in range(loader.num_slots))
