"""The training data order: which rows each rank reads in an epoch, a pure function of
(seed, epoch, rank, world) and the dataset's unit sizes. No I/O here.

A dataset is a list of *units*, each with a row count: the Parquet row groups of latent shards
(a row group is the smallest piece Parquet can read), or single images for an image list. Per
epoch:

1. The units are permuted (seeded by seed and epoch) and laid end to end: the epoch's row stream.
2. Rank ``r`` takes rows ``[r*n, (r+1)*n)`` of that stream, ``n = steps_per_epoch * batch``, the
   same for every rank, so DDP never waits on a rank that ran out of data. A unit cut by a rank
   boundary is read by both ranks, each using its own part; the rows past ``world*n`` sit out
   this epoch (different ones every epoch), as with a ``DistributedSampler(drop_last=True)``.
3. A rank's span is cut into *windows* of whole units (at most ``window_rows`` rows, at least one
   unit) and the rows of each window are permuted (seeded by seed, epoch, rank and window). Batch
   ``k`` is rows ``[k*B, (k+1)*B)`` of the rank's window-permuted stream.

So each batch mixes rows of several units from anywhere in the dataset, the order changes every
epoch, and step ``k`` of an epoch can be reached by reading only the window holding row ``k*B``:
a resume re-reads fewer than ``window_rows`` consumed rows and decodes nothing earlier.

Single-row units (an image list, or latents held in memory) make step 1 a global permutation of
the rows; ``rank_units`` gives a rank's rows directly, without windows.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from svg_ray.config import ConfigError, require

# Distinct streams of one seed: the unit permutation, the in-window row permutations, the
# per-unit flip choice and the per-row flip choice must not share random numbers.
_UNITS, _WINDOW, _UNIT_FLIP, _ROW_FLIP = 1, 2, 3, 4


def rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator for one purpose of one seed (seed and keys must be >= 0)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one unit."""

    unit: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        """Rows in the segment."""
        return self.stop - self.start


@dataclass(frozen=True)
class Window:
    """Consecutive segments of a rank's span whose rows are shuffled together."""

    index: int
    """Position among the rank's windows this epoch."""
    first_row: int
    """Offset of the window's first row in the rank's stream."""
    segments: tuple[Segment, ...]
    order: np.ndarray = field(repr=False, compare=False)
    """Permutation of the window's rows: stream row ``first_row + i`` is the window's row
    ``order[i]``, counting rows through the segments in order."""

    @property
    def rows(self) -> int:
        """Rows in the window."""
        return sum(s.rows for s in self.segments)


class EpochOrder:
    """Per-epoch, per-rank reading plan over units of known row counts (see the module doc)."""

    def __init__(
        self,
        unit_rows: Sequence[int],
        world: int,
        batch_size: int,
        seed: int,
        window_rows: int = 1,
        what: str = "rows",
    ) -> None:
        """Check every rank gets a batch; ``window_rows``: rows shuffled together (at most);
        ``what``: the rows' name in the not-enough-data error (e.g. 'images')."""
        require(world >= 1, "world size must be >= 1")
        require(batch_size >= 1, "batch size must be >= 1")
        require(seed >= 0, "the data seed must be >= 0 (--seed)")
        require(window_rows >= 1, "window_rows must be >= 1")
        self.unit_rows = np.asarray(unit_rows, dtype=np.int64)
        require(bool((self.unit_rows >= 0).all()), "unit row counts must be >= 0")
        self.world = world
        self.batch_size = batch_size
        self.seed = seed
        self.window_rows = window_rows
        self.total_rows = int(self.unit_rows.sum())
        self.steps_per_epoch = self.total_rows // world // batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"not enough data: {self.total_rows} {what} over {world} worker(s) is fewer than "
                f"one batch of {batch_size} per worker; lower --global-batch or --num-workers, "
                "or use more data"
            )
        self.rows_per_rank = self.steps_per_epoch * batch_size
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def num_units(self) -> int:
        """Units in the dataset."""
        return len(self.unit_rows)

    def _stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit permutation, cumulative rows along it) of an epoch, cached for the last epoch."""
        if self._cache is None or self._cache[0] != epoch:
            perm = rng(self.seed, _UNITS, epoch).permutation(self.num_units)
            self._cache = (epoch, perm, np.cumsum(self.unit_rows[perm]))
        return self._cache[1], self._cache[2]

    def unit_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of all units (every rank computes the same one)."""
        return self._stream(epoch)[0]

    def span(self, epoch: int, rank: int) -> list[Segment]:
        """Rank ``rank``'s rows this epoch: ``rows_per_rank`` rows as unit segments, in order."""
        require(0 <= rank < self.world, f"rank {rank} is outside world size {self.world}")
        perm, cum = self._stream(epoch)
        lo, hi = rank * self.rows_per_rank, (rank + 1) * self.rows_per_rank
        out = []
        k = int(np.searchsorted(cum, lo, side="right"))  # first unit ending after ``lo``
        while k < len(perm) and lo < hi:
            start_of_unit = int(cum[k] - self.unit_rows[perm[k]])
            a, b = lo - start_of_unit, min(hi, int(cum[k])) - start_of_unit
            if b > a:
                out.append(Segment(int(perm[k]), a, b))
            lo = start_of_unit + b
            k += 1
        return out

    def windows(self, epoch: int, rank: int) -> list[Window]:
        """The rank's span cut into windows of whole segments, each with its row permutation."""
        out: list[Window] = []
        current: list[Segment] = []
        rows = first = 0

        def close() -> None:
            nonlocal current, rows, first
            order = rng(self.seed, _WINDOW, epoch, rank, len(out)).permutation(rows)
            out.append(Window(len(out), first, tuple(current), order))
            first += rows
            current, rows = [], 0

        for seg in self.span(epoch, rank):
            if current and rows + seg.rows > self.window_rows:
                close()
            current.append(seg)
            rows += seg.rows
        if current:
            close()
        return out

    def locate(self, windows: Sequence[Window], step: int) -> tuple[int, int]:
        """(window index, row offset in it) of the first row of batch ``step``."""
        require(
            0 <= step <= self.steps_per_epoch,
            f"step {step} is outside the epoch's {self.steps_per_epoch} steps",
        )
        row = step * self.batch_size
        if row >= self.rows_per_rank:
            return len(windows), 0
        w = bisect.bisect_right([x.first_row for x in windows], row) - 1
        return w, row - windows[w].first_row

    def unit_flips(self, epoch: int) -> np.ndarray:
        """Per unit, whether this epoch reads its flipped copy (a fair coin per unit and epoch,
        the same on every rank)."""
        return rng(self.seed, _UNIT_FLIP, epoch).random(self.num_units) < 0.5

    def row_flips(self, epoch: int) -> np.ndarray:
        """Per row (single-row units), a fair coin per row and epoch for the flipped copy."""
        return rng(self.seed, _ROW_FLIP, epoch).random(self.num_units) < 0.5

    def rank_units(self, epoch: int, rank: int) -> np.ndarray:
        """Single-row units only: the rank's ``rows_per_rank`` units of this epoch, in order
        (batch ``k`` is entries ``[k*B, (k+1)*B)``)."""
        require(bool((self.unit_rows == 1).all()), "rank_units needs single-row units")
        require(0 <= rank < self.world, f"rank {rank} is outside world size {self.world}")
        lo = rank * self.rows_per_rank
        return self.unit_order(epoch)[lo : lo + self.rows_per_rank]
