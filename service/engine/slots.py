"""Slot bookkeeping: which session owns which KV slot. Speaks only ids (no torch)."""

from __future__ import annotations


class SlotManager:
    """A fixed pool of `num_slots` slot ids; the lowest free id is handed out first, so
    busy slots tend to stay consecutive (a decode batch over consecutive slots reads the
    cache without a gather)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = set(range(num_slots))
        self._owner: dict[int, str] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self, owner: str) -> int:
        slot = min(self._free)
        self._free.remove(slot)
        self._owner[slot] = owner
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        del self._owner[slot]
        self._free.add(slot)

    def owner(self, slot: int) -> str | None:
        return self._owner.get(slot)
