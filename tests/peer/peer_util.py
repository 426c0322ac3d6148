"""Shared helpers of the peer tests: the lqd binary, temp dirs, and a skip code meson knows."""
import json
import os
import subprocess
import sys

SKIP = 77  # meson's exit code for a skipped test


def require_numpy():
    try:
        import numpy  # noqa: F401
    except ImportError:
        print("numpy is not installed (tests/run.sh installs it in a venv): skipped")
        sys.exit(SKIP)


LQD = os.environ.get("LQD", "build/server/lqd")
ROOT = os.environ.get("LQ_REPO_ROOT", ".")
STORIES = os.path.join(ROOT, "models/stories260K-hf/model.safetensors")


def run_lqd(*args, check=True):
    result = subprocess.run([LQD, *args], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"lqd {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def decompose_json(*args):
    return json.loads(run_lqd("decompose", *args, "--json").stdout)


class Checks:
    """Counts assertion failures without stopping at the first one."""

    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, condition, message):
        if condition:
            self.passed += 1
        else:
            self.failed += 1
            print("FAIL:", message)

    def finish(self):
        print(f"{self.passed} checks passed, {self.failed} failed")
        sys.exit(1 if self.failed else 0)
