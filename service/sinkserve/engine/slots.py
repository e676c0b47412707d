"""Slot bookkeeping: which KV slot ids are free. Speaks only ids (no torch); the session
that holds a slot records it (`Session.slot`), so the owner is kept in one place."""

from __future__ import annotations


class SlotManager:
    """A fixed pool of `num_slots` slot ids; the lowest free id is handed out first, so
    busy slots tend to stay consecutive (a decode batch over consecutive slots reads the
    cache without a gather)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = set(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in use")
        self._free.add(slot)
