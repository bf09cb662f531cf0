"""Test-wide settings.

Under pytest-xdist (pyproject's addopts) each worker, and every process its tests start, gets its share of the
cores: two workers whose processes each run as many OpenMP threads as there are cores spin against each other
(the shipped DEBUG run took 5x as long beside another worker as alone).
"""

import os

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
