"""Test-wide settings.

Under pytest-xdist (pyproject's addopts) each worker, and every process its tests start, gets its share of the
cores: two workers whose processes each run as many OpenMP threads as there are cores spin against each other
(the shipped DEBUG run took 5x as long beside another worker as alone).
"""

import os

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

# The files that take longest, started first: with one file per worker at a time (`--dist loadfile`), a long file
# started last keeps one core busy while the other idles. Measured with --durations on the 2-core machine.
LONGEST_FILES = ("test_reliability.py", "test_preference.py", "test_sft.py", "test_debug_families.py",
                 "test_transforms.py", "test_distributed.py", "test_ppo.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))
