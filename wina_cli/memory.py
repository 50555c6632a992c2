"""The process's resident-memory high-water mark, as every report of wina reads it."""
from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB. On Linux this is VmHWM, which `reset_peak_rss` restarts
    (getrusage's figure would keep the old peak once any thread that saw it exits); elsewhere getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def reset_peak_rss() -> None:
    """Restart the high-water mark from the current RSS, so the next reading covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux only; elsewhere the mark keeps its history
    except OSError:
        pass
