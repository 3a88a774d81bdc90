"""The timing discipline every profiler shares, independent of any framework.

The rule: warm up first; repeat until the median is stable (or a cap on repetitions is reached);
report the median, p10 and p90 together with every sample; pin the thread count; record whatever
can skew a measurement (CPU governor, Jetson power mode, other load on the machine); on CUDA,
synchronise before reading the clock, or time with events. Users' most common complaint about
latency tables is "predicted != measured" (docs/devices.md §5), so a number here always travels
with its samples, how the loop stopped, and the state of the machine when it ran.

- `measure(fn)` -> `Timing`: the loop. `clock` is injectable so the stopping rule is tested
  exactly with scripted durations; `setup` runs untimed before every call (a profiler rewinds a
  KV cache there); `sync` drains an asynchronous device before each clock read.
- `pinned_threads(n)`: the torch intra-op thread count for the duration of a measurement.
- `environment()`: governor, load, cores, threads, versions, GPU, Jetson power mode, and warnings.

torch is imported lazily (only `pinned_threads`, `cuda_events=True` and `environment` touch it), so
a profiler for another runtime (onnxruntime, llama.cpp) uses this module without paying for it.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from amoeba_export.errors import UserError
from amoeba_export.manifest import versions
from targets import cpu_model

STOP_REASONS = ("stable", "max_repeats", "max_seconds")


@dataclass
class Timing:
    """Seconds. `samples` are in the order taken (warm-up calls excluded)."""

    median: float
    p10: float
    p90: float
    mean: float
    stdev: float
    samples: list[float] = field(repr=False)
    n: int
    stable: bool
    stop_reason: str  # one of STOP_REASONS
    warmup: int = 0
    timer: str = "perf_counter"  # or "cuda_events"

    @classmethod
    def from_samples(cls, samples: list[float], *, stop_reason: str, warmup: int = 0,
                     timer: str = "perf_counter") -> "Timing":
        if not samples:
            raise ValueError("no samples")
        s = [float(x) for x in samples]
        return cls(
            median=statistics.median(s), p10=percentile(s, 10), p90=percentile(s, 90),
            mean=statistics.fmean(s), stdev=statistics.stdev(s) if len(s) > 1 else 0.0,
            samples=s, n=len(s), stable=stop_reason == "stable", stop_reason=stop_reason,
            warmup=warmup, timer=timer,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Timing":
        return cls(**d)

    def __str__(self) -> str:
        ms = 1e3
        return (f"median {self.median * ms:.3f} ms (p10 {self.p10 * ms:.3f}, p90 {self.p90 * ms:.3f}; "
                f"n={self.n}, {self.stop_reason})")


def percentile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    s = sorted(samples)
    if not s:
        raise ValueError("no samples")
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def is_stable(samples: list[float], window: int, rel_tol: float) -> bool:
    """The median of all samples moved by at most `rel_tol` (relative) when the last `window`
    samples were added."""
    if len(samples) <= window:
        return False
    now = statistics.median(samples)
    before = statistics.median(samples[:-window])
    return abs(now - before) <= rel_tol * abs(now)


def measure(fn: Callable[[], object], *, warmup: int = 3, min_repeats: int = 5, max_repeats: int = 50,
            max_seconds: float = 20.0, rel_tol: float = 0.02, sync: Callable[[], object] | None = None,
            setup: Callable[[], object] | None = None, cuda_events: bool = False, window: int = 2,
            clock: Callable[[], float] = time.perf_counter, min_seconds: float = 0.0) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then repeat until the median is stable or a cap is hit.

    Stable: at least `min_repeats` samples (and `window + 3`, so the earlier median has three
    samples behind it) over at least `min_seconds` of timed phase, and the median of all samples
    differs from the median without the last `window` samples by at most `rel_tol` of it. Caps:
    `max_repeats` samples (once `min_seconds` have passed), or `max_seconds` of timed phase (by
    `clock`; warm-up not counted, at least one sample always taken). `min_seconds` spreads the
    samples over a window long enough to average a machine whose speed drifts (a shared VM).

    `setup()` runs before every call, untimed (e.g. rewinding a KV cache so every sample starts
    from the same state). `sync()` runs before each start and end clock read: pass
    `torch.cuda.synchronize` for CUDA work, else the clock stops when the kernels are queued, not
    done. `cuda_events=True` times with `torch.cuda.Event`s on the current stream instead of
    `clock` (a UserError where CUDA is unavailable). Garbage collection is off while timing, as
    in `timeit`.
    """
    if warmup < 0 or min_repeats < 1 or max_repeats < min_repeats or window < 1:
        raise UserError(f"timing: need warmup >= 0, 1 <= min_repeats <= max_repeats and window >= 1 "
                        f"(got warmup={warmup}, min_repeats={min_repeats}, max_repeats={max_repeats}, window={window})")
    if not max_seconds > 0 or not rel_tol >= 0:
        raise UserError(f"timing: need max_seconds > 0 and rel_tol >= 0 (got {max_seconds}, {rel_tol})")
    once = _event_timer(fn, setup) if cuda_events else _clock_timer(fn, setup, sync, clock)
    timer = "cuda_events" if cuda_events else getattr(clock, "__name__", "clock")

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(warmup):
            once()
        samples: list[float] = []
        start = clock()
        need = max(min_repeats, window + 3)
        while True:
            samples.append(once())
            long_enough = clock() - start >= min_seconds
            if len(samples) >= need and long_enough and is_stable(samples, window, rel_tol):
                reason = "stable"
            elif len(samples) >= max_repeats and long_enough:
                reason = "max_repeats"
            elif clock() - start >= max_seconds:
                reason = "max_seconds"
            else:
                continue
            break
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing.from_samples(samples, stop_reason=reason, warmup=warmup, timer=timer)


