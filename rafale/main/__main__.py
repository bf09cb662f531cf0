"""`python rafale/main -c run.yaml`: the original's command line, the same as `rafale -c run.yaml`."""

import sys
from pathlib import Path

# Run as a folder, Python puts rafale/main/ first on the path; the checkout's root makes `import rafale` work
# even before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rafale.cli import run  # noqa: E402

run()
