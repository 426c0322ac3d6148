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


def require_safetensors():
    """NumPy and the safetensors package, or the test is skipped."""
    require_numpy()
    try:
        import safetensors.numpy  # noqa: F401
    except ImportError:
        print("safetensors is not installed (tests/run.sh installs it in a venv): skipped")
        sys.exit(SKIP)


LQD = os.environ.get("LQD", "build/server/lqd")
ROOT = os.environ.get("LQ_REPO_ROOT", ".")
STORIES = os.path.join(ROOT, "models/stories260K-hf/model.safetensors")
DATA = os.path.join(ROOT, "tests/data/tinystories_val_subset.txt")  # TinyStories lines
# The linear layers of a LLaMA block, as the model files name them; stories260K has N_LAYERS.
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
N_LAYERS = 5


def run_lqd(*args, check=True, env=None):
    """Runs lqd with args; env: variables added to this process's environment."""
    full_env = None if env is None else {**os.environ, **env}
    result = subprocess.run([LQD, *args], capture_output=True, text=True, timeout=600, env=full_env)
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
