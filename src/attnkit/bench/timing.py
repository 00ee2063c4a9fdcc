"""Wall-clock timing of one callable with ``torch.utils.benchmark``.

:func:`time_callable` warms the callable up, then lets
``torch.utils.benchmark.Timer.blocked_autorange`` run it in blocks (it synchronises
CUDA and picks a block size that makes the timer's own overhead negligible) for long
enough to collect about ``repeats`` blocks, and reports the median and interquartile
range of the per-call time.  On a shared machine the numbers are only as good as the
machine is quiet, so every :class:`Timing` also says how much of the machine's CPU
other processes used while it was measured (Linux; see :func:`other_cpu_load`), and
:func:`wait_for_quiet` lets a sweep wait for a quiet moment.  The closures below are what the benchmarks time: a
forward pass under ``torch.no_grad()``, or a forward and backward pass whose
gradients are dropped afterwards so that every call allocates them afresh.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils import common
from torch.utils.benchmark.utils.timer import timer as device_timer

try:
    import resource  # page-fault counts (Unix)
except ImportError:  # Windows
    resource = None

__all__ = [
    "Timing", "time_callable", "pool", "forward_closure", "forward_backward_closure", "other_cpu_load", "wait_for_quiet",
    "steady_allocator", "huge_pages", "thp_mode", "release_heap", "case_time",
]

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Timing:
    """Per-call times of one callable, in seconds.

    Attributes:
        median: median over the measured blocks of (block time / calls per block).
        iqr: interquartile range of the same.
        times: every measured block's per-call time.
        number_per_block: calls in each measured block (1 for anything slower than ~10 ms).
        warmup: unmeasured calls made first, the settling calls included (the block-size
            estimate adds at least one more).
        page_faults: minor page faults per call during the kept blocks (None where unknown,
            or where no block ran without faults); near 0 when the call reused memory the
            process already held.
        fresh_bytes: growth of the resident set per call during the kept blocks (Linux;
            None elsewhere, or where no block settled): memory the call took that the
            process did not hold yet.
        faulted_blocks: per-call times of the blocks of a slow call that were re-taken
            because they faulted pages in (see ``settle`` in :func:`time_callable`).
        other_load: fraction of the machine's CPU capacity (all cores) that *other*
            processes used while the blocks were measured; None where unknown.  On a
            machine with few cores even 0.1 can slow a multi-threaded call a lot.
    """

    median: float
    iqr: float
    times: tuple[float, ...]
    number_per_block: int
    warmup: int
    other_load: float | None = None
    page_faults: float | None = None
    faulted_blocks: tuple[float, ...] = ()
    fresh_bytes: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def time_callable(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_run_time: float = 0.2,
    num_threads: int | None = None,
    label: str = "",
    settle: int = 8,
    expect: float | None = None,
) -> Timing:
    """Time ``fn()``: warm-up, settling, then ``Timer.blocked_autorange``.

    Args:
        fn: the zero-argument callable to time (e.g. from :func:`forward_closure`).
        warmup: calls made before measuring (first-call costs: allocator growth,
            kernel selection, lazy initialisation).
        repeats: the least number of measured blocks (about as many for a slow
            callable; a fast one gets as many as fit in ``min_run_time``).
        min_run_time: least total measured time, in seconds.
        num_threads: torch intra-op threads while timing (default: the current setting).
        label: a name for the measurement (shown by torch's ``Measurement``).
        settle: after the warm-up, call ``fn`` up to this many more times until a call
            is :func:`settled` by its page faults and the growth of the resident set
            (Linux/macOS; elsewhere nothing is known and no call is added).  A call that
            needs memory the process does not hold yet pays for every page of it (on this
            project's VM ~6 us per 4 KiB page, host faults included: math SDPA
            forward+backward at N=4096 took 3-9 s instead of 1.3 s while it faulted), and
            the allocator can take several calls to reach the heap the call needs; timing
            before that measures the kernel.  Calls slower than :data:`SLOW_CALL_S` are
            then timed one per block, and a block that did not settle is re-taken, up to
            ``settle`` times (its time is kept in ``faulted_blocks``; if fewer than
            ``repeats`` blocks ran clean, every block counts).
        expect: a call's time measured before in this process.  With ``warmup=0`` it
            stands in for the warm-up call's (which decides between one call per block
            and ``blocked_autorange``), so a call that is warm already is timed at once.

    Returns:
        A :class:`Timing` with a positive median.

    Raises:
        ValueError: ``warmup < 0`` or ``repeats < 1``.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"time_callable: need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    estimate, calls, took = expect or 0.0, 0, None
    while calls < warmup or (calls < warmup + settle and took is not None and not settled(took[0], estimate, took[1])):
        m0 = _marks()
        start = time.perf_counter()
        fn()
        estimate = time.perf_counter() - start
        calls += 1
        took = _took(m0, _marks())
    # blocked_autorange keeps measuring until min_run_time has passed; asking for a
    # little less than `repeats` calls' worth stops it after about `repeats` blocks of
    # a slow callable instead of after one.
    run_time = max(min_run_time, (repeats - 0.5) * estimate)
    threads = torch.get_num_threads() if num_threads is None else num_threads
    before = _cpu_snapshot()
    if estimate >= SLOW_CALL_S and _marks() is not None:
        # one call per block; a block that took fresh memory is re-taken (up to `settle`
        # times) -- it timed the kernel (and the host) handing the process memory, not the call
        times, kept, dropped = [], [], []
        with common.set_torch_threads(threads):
            while (len(times) < repeats or sum(times) < min_run_time) and len(dropped) <= settle:
                m0, start = _marks(), device_timer()  # device_timer synchronises an accelerator
                fn()
                t, took = device_timer() - start, _took(m0, _marks())
                if settled(took[0], t, took[1]):
                    times.append(t)
                    kept.append(took)
                else:
                    dropped.append(t)
        number, per_call = 1, None
        if len(times) < repeats:  # never settled: report what was measured, faults and all
            times = times + dropped
        else:
            fresh = [b for _, b in kept]
            per_call = (sum(f for f, _ in kept) / len(kept), None if None in fresh else sum(fresh) / len(kept))
    else:
        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)
        m0 = _marks()
        m = timer.blocked_autorange(min_run_time=run_time)
        times, number, dropped = [float(t) for t in m.times], int(m.number_per_run), []
        while len(times) < repeats:  # one disturbed block can fill min_run_time on its own
            times.append(float(timer.timeit(number).times[0]))
        took = _took(m0, _marks())
        n = len(times) * number
        per_call = None if took is None else (took[0] / n, None if took[1] is None else took[1] / n)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return Timing(
        median=float(median),
        iqr=float(q3 - q1),
        times=tuple(times),
        number_per_block=number,
        warmup=calls,
        other_load=_other_load(before, _cpu_snapshot()),
        page_faults=None if per_call is None else per_call[0],
        faulted_blocks=tuple(dropped),
        fresh_bytes=None if per_call is None else per_call[1],
    )


