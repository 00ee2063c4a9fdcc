"""Peak extra memory of one call, measured in a fresh process.

What is measured: the high-water mark of memory *allocated by the call*, above what
was live when it started.  The caller's inputs are allocated before the measured
region and are not counted; everything the call allocates is, for as long as it is
alive: temporaries, the output (alive when the call returns), tensors saved for
backward and gradients (alive until the call drops them).

Each case runs in a fresh process so that earlier cases leave nothing behind -- no
allocator caches, no fragmentation, no lazily initialised library state.  The
``"spawn"`` context starts a new interpreter per case (about 2 s for importing torch);
the ``"forkserver"`` context (Linux) forks each case from a server process that has
imported torch and attnkit and run nothing else, so every case still starts from the
same clean state at a tenth of the cost.  The benchmark runner uses the forkserver
where there is one.  The case is described by a *factory*: an importable
(picklable) function that the child calls with the given arguments; it allocates the
inputs and returns the zero-argument callable to measure.

Probes (``probe=``; "auto" picks "cuda" on a CUDA device, else "profiler"):

- ``"profiler"`` (CPU): ``torch.profiler.profile(profile_memory=True)`` records every
  allocation and free of torch's CPU allocator (c10) while the call runs, with its size
  and time.  The live-byte count is the running sum of those records in time order;
  the result is its maximum.  It counts every tensor storage on the CPU, including the
  workspaces that C++ kernels allocate internally (e.g. SDPA's per-thread buffers) and
  the storage of views' bases.  It does not count memory that libraries take from
  ``malloc`` behind torch's back (BLAS/oneDNN packing buffers, OpenMP thread stacks),
  Python objects, or the profiler's own event buffers -- all small and independent
  of N.  Byte-exact and repeatable: it does not depend on page faults or on what
  ``malloc`` keeps cached.
- ``"cuda"``: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus
  ``memory_allocated`` before the call: the caching allocator's live bytes (not its
  reserved pool), so the same meaning as "profiler".
- ``"rss"`` (fallback): the rise of the process's peak resident set (``VmHWM``, reset
  through ``/proc/self/clear_refs``) over its resident set before the call.  Counts
  touched pages only, rounds to pages, includes ``malloc``'s caching and any library
  memory; use it only where the profiler is unavailable.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch

__all__ = ["PROBES", "PeakMemory", "allocation_case", "forkserver_context", "measure_peak", "peak_memory_here", "run_fresh"]

PROBES = ("auto", "profiler", "cuda", "rss")

Factory = Callable[..., Callable[[], object]]


@dataclass(frozen=True)
class PeakMemory:
    """One memory measurement.

    Attributes:
        peak_bytes: highest live bytes above the start of the call (None on error).
        retained_bytes: live bytes above the start when the call returned (caches the
            call kept, or tensors it leaked to the caller); None on error or for "rss".
        probe: which probe measured it ("profiler", "cuda", "rss").
        error: why there is no measurement (the child raised, was killed, timed out).
    """

    peak_bytes: int | None
    retained_bytes: int | None
    probe: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict:
        return asdict(self)


def _pick_probe(probe: str, device: str | torch.device) -> str:
    if probe not in PROBES:
        raise ValueError(f"probe={probe!r}: must be one of {PROBES}")
    if probe == "auto":
        return "cuda" if torch.device(device).type == "cuda" else "profiler"
    return probe


# -- probes (each measures one call of fn in this process) ---------------------------

_CPU_DEVICE_TYPES = {"CPU", "MKLDNN", "IDEEP"}


def _profiler_peak(fn: Callable[[], object]) -> tuple[int, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("this torch's profiler exposes no kineto_results; use probe='rss'")
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in results.events()
        if e.name() == "[memory]" and e.device_type().name in _CPU_DEVICE_TYPES
    )
    live = peak = 0
    for _, nbytes in records:  # nbytes > 0: allocation, < 0: free
        live += nbytes
        peak = max(peak, live)
    return peak, live


def _cuda_peak(fn: Callable[[], object]) -> tuple[int, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}; the rss probe needs Linux")


def _rss_peak(fn: Callable[[], object]) -> tuple[int, None]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before), None


_PROBE_FNS = {"profiler": _profiler_peak, "cuda": _cuda_peak, "rss": _rss_peak}


def peak_memory_here(
    fn: Callable[[], object], *, device: str | torch.device = "cpu", probe: str = "auto", warmup: bool = False
) -> PeakMemory:
    """Peak extra memory of one ``fn()`` in *this* process (see the module docstring).

    Prefer :func:`measure_peak`: in a long-lived process, caches and lazily initialised
    state from earlier work change what one call allocates.

    Args:
        fn: the call to measure; its inputs must already be allocated.
        device: where ``fn`` allocates (picks the probe when ``probe="auto"``).
        probe: "auto", "profiler", "cuda" or "rss".
        warmup: call ``fn`` once, unmeasured, first (steady state instead of first call).
    """
    probe = _pick_probe(probe, device)
    if warmup:
        fn()
    gc.collect()
    peak, retained = _PROBE_FNS[probe](fn)
    return PeakMemory(peak_bytes=int(peak), retained_bytes=retained, probe=probe)


# -- fresh process ---------------------------------------------------------------------


def child_start(quiet: bool) -> None:
    """What every measuring process does first: keep what it inherited out of every
    garbage collection (with torch and attnkit imported, one gc.collect() walked ~290,000
    objects in 0.12 s), and with ``quiet`` silence its stdout and stderr (the profiler's
    C++ side prints start/stop lines that would break a progress bar; results come back
    by pipe)."""
    gc.freeze()
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)


def stop_process(proc, wait: float) -> int | None:
    """Wait up to ``wait`` s for ``proc`` to end, kill it if it has not; its exit code."""
    proc.join(timeout=wait)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return proc.exitcode


def exit_reason(code: int | None, error: str | None = None) -> str:
    """Why a measuring process gave no result: ``error`` (e.g. a time-out), else its exit
    code; a signal is named as such."""
    why = error or f"the measuring process exited with code {code}"
    if code is not None and code < 0:
        why += " (killed by a signal; -9 is usually the out-of-memory killer)"
    return why


def _child(conn, target: Callable[..., object], args: tuple, quiet: bool) -> None:
    child_start(quiet)
    try:
        result = ("ok", target(*args))
    except Exception as e:  # reported to the parent, which decides what to do
        result = ("error", f"{type(e).__name__}: {e}")
    conn.send(result)
    conn.close()
    # Skip interpreter teardown (torch's takes most of a second).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_fresh(
    target: Callable[..., object], *args, timeout: float | None = None, context="spawn", quiet: bool = False
) -> tuple[object, str | None]:
    """``target(*args)`` in a fresh process: ``(its picklable result, None)``, or
    ``(None, why)`` when it raised, died (e.g. the out-of-memory killer) or timed out.

    ``target`` must be an importable module-level function.  ``context`` is "spawn",
    "forkserver" (see :func:`forkserver_context`) or a multiprocessing context; ``quiet``
    silences the child's stdout and stderr (the result comes back by pipe).  Never raises
    for a failing target, so one bad case cannot stop a sweep.
    """
    ctx = mp_context(context)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, target, args, quiet), daemon=True)
    proc.start()
    send.close()  # so that recv sees EOF if the child dies
    result, error = None, None
    try:
        if recv.poll(timeout):
            result = recv.recv()
        else:
            error = f"timed out after {timeout} s"
    except EOFError:
        pass
    finally:
        recv.close()
        code = stop_process(proc, 5 if result is not None else 0.1)
    if result is None:
        return None, exit_reason(code, error)
    status, value = result
    return (value, None) if status == "ok" else (None, value)


def _peak_in_child(factory: Factory, args: tuple, device: str, probe: str, warmup: bool) -> PeakMemory:
    return peak_memory_here(factory(*args), device=device, probe=probe, warmup=warmup)


def measure_peak(
    factory: Factory,
    *args,
    device: str | torch.device = "cpu",
    probe: str = "auto",
    warmup: bool = False,
    timeout: float | None = None,
    context: str = "spawn",
    quiet: bool = False,
) -> PeakMemory:
    """Peak extra memory of one call, measured in a fresh process (:func:`run_fresh`).

    Args:
        factory: an importable module-level function; ``factory(*args)`` runs in the
            child, allocates the inputs (not counted) and returns the zero-argument
            callable whose one call is measured.
        *args: picklable arguments for ``factory``.
        device: where the case allocates (picks the probe when ``probe="auto"``).
        probe: "auto", "profiler", "cuda" or "rss" (see the module docstring).
        warmup: call once, unmeasured, before the measured call.
        timeout: seconds to wait for the child before killing it (None: no limit).
        context: "spawn" (a new interpreter) or "forkserver" (forked from a clean
            server; see :func:`forkserver_context`), or a multiprocessing context.
        quiet: silence the child's stdout and stderr (results come back by pipe).

    Returns:
        A :class:`PeakMemory`; when the child fails (raises, is killed -- e.g. by the
        out-of-memory killer -- or times out) ``peak_bytes`` is None and ``error`` says why.
        It never raises for a failing case, so one bad case cannot stop a sweep.
    """
    probe = _pick_probe(probe, device)
    result, why = run_fresh(_peak_in_child, factory, args, str(device), probe, warmup, timeout=timeout,
                            context=context, quiet=quiet)
    return result if why is None else PeakMemory(None, None, probe, error=why)


def mp_context(context):
    """A multiprocessing context from a start method's name ("spawn", "forkserver"...) or
    a context itself (e.g. :func:`forkserver_context`'s)."""
    return multiprocessing.get_context(context) if isinstance(context, str) else context


def forkserver_context(preload: tuple[str, ...] = ("attnkit.bench.cases",)):
    """The "forkserver" multiprocessing context with ``preload`` imported in the server,
    or the "spawn" context where there is no forkserver (not Linux/macOS)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


# -- calibration -----------------------------------------------------------------------


def allocation_case(nbytes: int) -> Callable[[], None]:
    """A factory for checking a probe: the callable allocates ``nbytes``, touches them, frees them."""

    def run() -> None:
        block = torch.empty(nbytes, dtype=torch.uint8)
        block.fill_(1)  # touch every page, so that the rss probe sees it too
        del block

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attnkit.bench.memory",
        description="Check a memory probe: measure a known allocation in a fresh process.",
    )
    parser.add_argument("--mib", type=float, default=64.0, help="size of the known allocation (MiB)")
    parser.add_argument("--probe", choices=PROBES, default="auto")
    args = parser.parse_args(argv)
    nbytes = int(args.mib * 2**20)
    res = measure_peak(allocation_case, nbytes, probe=args.probe)
    if not res.ok:
        print(f"error: {res.error}", file=sys.stderr)
        return 1
    print(f"probe={res.probe}: allocated {nbytes} B, measured peak {res.peak_bytes} B "
          f"({res.peak_bytes / nbytes:.4f}x), retained {res.retained_bytes} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
