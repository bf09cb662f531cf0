"""`python -m rafale -c run.yaml`, the same as `rafale -c run.yaml`."""

from rafale.cli import run

run()