def pool(timings: list[Timing]) -> Timing:
    """One :class:`Timing` from several measurements of the same callable (e.g. taken in
    rounds, so that a slow spell of the machine does not land on one case only): the
    median and IQR of all their blocks together; ``other_load``, ``page_faults`` and
    ``fresh_bytes`` are the largest known, ``faulted_blocks`` all of them."""
    if not timings:
        raise ValueError("pool: no timings")
    times = [t for timing in timings for t in timing.times]
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3

    def largest(name):
        known = [getattr(t, name) for t in timings if getattr(t, name) is not None]
        return max(known) if known else None

    return Timing(
        median=statistics.median(times),
        iqr=q3 - q1,
        times=tuple(times),
        number_per_block=max(t.number_per_block for t in timings),
        warmup=sum(t.warmup for t in timings),
        other_load=largest("other_load"),
        page_faults=largest("page_faults"),
        faulted_blocks=tuple(b for t in timings for b in t.faulted_blocks),
        fresh_bytes=largest("fresh_bytes"),
    )


def case_time(t: dict | None) -> float | None:
    """The time a sweep reports for one case's timing dict: its ``best`` (the fastest
    block, see :func:`attnkit.bench.runner.pool_rounds`) where it has one, else its
    median (results written before there was a ``best``; the other benchmarks)."""
    if not t:
        return None
    return t.get("best", t.get("median"))


def release_heap() -> bool:
    """Give the memory glibc's heap holds free back to the system (``malloc_trim(0)``).

    After :func:`steady_allocator` nothing is trimmed by itself; the sweep's own process
    calls this after each accuracy measurement, whose float64 references take gigabytes at
    N=4096, so that it does not hold them while the timing processes run (a timing process
    of math attention's forward+backward at N=4096 grew to 17 GB, and one was stopped by
    the out-of-memory killer while the sweep held 9.5 GB).  Returns False where there is
    no ``malloc_trim`` (not glibc).
    """
    import ctypes

    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(ctypes.c_size_t(0))
    return True


SETTLED_FAULTS = 256  # page faults (1 MiB of 4 KiB pages) a call may take and count as settled
FAULT_S = 2e-6  # what a minor page fault costs on this project's VM, measured: 147,892 faults added 0.23 s
SETTLED_BYTES = 2**20  # fresh resident memory a call may take and count as settled
FRESH_S_PER_GIB = 0.3  # what a GiB of fresh memory costs on this project's VM at the least (measured 0.3-2.5 s)


