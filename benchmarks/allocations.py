"""Exact peak of the bytes torch's CPU allocator hands out: CUDA's max_memory_allocated for a CPU, so that memory
comparisons do not depend on how malloc returns freed pages to the system (which the resident set shows)."""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


class PeakAllocation:
    """`with PeakAllocation() as peak: …` sets `peak.bytes`: the most bytes allocated at once inside the block,
    beyond what was allocated when it began (read from the profiler's allocation events)."""

    def __enter__(self) -> PeakAllocation:
        self.bytes = None
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._profiler.__exit__(*exc_info)
        events = [e for e in self._profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for event in sorted(events, key=lambda event: event.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        self.bytes = peak
