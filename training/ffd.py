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
* Past that, the groups are placed from the new clip's size down only until a bound proves
  the rest fits: the smaller groups can open at most `_new_packs_bound` packs more (first-fit
  packs they open are fuller than budget - their largest size). The skipped groups stay stale
  and are placed when a later clip needs them; on the production mix a clip costs ~2.3
  placements instead of all the groups below it.
* Placements run on run-length coded rooms (`_place_runs`): equal packs stay equal, so D
  groups leave at most 4·D runs, and a placement costs O(D) however many packs a step has.

Cost per step: O(k · D · R) with R ≤ 4·D runs in the worst case — linear in the clips k and
independent of the pack count; measured 40–70 µs per clip on a 2-core box
(`tests/bench/plan_step.py`: 0.31 s for 4,590 clips at 1,024 packs, 0.73 s for 18,427 at 4,096;
the per-clip FFD re-run of the first definition took 3.2 s for 1,128 clips at 256 packs). The final plan
(`plan`) places the groups once more pack by pack, O(D · packs).
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
        # per size: the packs' free rooms after placing it, run-length coded (rooms, pack counts)
        self.rooms: list[tuple[np.ndarray, np.ndarray] | None] = []
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
        runs = self.rooms[self.stale - 1] if self.stale else _NO_RUNS
        rest = sum(s * len(i) for s, i in zip(self.sizes[self.stale:], self.items[self.stale:]))
        for g in range(self.stale, len(self.sizes)):
            runs = _place_runs(runs, self.sizes[g], len(self.items[g]), self.budget)
            self.rooms[g] = runs
            self.stale = g + 1
            packs = int(runs[1].sum())
            if packs > self.max_packs:  # packs only grow: no smaller group can undo it
                return False
            rest -= self.sizes[g] * len(self.items[g])
            if g + 1 < len(self.sizes) and packs + _new_packs_bound(rest, self.sizes[g + 1], self.budget) <= self.max_packs:
                return True  # the smaller groups are placed when a later call needs them (stale)
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


_NO_RUNS = (np.zeros(0, np.int64), np.zeros(0, np.int64))


def _place_runs(runs: tuple[np.ndarray, np.ndarray], size: int, count: int,
                budget: int) -> tuple[np.ndarray, np.ndarray]:
    """`_place` on run-length coded rooms: (room of each run, packs in each run) -> the same after.

    Equal packs take equal numbers of equal items, so placing one size group splits at most
    one run (where the group ends: packs before it filled, one pack part-filled, packs after
    it untouched) and appends at most two (full new packs, a part-filled new pack). After D
    groups there are at most 4·D runs, however many packs: a placement costs O(D), not O(packs).
    """
    rooms, lens = runs
    fit = rooms // size
    cum = np.cumsum(fit * lens)
    have = int(cum[-1]) if len(cum) else 0
    if have >= count:
        j = int(np.searchsorted(cum, count))  # the run where the group's last item goes
        need = count - (int(cum[j - 1]) if j else 0)
        full, part = divmod(need, int(fit[j]))
        after = rooms.copy()
        after[:j] -= fit[:j] * size
        r, n = int(rooms[j]), int(lens[j])
        split = [(r - int(fit[j]) * size, full), (r - part * size, 1 if part else 0), (r, n - full - (1 if part else 0))]
        split = [(a, b) for a, b in split if b]
        return (np.concatenate([after[:j], np.array([a for a, _ in split], np.int64), after[j + 1:]]),
                np.concatenate([lens[:j], np.array([b for _, b in split], np.int64), lens[j + 1:]]))
    per_pack = budget // size
    full, part = divmod(count - have, per_pack)
    new = [(budget - per_pack * size, full), (budget - part * size, 1 if part else 0)]
    new = [(a, b) for a, b in new if b]
    return (np.concatenate([rooms - fit * size, np.array([a for a, _ in new], np.int64)]),
            np.concatenate([lens, np.array([b for _, b in new], np.int64)]))


def _new_packs_bound(rest: int, largest: int, budget: int) -> int:
    """At most how many packs first fit opens for items of total `rest`, none above `largest`.

    Only those items go into the packs they open. An item opens pack i + 1 because it fits in
    no pack, so pack i is fuller than budget - largest; and two opened packs together hold more
    than budget (the second's opener did not fit in the first). With n packs opened:
    (n - 1)(budget - largest) < rest and (n - 1) · budget < 2 · rest.
    """
    if rest <= 0:
        return 0
    half = -(-2 * rest // budget)  # n - 1 < 2 rest / budget
    if largest >= budget:
        return half
    return min(half, -(-rest // (budget - largest)))
