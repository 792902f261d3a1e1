"""First-fit-decreasing over a growing set of clips, by size group: what a step plan needs.

A global step takes clips in order while first-fit-decreasing (`packing.plan_packs`) still
fits all taken clips into `max_packs` packs. Re-running FFD for every candidate clip costs
O(k · k · packs) per step (about cubic: 7 s at 256 packs). This module gives the same answer
— FFD's exact pack count for each prefix, and at the end FFD's exact plan — by exploiting
what FFD does with equal sizes. Token counts come from buckets, so a step holds few distinct
sizes D (≤ the bucket count) however many clips k it takes:

* FFD visits sizes from largest to smallest; a run of c equal items goes, in first-fit
  order, into the open packs that still have room (each takes ⌊room / size⌋ of them,
  lowest pack first), then into new packs. One size group is placed with a few vector
  operations over the packs, never one item at a time.
* Adding a clip of size s changes nothing FFD did for larger sizes: the state after each
  size group is kept, and only the groups from s down are placed again.
* While the taken tokens are at most half of `max_packs · budget`, FFD cannot need more
  packs (in any first-fit packing at most one pack is at most half full), so no placement
  is run at all.

Cost per step: O(k) bookkeeping plus, for the clips in the second half of the budget, one
placement of the size groups at or below the clip's size — O(k · D) vector operations over
≤ `max_packs` packs, independent of k² (`tests/bench/packing.py` reports `plan_step_s`).
"""

from __future__ import annotations

import bisect

import numpy as np


class GrowingFFD:
    """FFD of a multiset that grows one item at a time; `fits()` asks whether FFD needs ≤ max_packs."""

    def __init__(self, budget: int, max_packs: int) -> None:
        self.budget, self.max_packs = budget, max_packs
        self.sizes: list[int] = []  # distinct sizes, largest first
        self.items: list[list[int]] = []  # per size: item ids in the order they were added
        self.rooms: list[np.ndarray | None] = []  # per size: free room of every pack after placing it
        self.stale = 0  # groups from here on must be placed again
        self.total = 0

    def add(self, item: int, size: int) -> None:
        g = self._group(size)
        if g == len(self.sizes) or self.sizes[g] != size:
            self.sizes.insert(g, size)
            self.items.insert(g, [])
            self.rooms.insert(g, None)
        self.items[g].append(item)
        self.stale = min(self.stale, g)
        self.total += size

    def remove_last(self, size: int) -> None:
        """Undo the latest `add` (of an item of `size`)."""
        g = self._group(size)
        self.items[g].pop()
        if not self.items[g]:
            del self.sizes[g], self.items[g], self.rooms[g]
        self.stale = min(self.stale, g)
        self.total -= size

    def fits(self) -> bool:
        """Does FFD pack every item into at most max_packs packs?"""
        if 2 * self.total <= self.max_packs * self.budget:
            return True  # some first-fit pack count m has total > (m - 1) · budget / 2
        rooms = self.rooms[self.stale - 1] if self.stale else np.zeros(0, np.int64)
        for g in range(self.stale, len(self.sizes)):
            rooms, _ = _place(rooms, self.sizes[g], len(self.items[g]), self.budget)
            self.rooms[g] = rooms
            self.stale = g + 1
            if len(rooms) > self.max_packs:  # packs only grow: no smaller group can undo it
                return False
        return True

    def plan(self) -> list[list[int]]:
        """FFD's packs of the items, exactly as `packing.plan_packs` orders them."""
        rooms = np.zeros(0, np.int64)
        packs: list[list[int]] = []
        for size, items in zip(self.sizes, self.items):
            rooms, counts = _place(rooms, size, len(items), self.budget)
            packs += [[] for _ in range(len(rooms) - len(packs))]
            at = 0
            for p in np.flatnonzero(counts).tolist():
                packs[p] += items[at:at + int(counts[p])]
                at += int(counts[p])
        return packs

    def _group(self, size: int) -> int:
        # sizes are kept largest first: search the negated list
        return bisect.bisect_left([-s for s in self.sizes], -size)


def _place(rooms: np.ndarray, size: int, count: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit `count` items of one `size` into packs with free `rooms`, opening packs as needed.

    Returns (rooms after, items placed per pack). Equal items fill the lowest pack with room
    until it has less than `size` left, then the next: pack p takes ⌊rooms[p] / size⌋.
    """
    fit = rooms // size
    cum = np.cumsum(fit)
    have = int(cum[-1]) if len(cum) else 0
    if have >= count:
        last = int(np.searchsorted(cum, count))  # the pack that takes the last item
        counts = np.where(np.arange(len(fit)) < last, fit, 0)
        counts[last] = count - (int(cum[last - 1]) if last else 0)
        return rooms - counts * size, counts
    per_pack = budget // size
    left = count - have
    new = np.full(-(-left // per_pack), per_pack, np.int64)
    new[-1] = left - per_pack * (len(new) - 1)
    counts = np.concatenate([fit, new])
    return np.concatenate([rooms - fit * size, budget - new * size]), counts
