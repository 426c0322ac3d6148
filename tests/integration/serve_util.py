"""What the integration tests share: the binary and repository paths, a failure-counting check,
free loopback ports, and a guarantee that no daemon a test started outlives it."""
import atexit
import os
import socket
import sys

ROOT = os.path.abspath(os.environ.get("LQ_REPO_ROOT", os.path.join(os.path.dirname(__file__), "..", "..")))
LQD = os.path.abspath(os.environ.get("LQD", os.path.join(ROOT, "build/server/lqd")))
SKIP = 77  # meson's exit status for a skipped test

_counts = {"passed": 0, "failed": 0}


def check(condition, message):
    """Counts a check; prints the message of a failed one and carries on."""
    if condition:
        _counts["passed"] += 1
    else:
        _counts["failed"] += 1
        print("FAIL:", message, flush=True)


def failures():
    return _counts["failed"]


def finish(name):
    """Prints the closing line and exits 1 when any check failed."""
    print(f"{name}: {_counts['passed']} checks passed, {_counts['failed']} failed")
    sys.exit(1 if _counts["failed"] else 0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTED = []  # daemons (subprocess.Popen) started by the test


@atexit.register
def kill_leftovers():
    """A test that fails half-way must not leave daemons behind."""
    for process in STARTED:
        if process.poll() is None:
            process.kill()
