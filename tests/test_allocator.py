"""hymate.allocator: freed activations go back to the OS instead of staying in a fragmented heap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hymate import allocator

# With the fix applied, allocates tensors of changing sizes (as length-bucketed batches do), each next to a small
# object that stays alive, frees the tensors and reports how much resident memory is left.
_PROBE = textwrap.dedent(
    """
    import json
    import torch
    from hymate import allocator

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    allocator.return_large_blocks_to_os()
    keep = []
    for warm in range(3):  # free a few big blocks first: this is what raises glibc's threshold
        del_me = torch.ones((8 << 20) // 4 + warm)
        del del_me
    before = rss_mb()
    big = []
    for i in range(40):
        big.append(torch.ones((2 << 20) // 4 + 1024 * i))  # 2-2.2 MB each, about 85 MB in all
        keep.append(torch.ones(64))  # small and alive: pins the heap above a freed block
    del big
    print(json.dumps({"left_mb": rss_mb() - before}))
    """
)


def _left_mb_after_fix() -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout)["left_mb"]


@pytest.mark.skipif(allocator._glibc() is None, reason="not glibc: the allocator settings do not apply")
def test_large_freed_blocks_leave_resident_memory():
    assert allocator.return_large_blocks_to_os() is True
    # Of about 85 MB allocated and freed. How much glibc's default keeps depends on the glibc
    # build and the heap's history (71 MB on the development machine, 4 MB on CI's), so only
    # the fixed setting's bound is asserted: it must hold whatever the default does.
    assert _left_mb_after_fix() < 10


def test_settings_apply_exactly_where_the_c_library_is_glibc():
    allocator.trim_heap()  # a no-op off glibc, never an error
    assert allocator.return_large_blocks_to_os() is (allocator._glibc() is not None)
