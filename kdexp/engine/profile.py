"""debug=profile: a torch.profiler trace of a few student steps, written into the run directory.

    <run_dir>/profile/trace.json  the steps' timeline (chrome://tracing or https://ui.perfetto.dev)
    <run_dir>/profile/ops.txt     the operators by total time (CPU and, on a GPU, CUDA)

One step is skipped and one warms up before the `debug.profile_steps` recorded ones, so start-up
costs (allocations, cuDNN's algorithm search) stay out of the numbers."""
import contextlib
import logging
import os
from typing import Iterator, Optional

import torch

log = logging.getLogger("kdexp")


@contextlib.contextmanager
def profiled(debug, run_dir: str, main: bool = True) -> Iterator[Optional[object]]:
    """A profiler to step after every training step while debug.profile_steps > 0 (rank 0 only);
    None otherwise. The trace is written when its steps are done (or when the block ends)."""
    steps = debug.get("profile_steps", 0) if debug is not None else 0
    if not steps or not main:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    folder = os.path.join(run_dir, "profile")
    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def written(prof) -> None:
        prof.export_chrome_trace(os.path.join(folder, "trace.json"))
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        with open(os.path.join(folder, "ops.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
        log.info("profile of %d steps: %s (trace.json, ops.txt)", steps, folder)

    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                 on_trace_ready=written, record_shapes=True) as prof:
        yield prof
