"""This process's housekeeping: transformers kept quiet, and the peak resident memory so far."""

from __future__ import annotations

import logging
import resource

import transformers


def quiet_transformers() -> None:
    """No transformers warnings or progress bars: the toolkit reports its own steps."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. VmHWM belongs to the address space made at exec;
    ru_maxrss (the fallback off Linux) would also count a parent's memory at fork time."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
