"""Progress of the long loops (training steps, sampled images, epochs, feature batches, downloads).

A step that runs alone on a terminal shows a tqdm bar. Anywhere else it writes a log line at every
tenth of the work and at least every ``every_s`` seconds: bars of jobs that Snakemake runs side by side
overwrite each other on one terminal line, and redirected to a file a bar is thousands of frames.

``python -m diffdistill`` decides once per process (``configure``): bars when stderr is a terminal and
no ``--log-file`` is given. Snakemake names a log file for every job and may run several at once, so
its jobs log lines, which go to the job's log file (cli keeps them off the shared console).
"""
import logging
import math
import os
import sys
import time

log = logging.getLogger("diffdistill.progress")

_bars = None  # None: decide from stderr (library use, tests); True/False: set by configure()
# The choice travels to child processes (spawned sampling workers) through the environment.
ENV = "DIFFDISTILL_PROGRESS"


def configure(bars):
    """Bars (True) or log lines (False) for this process and its children; None: bars when stderr is
    a terminal."""
    global _bars
    _bars = bars
    if bars is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = "bars" if bars else "lines"


def bars_enabled():
    if _bars is not None:
        return _bars
    if os.environ.get(ENV) in ("bars", "lines"):
        return os.environ[ENV] == "bars"
    return stderr_is_terminal()


def stderr_is_terminal():
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # a replaced or closed stderr
        return False


def progress(iterable=None, total=None, desc="", unit="it", initial=0, disable=False, every_s=30.0, **bar_kw):
    """A tqdm-like progress object: iterate over it, or call ``update(n)``; ``set_postfix(**kw)``;
    ``close()`` (or use it as a context manager). ``disable``: nothing at all (e.g. on ranks > 0).
    ``bar_kw`` go to tqdm only (``position``, ``leave``, ``unit_scale``, ``dynamic_ncols``)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not disable and bars_enabled():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, **bar_kw)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                       every_s=every_s)


class LogProgress:
    """Log lines instead of a bar: one when another tenth of ``total`` is done or ``every_s`` seconds
    have passed since the last line, and one when it closes (if the last line was not already there)."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0, disable=False, every_s=30.0,
                 clock=time.monotonic):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start = self._logged = initial
        self.disable, self.every_s, self._clock = disable, float(every_s), clock
        self.postfix = {}
        self._t0 = self._last = clock()
        self._next = self._next_mark(initial)
        self._closed = False

    def _next_mark(self, n):
        """The count at which the next tenth of ``total`` is reached (inf without a total)."""
        if not self.total:
            return math.inf
        return math.floor(n * 10 / self.total + 1) * self.total / 10

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return self.total

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n=1):
        self.n += n
        if self.disable:
            return
        now = self._clock()
        if self.n >= self._next or now - self._last >= self.every_s:
            self._emit(now)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        self.postfix = dict(ordered_dict or {}, **kwargs)

    def _emit(self, now):
        elapsed = now - self._t0
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total \
            else f"{self.n} {self.unit}"
        rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        log.info("%s: %s, %.3g %s/s, %.0f s%s", self.desc or "progress", done, rate, self.unit, elapsed, extra)
        self._last, self._logged, self._next = now, self.n, self._next_mark(self.n)

    def close(self):
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n != self._logged:
            self._emit(self._clock())
