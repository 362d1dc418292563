"""The trainer's CPU allocator setting: freed activations are reused, not page-faulted in again."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys, torch
from metalab.engine.cpu_memory import keep_freed_memory
applied = keep_freed_memory()
x = torch.rand(75, 64, 28, 28)  # 15 MB, one conv4 activation of a 75-image task
def one_thread(together=None):  # a step's pattern: several such activations alive together, then all freed
    for _ in range(10):
        alive = [x * k for k in range(4)]
        if together:
            together.wait()  # both threads at their peak at once, in every pass (a fixed peak)
        del alive
if "threads" in sys.argv:  # as train.task_threads runs tasks: worker threads started after the setting
    import threading
    from concurrent.futures import ThreadPoolExecutor
    pool, together = ThreadPoolExecutor(2), threading.Barrier(2)
    def work():
        list(pool.map(lambda _: one_thread(together), range(2)))
else:
    work = one_thread
for _ in range(3):  # warm-up: the heap grows to the layouts the passes need
    work()
faults = []  # minor page faults of each measured pass
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(*args, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc only")
def test_freed_activations_are_reused_without_page_faults_and_the_setting_can_be_turned_off():
    tuned = _probe()
    plain = _probe(METALAB_SYSTEM_MALLOC="1")  # the setting left off
    assert tuned["applied"] and not plain["applied"]
    # Each pass makes 40 allocations of 15 MB (3,675 pages each), which reuse freed memory: 0 faults
    # per pass, but now and then one pass pages a single block in again (3,675 faults; seen once in
    # CI, where only one pass was measured, and in 1 of 15 passes here). glibc's default gave
    # 146,680 in every pass of 9 runs of 10 (0 or 14,600 at times, by heap layout), so it is not
    # asserted. The median pass is: an allocator setting that fails, fails in every pass.
    passes = sorted(tuned["faults"])
    assert passes[len(passes) // 2] < 500, tuned


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc only")
def test_worker_threads_reuse_freed_memory_too():
    """Tasks side by side run in worker threads; glibc gives each its own arena, whose heaps it
    unmaps when they empty whatever the thresholds: the setting keeps them on one arena."""
    tuned = _probe("threads")
    # 10 passes of 80 allocations of 15 MB (3,675 pages each), after 3 warm-up passes. Without one
    # arena the blocks are paged in again in nearly every pass: 19 blocks in the 10 (69,886 faults),
    # run after run. With it the heap only grows now and then, when the two threads interleave into
    # a layout not seen before: 0-3 blocks in 60 runs here. After a single warm-up pass that growth
    # reached 5-6 blocks in 5 passes (2 runs in 25 here, and once in CI), so the probe warms up longer.
    # Asserted: under 6 blocks in the 10 passes, i.e. under 0.6 of a block a pass.
    assert tuned["applied"] and sum(tuned["faults"]) < 6 * 3675, tuned