def _clock_timer(fn, setup, sync, clock):
    def once() -> float:
        if setup is not None:
            setup()
        if sync is not None:
            sync()  # work queued by setup (or earlier) must not land inside this sample
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        return clock() - t0
    return once


def _event_timer(fn, setup):
    try:
        import torch
        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if not available:
        raise UserError("cuda_events=True needs a CUDA device, and none is available here: "
                        "time on the CPU clock (cuda_events=False) or run on a GPU machine")

    def once() -> float:
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s
    return once


# ---------------------------------------------------------------- threads

def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the usable CPUs (SMT siblings counted once); os.cpu_count() when the
    topology is not readable. GEMM-bound inference gains little from SMT siblings, and one thread
    per core avoids two threads fighting over one core's units."""
    cpus = usable_cpus()
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        siblings = None
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                siblings = (topo / name).read_text().strip()
                break
            except OSError:
                continue
        if siblings is None:
            return len(cpus) or (os.cpu_count() or 1)
        cores.add(siblings)
    return len(cores) or (os.cpu_count() or 1)


def resolve_threads(n: int | None) -> int:
    """The thread count a run uses: `n`, or the physical cores; anything else is a UserError."""
    n = physical_cores() if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"threads must be a whole number >= 1, got {n!r}")
    return n


@contextlib.contextmanager
def pinned_threads(n: int | None = None):
    """`torch.set_num_threads(n)` inside the block (default: physical cores), restored after.
    Yields the thread count used, so the caller can record it."""
    import torch

    n = resolve_threads(n)
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- environment

def environment(run_threads: int | None = None) -> dict:
    """What can skew a measurement, read before the run; `warnings` says what looks wrong, judged by
    the run's own thread count `run_threads` (default: torch's, for runtimes that torch drives).

    Only cheap reads: /proc and /sys files, package metadata, torch's CUDA query when torch is
    already imported or a driver is present, and `nvpmodel -q` on a Jetson (a short subprocess).
    """
    cpus = usable_cpus()
    torch = _torch_if_cheap()
    threads = torch.get_num_threads() if torch is not None else None
    env = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(cpus),
        "physical_cores": physical_cores(),
        "torch_threads": threads,
        "run_threads": run_threads if run_threads is not None else threads,
        "governor": _governor(cpus),
        "cpu_boost": _read("/sys/devices/system/cpu/cpufreq/boost"),
        "loadavg": _loadavg(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                       if k in os.environ},
        "versions": versions(),
        "cuda": _cuda(torch),
        "jetson": _jetson(),
    }
    env["warnings"] = skew_warnings(env)
    return env


