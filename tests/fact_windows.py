"""The report's windows summed straight from the facts: a second, independent reading of
the window rules, to check the window tables against (tests only)."""

from __future__ import annotations

from streams.core.kpis import Aggregate, Fact, window_start


class FactWindows(Aggregate):
    """An Aggregate that also sums each fact into its windows (not the late ones)."""

    def __init__(self, window_sizes: tuple[int, ...] = (3600,)) -> None:
        super().__init__(window_sizes=window_sizes)

    def add_fact(self, fact: Fact) -> None:
        super().add_fact(fact)
        if fact.ts_us is None:
            return
        for size in self.window_sizes:
            if size not in fact.late:
                key = (size, window_start(fact.ts_us, size), fact.name, fact.labels)
                cell = self.windows.setdefault(key, [0, 0.0])
                cell[0] += 1
                cell[1] += fact.value
