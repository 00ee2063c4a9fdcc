"""Measuring pieces for benchmarks: wall-clock timing, peak memory in a fresh process,
FLOP counts, errors against the float64 reference, and the ``attnkit bench`` runner
(:mod:`.main`, :mod:`.runner`, :mod:`.report`, :mod:`.plots`).  Nothing here runs on import."""

from .flops import attention_flops
from .memory import PeakMemory, measure_peak, peak_memory_here
from .timing import Timing, forward_backward_closure, forward_closure, time_callable

__all__ = [
    "PeakMemory",
    "Timing",
    "attention_flops",
    "forward_backward_closure",
    "forward_closure",
    "measure_peak",
    "peak_memory_here",
    "time_callable",
]