def settled(faults: int, call_s: float, fresh_bytes: int | None = None) -> bool:
    """A call counts as settled (its time is the call's, not the kernel's handing it
    memory) when its page faults and the fresh memory it took each cost at most 1% of its
    time, or were next to none.

    Faults: at most :data:`SETTLED_FAULTS`, or :data:`FAULT_S` each.  torch SDPA's
    forward+backward at N=4096 takes 3,000-12,000 faults on every call (gradients that
    glibc places afresh), about 1% of its 1.2 s, and waiting for 256 cost up to 8 more
    warm-up calls.  Fresh memory (growth of the resident set, where known): at most
    :data:`SETTLED_BYTES`, or :data:`FRESH_S_PER_GIB`.  The fault count alone says
    nothing under huge pages (:func:`huge_pages`): one fault hands over 2 MiB, and math's
    forward at N=4096 bf16 took 3.3 s and 5.0 s for calls that ran 0.54 s once its heap
    stopped growing, at 1,500 faults per call."""
    ok_faults = faults <= SETTLED_FAULTS or faults * FAULT_S <= 0.01 * call_s
    return ok_faults and (fresh_bytes is None or fresh_bytes <= SETTLED_BYTES
                          or fresh_bytes / 2**30 * FRESH_S_PER_GIB <= 0.01 * call_s)


SLOW_CALL_S = 0.05  # calls at least this slow are timed one per block, faulting blocks re-taken


def _marks() -> tuple[int, int | None] | None:
    """(minor page faults so far, resident bytes or None where there is no ``/proc``) of
    this process; None where ``resource`` is unavailable."""
    if resource is None:
        return None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    try:
        with open("/proc/self/statm") as f:
            return faults, int(f.read().split()[1]) * _PAGE
    except OSError:
        return faults, None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _took(m0, m1) -> tuple[int, int | None] | None:
    """(page faults, fresh resident bytes) between two :func:`_marks`; None where unknown."""
    if m0 is None or m1 is None:
        return None
    return m1[0] - m0[0], None if m0[1] is None or m1[1] is None else max(0, m1[1] - m0[1])


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, CPU seconds the whole machine was busy, CPU seconds of this process)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest is inside user
    t = os.times()
    return time.monotonic(), busy, t.user + t.system


def _other_load(a, b) -> float | None:
    if a is None or b is None or b[0] <= a[0]:
        return None
    capacity = (b[0] - a[0]) * (os.cpu_count() or 1)
    return min(1.0, max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / capacity))


def other_cpu_load(interval: float = 1.0) -> float | None:
    """Fraction of the machine's CPU capacity used by other processes over ``interval`` s.

    Read from ``/proc/stat`` (Linux; None elsewhere), minus this process's own CPU time;
    the clock tick (usually 10 ms) limits its resolution.
    """
    a = _cpu_snapshot()
    time.sleep(interval)
    return _other_load(a, _cpu_snapshot())


def wait_for_quiet(threshold: float = 0.25, max_wait: float = 30.0, interval: float = 1.0) -> float | None:
    """Sleep until other processes use at most ``threshold`` of the CPU, or ``max_wait`` s pass.

    Returns the last load measured (None where it cannot be measured).
    """
    deadline = time.monotonic() + max_wait
    while True:
        load = other_cpu_load(interval)
        if load is None or load <= threshold or time.monotonic() >= deadline:
            return load


def forward_closure(attn: AttentionFn, q: Tensor, k: Tensor, v: Tensor) -> Callable[[], None]:
    """``attn(q, k, v)`` under ``torch.no_grad()`` (inference); the output is dropped on return."""

    def run() -> None:
        with torch.no_grad():
            attn(q, k, v)

    return run


