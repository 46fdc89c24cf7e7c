"""Cost meter: wall time and peak resident memory of a block of work."""

from __future__ import annotations

import os
import resource
import threading
import time


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process high-water mark is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Meter:
    """``with Meter() as m: ...`` then ``m.seconds``, ``m.peak_rss_mb``.

    Peak RSS is sampled every 20 ms by a daemon thread, so it is the peak of this
    block (the process-wide ``ru_maxrss`` cannot tell rungs apart)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self.seconds = 0.0

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        return False

    @property
    def peak_rss_mb(self) -> float:
        return self.peak / 2**20
