"""The whole session's image cache (trainers/datasets/cache.py) in a folder of its own, never the
user's ~/.cache: every process the tests start (trials, Ray workers) inherits $HAS_SWEEP_CACHE."""
import os
import shutil
import tempfile

os.environ["HAS_SWEEP_CACHE"] = _FOLDER = tempfile.mkdtemp(prefix="has-sweep-test-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(_FOLDER, ignore_errors=True)