def forward_backward_closure(
    attn: AttentionFn, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor
) -> Callable[[], None]:
    """Forward, then backward of ``grad_out`` into q, k, v (leaves with requires_grad).

    The gradients are set to None after each call so that the next call allocates them
    again instead of accumulating (an extra read-modify-write the caller would not pay).
    """
    leaves = [t for t in (q, k, v) if t.requires_grad]
    if not leaves:
        raise ValueError("forward_backward_closure: none of q, k, v requires grad; nothing to differentiate")

    def run() -> None:
        out = attn(q, k, v)
        # under autocast the output may come back in the low dtype
        out.backward(grad_out if grad_out.dtype == out.dtype else grad_out.to(out.dtype))
        for t in leaves:
            t.grad = None

    return run


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, loaded once (``find_library`` runs ``ldconfig``), or None."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def steady_allocator() -> str:
    """Make large CPU allocations reuse freed memory, so that timings do not depend on history.

    torch's CPU allocator takes every tensor from malloc.  glibc serves a large request
    from fresh mmap'd pages (zeroed by the kernel on first touch) or from its heap,
    depending on a threshold it moves as blocks are freed, and it trims freed heap
    memory back to the kernel.  So the same call can pay page faults in one run and not
    in the next.  Measured on this project's 2-core machine (bert-base shape, forward,
    median of 7 after a warm-up): vanilla attention at N=1024 bf16 took 29.8 or 9.4 ms in
    the same process depending on what ran before it, fp32 63-66 ms; with this setting
    8.7-8.9 ms and 25 ms every time (SDPA and LowRank unchanged, 18-19 ms and 6 ms).
    With mmap off (``M_MMAP_MAX=0``) and no trimming, every call after the warm-up reuses
    warm heap pages -- what a long-running process (or the CUDA caching allocator) sees.
    "No trimming" is a threshold of SIZE_MAX (mallopt's int -1 converts to it): with the
    largest int, 2^31-1, glibc still gave the heap back whenever a call freed more than
    2 GiB at its top (math SDPA forward+backward at N=4096, bert-base shape, frees 2.4 GB),
    and the next call faulted it in again (seen with strace: brk shrinking between calls).
    It applies to the calling process only and is never undone: the sweep calls it in
    each fresh timing process (and in its own, for compiled cases); memory is measured
    from allocator events, not pages, so it does not change what the probe reports.

    Returns a line for the report: what was set, or why nothing could be (not glibc).
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return "default allocator (mallopt is not available: not glibc)"
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)):
        return "default allocator (mallopt refused the settings)"
    return "glibc malloc with mmap off and no trimming (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=SIZE_MAX); each case warmed up until a call takes (next to) no page faults and no fresh memory"


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # read by torch's CPU allocator (c10 alloc_cpu), once per process
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), or None
    where the system has none."""
    try:
        with open(_THP_MODE) as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def huge_pages(enable: bool = True) -> str:
    """Have torch's CPU allocator back its large allocations with transparent huge pages
    in the processes started from now on (the timing processes), or not.

    With ``THP_MEM_ALLOC_ENABLE=1`` in its environment, torch aligns every allocation of
    2 MiB and more to 2 MiB and madvises it ``MADV_HUGEPAGE``; a process reads the
    variable at its first allocation, so it must be set before the process allocates
    anything (the sweep's forkserver is started after this).  Without it (torch's
    default) the kernel gives such a tensor 4 KiB pages, faulted in one by one.
    Measured on this project's 2-core VM (bert-base shape, steady allocator, four fresh
    processes each): with huge pages a call's heap settles after the first call instead
    of the third, and math's forward at N=2048 fp32 ran 127-136 ms instead of 149-157 ms.
    Whether they also make a case steadier from process to process is not settled: one
    check found narrower spreads, another none (benchmarks/results/bench_stability.md).

    Returns a line for the report: what the timing processes get.
    """
    os.environ[HUGE_PAGES_ENV] = "1" if enable else "0"
    if not enable:
        return "4 KiB pages (--no-huge-pages)"
    mode = thp_mode()
    if mode is None:
        return "4 KiB pages (this system has no transparent huge pages)"
    if mode == "never":
        return "4 KiB pages (the kernel's transparent huge pages are off: " + _THP_MODE + " is never)"
    return f"transparent huge pages for tensors of 2 MiB and more ({HUGE_PAGES_ENV}=1; kernel mode {mode})"


LOADED = 0.1  # other processes' share of the CPU above which a timing is re-taken / marked †


def timed_quietly(fn: Callable[[], object], opts, expect: float | None = None) -> dict:
    """Time ``fn`` when the machine is quiet, as far as waiting a bounded time allows.

    ``opts`` has ``quiet_wait``, ``quiet_load``, ``retries``, ``warmup``, ``repeats`` and
    ``min_run_time`` (the command line's namespace or the runner's config).  Waits up to
    ``quiet_wait`` s for other processes to calm down, times, and, when they used more
    than ``LOADED`` of the CPU meanwhile, waits and times again (up to ``retries`` times),
    keeping the least disturbed attempt; every attempt's median and load stay in the result.
    ``expect`` goes to :func:`time_callable`.
    """
    attempts = []
    for _ in range(1 + opts.retries):
        if opts.quiet_wait > 0:
            wait_for_quiet(opts.quiet_load, opts.quiet_wait, interval=0.5)
        t = time_callable(fn, warmup=opts.warmup, repeats=opts.repeats, min_run_time=opts.min_run_time,
                          expect=expect).as_dict()
        attempts.append(t)
        if t["other_load"] is None or t["other_load"] <= LOADED:
            break
    best = min(attempts, key=lambda t: t["other_load"] or 0.0)
    return {**best, "attempts": [{"median": t["median"], "other_load": t["other_load"]} for t in attempts]}
