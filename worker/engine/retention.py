"""Which versions of one key survive gc-compaction, and which images are built.

The seed's ``generate_key_retention``: the history of a key is cut at every LSN whose reads must
stay exact (the retain LSNs below the horizon, then the horizon). Each cut gets either the
versions that fell into it or, when reading there has become expensive, one image at the cut's
LSN. Everything above the horizon is kept as it is.

Histories here are ``Version`` sequences sorted by ``(lsn, kind)``, so at an equal LSN an image
sorts before the record the k-merge of an image and a delta layer also produced.

Worked example
--------------
One key, an image at LSN 10 and records at 20, 30, ... 80, 95 and 110; retain LSNs 35 and 55
(branch points), horizon 90, ``DELTA_THRESHOLD`` 5. A cut ``c`` after cut ``p`` owns the LSNs in
``(p, c]`` (the first owns everything up to it, inclusive); reads at every cut and everywhere
above the horizon stay exact, reads between cuts below the horizon need not.

=========== ================== ======================= ===========================================
cut         versions it owns   kept                    why
=========== ================== ======================= ===========================================
35 (retain) I10, R20, R30      image at 35             the first cut always gets one (no base image
                                                       from an ancestor)
55 (retain) R40, R50           R40, R50                2 records since the image at 35: below 5
90 horizon  R60, R70, R80      image at 90             R40..R80 are 5 records since the last image
above       R95, R110          R95, R110               above the horizon nothing changes
=========== ================== ======================= ===========================================

I10, R20, R30, R60, R70 and R80 are dropped. ``place`` then puts the image at 35 into the image
layer (when the job writes one) and R40, R50, the image at 90, R95 and R110 into delta layers.
(``tests/test_retention.py`` checks this example.)

Incomplete histories
--------------------
The storage's legacy GC removes deltas that images cover, so a key's history may begin with
ordinary records whose base image is gone: nothing at or below those LSNs can be read. The seed
trims the replay history at its newest image or init record, which drops that prefix silently
whenever a cut also holds a base; but when a cut lies *inside* the prefix it fails the whole
compaction ("invalid history, no base image"). A branch point inside such a prefix would then
block gc-compaction of the key range for as long as the branch exists.

Here, a cut whose replay history has no base yet keeps its versions unchanged and gets no image:
a read there fails with the same error as before, and no read changes from failing to returning
"no such key" (which dropping the prefix would do, silently, for a branch that reads its
ancestor at that LSN). The image policy then treats the prefix like a key that does not exist
yet: its records do not count towards the delta threshold, and the first readable cut is not
forced to an image (only the first cut is, as in the seed). Once any cut holds a base, the prefix
is trimmed exactly as the seed trims it, without error. With a base image from the ancestor the
history is never incomplete.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice, pairwise, repeat
from operator import eq, itemgetter, lt, ne

from compactor.storage.errors import InvalidInput, RedoError
from compactor.storage.keys import format_key
from compactor.storage.redo import apply_record, replay
from compactor.storage.values import ValueKind, Version, image

DELTA_THRESHOLD = 5
"""Records since the last image at which a cut above the first gets a fresh image (the seed's
``COMPACTION_DELTA_THRESHOLD``)."""

# Plain ints: comparing with an IntEnum member costs a method call per version.
_IMAGE = int(ValueKind.IMAGE)
_RECORD = int(ValueKind.RECORD)
_KEY, _LSN = itemgetter(0), itemgetter(1)


@dataclass(slots=True)
class KeyHistoryRetention:
    """What gc-compaction keeps of one key.

    ``below_horizon`` has one entry per cut, in LSN order: each retain LSN below the horizon, then
    the horizon. Each entry holds the versions kept for LSNs in ``(previous cut, this cut]``:
    either the original versions, or a single image at the cut's LSN. ``above_horizon`` holds
    every version above the horizon.
    """

    below_horizon: list[tuple[int, list[Version]]]
    above_horizon: list[Version]

    def versions(self) -> list[Version]:
        """Every retained version, in LSN order (images in place at their cut's LSN)."""
        out = [v for _, logs in self.below_horizon for v in logs]
        out.extend(self.above_horizon)
        return out

    def verify(
        self,
        key: bytes,
        base_image: Version | None,
        full_history: Sequence[Version],
        replays: Replays | None = None,
    ) -> None:
        """Replay the retention where reads must stay exact and compare with the original.

        Checks, as the seed does, each cut at or above the key's first LSN, the state before
        every image or init record above the horizon, and the newest LSN. Unlike the seed, each
        value is also compared with a read of ``full_history`` at the same LSN, and a point where
        both the retention and the original lack a base (an incomplete history, see the module
        docstring) passes. Raises ``RedoError`` naming the key and LSN on any failure.
        ``replays`` shares redo work with the retention that produced this (see ``Replays``).
        """
        if not full_history:
            return
        replays = replays or Replays()
        lsns = list(map(_LSN, full_history))
        min_lsn, max_lsn = min(lsns), max(lsns)
        original = _OriginalReader(key, base_image, full_history, replays)
        state: list[Version] = [] if base_image is None else [base_image]
        # The value of state[:replayed], so a later check only replays what was pushed since.
        replayed, value = 0, b""

        def check(lsn: int, at: int, skip_empty: bool) -> None:
            # `at` is the original's read LSN: `lsn` itself, or just below it where the seed
            # checks the state before an image or init record.
            if not state:
                # The seed skips an empty state before the first version above the horizon; the
                # original must then have had nothing there either.
                if skip_empty and not original.exists(at):
                    return
                raise RedoError(f"verification failed: {_where(key, lsn)} has no retained history")
            if state[0].kind == _RECORD:
                if original.has_base(at):
                    raise RedoError(
                        f"verification failed: {_where(key, lsn)}: the retained history lost its base image"
                    )
                return
            nonlocal replayed, value
            try:
                value = replays.replay(state, replayed, value)
                replayed = len(state)
                expected = original.read(at)
            except RedoError as err:
                raise RedoError(f"verification failed: {_where(key, lsn)}: {err}") from err
            if value != expected:
                raise RedoError(
                    f"verification failed: {_where(key, lsn)}: the retained value differs from the original"
                )

        def push(version: Version) -> None:
            nonlocal replayed
            if version.kind != _RECORD:
                state.clear()
                replayed = 0
            state.append(version)

        for cut, logs in self.below_horizon:
            for version in logs:
                push(version)
            if cut >= min_lsn:
                check(cut, cut, skip_empty=False)
        for version in self.above_horizon:
            if version.kind != _RECORD:
                check(version.lsn, version.lsn - 1, skip_empty=True)
            push(version)
        check(max_lsn, max_lsn, skip_empty=False)


def _where(key: bytes, lsn: int) -> str:
    return f"key {format_key(key)} at LSN {lsn}"


def generate_key_retention(
    key: bytes,
    history: Sequence[Version],
    horizon: int,
    retain_lsns_below_horizon: Sequence[int],
    delta_threshold: int = DELTA_THRESHOLD,
    base_image: Version | None = None,
    verification: bool = False,
) -> KeyHistoryRetention:
    """The retention of ``key`` (the seed's ``generate_key_retention``).

    ``history`` holds the key's versions within the compaction, sorted by ``(lsn, kind)``;
    ``retain_lsns_below_horizon`` is sorted and below ``horizon``; ``base_image`` is the key's
    value read from the ancestor on a branch. The first cut always gets an image unless there is
    a base image; later cuts get one when ``delta_threshold`` records have accumulated since the
    last image; the part above the horizon never does. Raises ``RedoError`` naming the key and
    LSN when an image cannot be built. ``verification`` checks the inputs (the seed's debug
    assertions) and the result (``KeyHistoryRetention.verify``).
    """
    retain = retain_lsns_below_horizon
    if verification:
        _check_inputs(key, history, horizon, retain, base_image)
    elif retain and retain[-1] >= horizon:
        raise InvalidInput(f"retain LSN {retain[-1]} is not below the gc horizon {horizon}")

    # Verification replays what the retention replayed: share the work (without it, nothing is
    # replayed twice and the memo would only cost).
    replays = Replays() if verification else None
    if not history or history[0].lsn > horizon:
        # Nothing at or below the horizon: every cut is empty. That holds with a base image too,
        # since the first cut is then not forced and has no new records to count.
        retention = KeyHistoryRetention(_empty_cuts(retain, horizon), _deduplicated(history, 0, -1))
    elif len(history) == 1 and base_image is None:
        retention = _single_version(key, history[0], horizon, retain, delta_threshold)
    else:
        retention = _general(key, history, horizon, retain, delta_threshold, base_image, replays)

    if verification:
        retention.verify(key, base_image, history, replays)
    return retention


def place(key: bytes, retention: KeyHistoryRetention, has_image_layer: bool) -> tuple[Version | None, list[Version]]:
    """Where the retention goes (the seed's ``pipe_to`` without the writers).

    Returns ``(image, deltas)``: ``image`` is the first cut's image, at that cut's LSN, when the
    first cut is a single image and the job writes an image layer (``has_image_layer``; branches
    and jobs that read data below their LSN range do not); otherwise it leads ``deltas``.
    ``deltas`` holds every other retained version in LSN order, including the images of later
    cuts and everything above the horizon.

    A first-cut image that came from the history rather than from redo (possible with a base
    image) moves up to the cut's LSN, as in the seed: nothing lies between the two LSNs, so reads
    from the cut on are unchanged, and reads below the first cut are not kept exact.
    """
    deltas: list[Version] = []
    first_image: Version | None = None
    cuts = retention.below_horizon
    if cuts:
        cut, logs = cuts[0]
        if len(logs) == 1 and logs[0].kind == _IMAGE:
            only = logs[0]
            at_cut = only if only.lsn == cut and only.key == key else image(key, cut, only.payload)
            if has_image_layer:
                first_image = at_cut
            else:
                deltas.append(at_cut)
        else:
            deltas.extend(logs)
        for _, logs in cuts[1:]:
            deltas.extend(logs)
    deltas.extend(retention.above_horizon)
    return first_image, deltas


# --- the cases -------------------------------------------------------------------------------


def _empty_cuts(retain: Sequence[int], horizon: int) -> list[tuple[int, list[Version]]]:
    cuts: list[tuple[int, list[Version]]] = [(lsn, []) for lsn in retain]
    cuts.append((horizon, []))
    return cuts


def _single_version(
    key: bytes, version: Version, horizon: int, retain: Sequence[int], delta_threshold: int
) -> KeyHistoryRetention:
    """One version at or below the horizon and no base image: the common case of a key that
    only an image layer holds, without the general walk."""
    cuts = _empty_cuts(retain, horizon)
    index = bisect_left(retain, version.lsn)  # the first cut at or above the version
    cut = cuts[index][0]
    # An ordinary record alone is an incomplete history: kept as it is (module docstring).
    if version.kind != _RECORD and (index == 0 or delta_threshold <= 1):
        cuts[index] = (cut, [_image_at(key, cut, [version])])
    else:
        cuts[index] = (cut, [version])
    return KeyHistoryRetention(cuts, [])


def _general(
    key: bytes,
    history: Sequence[Version],
    horizon: int,
    retain: Sequence[int],
    delta_threshold: int,
    base_image: Version | None,
    replays: Replays | None = None,
) -> KeyHistoryRetention:
    cuts: list[tuple[int, list[Version]]] = []
    # What a read at the current cut replays: from the newest image or init record on.
    since_base: list[Version] = [] if base_image is None else [base_image]
    records_since_image = 0
    pos, end = 0, len(history)
    prev_lsn = -1
    for index, cut in enumerate((*retain, horizon)):
        bucket: list[Version] = []
        newest_base = -1
        while pos < end:
            version = history[pos]
            if version.lsn > cut:
                break
            pos += 1
            # An image and the delta it materialises share an LSN; the image sorts first, wins.
            if version.lsn == prev_lsn:
                continue
            prev_lsn = version.lsn
            if version.kind != _RECORD:
                newest_base = len(bucket)
            bucket.append(version)

        if newest_base >= 0:
            since_base = bucket[newest_base:]
        else:
            since_base.extend(bucket)
        if not since_base:  # the key does not exist yet at this cut
            cuts.append((cut, bucket))
            continue
        if since_base[0].kind == _RECORD:  # incomplete history, see the module docstring
            cuts.append((cut, bucket))
            continue

        records_since_image += len(bucket)
        if index == 0 and base_image is None:
            wants_image = True
        else:
            wants_image = records_since_image > 0 and records_since_image >= delta_threshold
        if wants_image:
            built = _image_at(key, cut, since_base, replays)
            since_base = [built]
            records_since_image = 0
            cuts.append((cut, [built]))
        else:
            cuts.append((cut, bucket))
    return KeyHistoryRetention(cuts, _deduplicated(history, pos, prev_lsn))


def _image_at(key: bytes, lsn: int, since_base: list[Version], replays: Replays | None = None) -> Version:
    """The image of ``key`` at ``lsn`` from a history that starts with its base."""
    if len(since_base) == 1 and since_base[0].kind == _IMAGE:
        only = since_base[0]
        return only if only.lsn == lsn else image(key, lsn, only.payload)
    try:
        page = replay(since_base) if replays is None else replays.replay(since_base)
    except RedoError as err:
        raise RedoError(f"cannot build the image of key {format_key(key)} at LSN {lsn}: {err}") from err
    return image(key, lsn, page)


def _deduplicated(history: Sequence[Version], start: int, prev_lsn: int) -> list[Version]:
    tail = history[start:] if start else history
    lsns = list(map(_LSN, tail))
    if all(map(ne, lsns, islice(lsns, 1, None))) and (not lsns or lsns[0] != prev_lsn):
        return list(tail)  # nothing to drop
    out: list[Version] = []
    for version in tail:
        if version.lsn != prev_lsn:
            out.append(version)
            prev_lsn = version.lsn
    return out


def _check_inputs(
    key: bytes,
    history: Sequence[Version],
    horizon: int,
    retain: Sequence[int],
    base_image: Version | None,
) -> None:
    if any(lsn >= horizon for lsn in retain):
        raise InvalidInput(f"retain LSNs {list(retain)} must all be below the gc horizon {horizon}")
    if any(a > b for a, b in pairwise(retain)):
        raise InvalidInput(f"retain LSNs {list(retain)} are not sorted")
    if base_image is not None and (base_image.key != key or base_image.kind != _IMAGE):
        raise InvalidInput(f"base image of key {format_key(key)} is not an image of that key")
    lsns = list(map(_LSN, history))
    if all(map(eq, map(_KEY, history), repeat(key))) and all(map(lt, lsns, islice(lsns, 1, None))):
        return  # one key, strictly increasing LSNs: nothing below can fail
    prev: Version | None = None
    for version in history:
        if version.key != key:
            raise InvalidInput(f"history of key {format_key(key)} holds key {format_key(version.key)}")
        if prev is not None:
            if version.lsn < prev.lsn:
                raise InvalidInput(f"history of key {format_key(key)} is not sorted at LSN {version.lsn}")
            if version.lsn == prev.lsn and prev.kind != _IMAGE:
                raise InvalidInput(
                    f"history of key {format_key(key)} has two versions at LSN {version.lsn}"
                    " and the first is not an image"
                )
        prev = version


class _OriginalReader:
    """Reads of the unchanged history, the way the read path does them."""

    def __init__(
        self, key: bytes, base_image: Version | None, history: Sequence[Version], replays: Replays | None = None
    ) -> None:
        self._key = key
        self._versions = ([] if base_image is None else [base_image]) + _deduplicated(history, 0, -1)
        self._lsns = list(map(_LSN, self._versions))
        self._replays = replays or Replays()
        self._last = (-1, 0, b"")  # start, end and value of the previous read

    def _newest_base(self, lsn: int) -> tuple[int, int]:
        end = bisect_right(self._lsns, lsn)
        start = end - 1
        while start >= 0 and self._versions[start].kind == _RECORD:
            start -= 1
        return start, end

    def exists(self, lsn: int) -> bool:
        return bisect_right(self._lsns, lsn) > 0

    def has_base(self, lsn: int) -> bool:
        return self._newest_base(lsn)[0] >= 0

    def read(self, lsn: int) -> bytes | None:
        start, end = self._newest_base(lsn)
        if end == 0:
            return None
        if start < 0:
            raise RedoError(f"the original history of key {format_key(self._key)} has no base at LSN {lsn}")
        last_start, last_end, last_value = self._last
        done = last_end - start if start == last_start and last_end <= end else 0
        value = self._replays.replay(self._versions[start:end], done, last_value)
        self._last = (start, end, value)
        return value


class Replays:
    """``compactor.storage.redo.replay`` for the histories of one key, sharing work between them.

    The retention, its verification and the reads of the original history replay overlapping
    histories: the image built at a cut is the base of the next cut's replay, and the original
    read at a cut replays the very versions the retention replayed. Each step ``(page, record)
    -> page`` is remembered by the identity of the record, with the page it was applied to, so a
    chain of records is applied once however many histories walk it. The memo holds every page
    and record it names, so no identity is reused while it lives; keep one per key.

    Results are those of ``replay`` (redo is a pure function of page and record). Whenever a step
    fails, or the history does not start with a base, ``replay`` itself runs on the history so
    that exactly its error is raised.
    """

    __slots__ = ("_steps",)

    def __init__(self) -> None:
        # id(record) -> (page it was applied to, the record, the page after it)
        self._steps: dict[int, tuple[bytes, Version, bytes]] = {}

    def replay(self, history: Sequence[Version], done: int = 0, value: bytes = b"") -> bytes:
        """``replay(history)``; with ``done``, resumed after ``history[:done]``, whose replay
        gave ``value``."""
        steps = self._steps
        page: bytes | None = value if done else None
        for version in islice(history, done, None) if done else history:
            kind = version[2]
            if kind == _IMAGE:
                page = version[3]
                continue
            if page is None and kind == _RECORD:
                return replay(history)  # no base image: replay raises its error
            base = page or b""
            step = steps.get(id(version))
            if step is not None and step[0] is base:
                page = step[2]
                continue
            try:
                page = apply_record(base, version[3])
            except RedoError:
                return replay(history)  # raises the same error, worded as replay words it
            steps[id(version)] = (base, version, page)
        if page is None:
            return replay(history)  # empty history
        return page