def skew_warnings(env: dict) -> list[str]:
    """Plain-language warnings for an `environment()` record."""
    # Other processes' load is not judged here: the load average lags by a minute and counts this
    # process's own recent work; the profiler measures the others' load over the timing itself
    # (`other_load`, `noisy` in each record).
    out = []
    cores = env.get("usable_cpus") or env.get("logical_cpus") or 1
    threads = env.get("run_threads") or env.get("torch_threads") or cores
    gov = env.get("governor")
    if isinstance(gov, str) and gov != "performance":
        out.append(f"governor is {gov}: the clock ramps with load, so short timings vary; "
                   "set 'performance' (cpupower frequency-set -g performance) for stable numbers")
    elif isinstance(gov, dict):
        out.append(
            f"CPUs run different governors ({', '.join(sorted(set(gov.values())))}): timings depend on scheduling"
        )
    phys = env.get("physical_cores")
    if threads and phys and threads > phys:
        out.append(f"{threads} threads on {phys} physical cores: oversubscribed, timings will be slower and noisier")
    jetson = env.get("jetson") or {}
    mode = jetson.get("power_mode")
    if mode and "MAXN" not in mode.upper():
        out.append(f"Jetson power mode is {mode!r}, not MAXN: latencies hold for this mode only")
    return out


def _torch_if_cheap():
    if "torch" in sys.modules:
        return sys.modules["torch"]
    try:
        import torch
        return torch
    except ImportError:
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _governor(cpus: list[int]) -> str | dict | None:
    """One name when every usable CPU has the same governor, {cpu: name} when they differ,
    None where cpufreq is not exposed (containers, most VMs)."""
    found = {c: g for c in cpus if (g := _read(f"/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor"))}
    if not found:
        return None
    names = set(found.values())
    return names.pop() if len(names) == 1 else {str(c): g for c, g in found.items()}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _cuda(torch) -> dict | None:
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        i = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
    except (RuntimeError, AssertionError):
        return None
    driver = None
    text = _read("/proc/driver/nvidia/version")
    if text:
        m = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", text)
        driver = m.group(1) if m else text.splitlines()[0]
    return {"device": i, "name": p.name, "arch": f"sm_{p.major}{p.minor}", "memory_bytes": int(p.total_memory),
            "count": torch.cuda.device_count(), "cuda_runtime": torch.version.cuda, "driver": driver}


def _jetson() -> dict | None:
    """Power mode via `nvpmodel -q` where it exists (Jetson); None elsewhere."""
    release = _read("/etc/nv_tegra_release")
    if release is None and not Path("/etc/nvpmodel.conf").exists():
        return None
    out = {"release": release.splitlines()[0] if release else None, "power_mode": None}
    exe = shutil.which("nvpmodel")
    if exe:
        try:
            q = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=5)
            for line in q.stdout.splitlines():
                if "Power Mode" in line:
                    out["power_mode"] = line.split(":", 1)[1].strip()
                    break
        except (OSError, subprocess.SubprocessError):
            pass
    return out


# ---------------------------------------------------------------- other load

def load_snapshot() -> tuple | None:
    """All CPUs' busy and total jiffies (/proc/stat) and this process's CPU seconds, now; None where
    /proc/stat is not readable. Two snapshots give the other processes' load between them."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, IndexError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    own = os.times()
    return sum(fields) - idle, sum(fields), own.user + own.system, own.elapsed


def other_load(since: tuple | None, until: tuple | None = None) -> float | None:
    """CPUs kept busy by *other* processes between two snapshots (this process's own threads taken
    out). The load average lags by a minute and counts waiting processes; this is what a
    measurement actually competed with."""
    until = until or load_snapshot()
    if since is None or until is None or until[1] <= since[1]:
        return None
    everyone = (until[0] - since[0]) / (until[1] - since[1]) * (os.cpu_count() or 1)
    mine = (until[2] - since[2]) / max(until[3] - since[3], 1e-9)
    return round(max(0.0, everyone - mine), 2)


def busy_cpus(interval: float = 0.3) -> float | None:
    """Other processes' load over the next `interval` seconds."""
    start = load_snapshot()
    time.sleep(interval)
    return other_load(start)


def quiet_enough(threads: int, busy: float | None) -> bool:
    """Whether `threads` timing threads get their cores: other load fits in the cores they leave free
    (half a core of slack for daemons)."""
    return busy is None or busy <= max(0.5, len(usable_cpus()) - threads + 0.5)


def wait_for_quiet(
    threads: int, max_wait_s: float | None = None, notice: Callable[[str], None] | None = None
) -> float | None:
    """Wait (up to `max_wait_s`, default $AMOEBA_EXPORT_QUIET_WAIT or 60 s) until other processes
    leave `threads` cores free; returns the other load seen last (CPUs), so the caller can refuse or
    flag a measurement taken while it stayed busy."""
    if max_wait_s is None:
        max_wait_s = float(os.environ.get("AMOEBA_EXPORT_QUIET_WAIT", "60"))
    busy = busy_cpus()
    deadline = time.monotonic() + max_wait_s
    told = False
    while not quiet_enough(threads, busy) and time.monotonic() < deadline:
        if notice is not None and not told:
            notice(f"{busy:.1f} of {len(usable_cpus())} CPUs are busy with other processes: waiting up to "
                   f"{max_wait_s:.0f} s for them before timing with {threads} thread{'s' if threads > 1 else ''}")
            told = True
        time.sleep(1.0)
        busy = busy_cpus()
    return busy


def profile_record(path, workload, timings: dict, env: dict, runtime: dict, measure_kwargs: dict) -> dict:
    """The JSON record every flow's profiler returns: {"workload", "timings": {metric: Timing fields},
    "environment", "artifact", "runtime" (with the artifact's shape when its manifest says), "measure"}."""
    from amoeba_export.io import read_json
    from amoeba_export.manifest import MANIFEST

    path = Path(path)
    manifest = (path if path.is_dir() else path.parent) / MANIFEST
    if manifest.is_file():
        try:
            runtime["shape"] = read_json(manifest).get("shape")
        except UserError:
            pass
    return {
        "workload": workload.to_json(),
        "timings": {m: t.to_dict() for m, t in timings.items()},
        "environment": env,
        "artifact": str(path),
        "runtime": runtime,
        "measure": {k: v for k, v in measure_kwargs.items() if isinstance(v, (int, float, str, bool))},
    }


def time_requests(
    run: Callable[[int], object], workload, metrics: tuple[str, ...], **measure_kwargs
) -> dict[str, Timing]:
    """Timings for runtimes that only run whole requests (TensorRT-LLM's and MLC-LLM's engines):
    `run(n)` serves one request of the workload's prompt that generates exactly `n` tokens.

    TTFT is a request for one token; E2E a request for `gen_len`; TPOT is derived from both, each
    E2E sample less the TTFT median, over `gen_len - 1` steps: the mean decode step over a cache
    growing from `prompt_len` to `prompt_len + gen_len` (the CPU profilers time one step at exactly
    `prompt_len`; the record says which). Both are measured whenever TPOT is asked for.
    """
    want = set(metrics)
    if "tpot" in want and workload.gen_len < 2:
        raise UserError("TPOT from whole requests needs --gen-len of at least 2")
    out: dict[str, Timing] = {}
    if want & {"ttft", "tpot"}:
        out["ttft"] = measure(lambda: run(1), **measure_kwargs)
    if want & {"e2e", "tpot"}:
        out["e2e"] = measure(lambda: run(workload.gen_len), **measure_kwargs)
    if "tpot" in want:
        e2e, ttft = out["e2e"], out["ttft"]
        steps = [(s - ttft.median) / (workload.gen_len - 1) for s in e2e.samples]
        out["tpot"] = Timing.from_samples(steps, stop_reason=e2e.stop_reason, warmup=e2e.warmup,
                                          timer=f"derived: (e2e sample - ttft median) / {workload.gen_len - 1}")
    return {m: out[m] for m in metrics}


def time_steps(steps, ids, workload, metrics: tuple[str, ...], **measure_kwargs) -> dict[str, Timing]:
    """The one timing loop of every CPU runtime, over its steps (`amoeba_export.flows.base.Steps`):

    - TTFT: `prefill(ids)` from an empty cache (emptied in the untimed setup), the first token out;
    - TPOT: one `decode` step over exactly `prompt_len` cached positions: the prompt is prefilled
      once, untimed, and before every sample the cache is rewound to `prompt_len`, so every sample
      attends over the same positions and appends one;
    - E2E: prefill, then `gen_len - 1` decode steps, so `gen_len` tokens come out.
    """
    P = workload.prompt_len

    def request():
        token = steps.prefill(ids)
        for _ in range(workload.gen_len - 1):
            token = steps.decode(token)
        return token

    out: dict[str, Timing] = {}
    for metric in metrics:
        if metric == "ttft":
            out[metric] = measure(lambda: steps.prefill(ids), setup=lambda: steps.rewind(0), **measure_kwargs)
        elif metric == "tpot":
            steps.rewind(0)
            token = steps.prefill(ids)
            out[metric] = measure(lambda: steps.decode(token), setup=lambda: steps.rewind(P), **measure_kwargs)
        else:
            out[metric] = measure(request, setup=lambda: steps.rewind(0), **measure_kwargs)
    return out
