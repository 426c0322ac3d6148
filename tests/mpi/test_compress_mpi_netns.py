"""`lqd compress` over 4 MPI ranks on two "hosts": two network namespaces this test makes, joined
by a veth pair with private addresses (10.213.0.1/24 and 10.213.0.2/24). mpirun runs in the
first namespace with a hostfile naming both addresses (slots=2 each), so ranks 0 and 1 start
there; Open MPI's remote-launch agent (plm_rsh_agent) is a script that runs the remote daemon
with `ip netns exec` in the second namespace, where ranks 2 and 3 start; TCP only, on the veth
addresses (btl self,tcp; btl_tcp_if_include and oob_tcp_if_include). The model written must
equal the single-process one byte for byte. Traffic stays inside the namespaces, which are
removed at the end whatever happens. Skipped (with the reason) when the build has no MPI,
mpirun or ip is missing, or namespaces cannot be made (not root, no CAP_SYS_ADMIN, a CI
sandbox)."""
import os
import shutil
import subprocess
import tempfile

from mpi_util import (Checks, cache_file, compress_args, report, require_mpi, run, same_tree, skip)

mpirun = require_mpi()
if shutil.which("ip") is None:
    skip("the ip command (iproute2) is missing")
if os.geteuid() != 0:
    skip("network namespaces need root")

suffix = str(os.getpid())
NS = [f"lqdmpi{suffix}a", f"lqdmpi{suffix}b"]
VETH = [f"lqa{suffix}", f"lqb{suffix}"]
ADDRESSES = ["10.213.0.1", "10.213.0.2"]
made = []


def ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def remove_namespaces():
    for name in reversed(made):  # the veth pair goes with them
        ip("netns", "del", name)


def setup_namespaces():
    """Makes both namespaces and the link; returns why not, or None."""
    for name in NS:
        result = ip("netns", "add", name)
        if result.returncode != 0:
            return f"ip netns add failed: {result.stderr.strip()}"
        made.append(name)
    steps = [["link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1]]]
    for i in range(2):
        steps += [["link", "set", VETH[i], "netns", NS[i]],
                  ["-n", NS[i], "addr", "add", ADDRESSES[i] + "/24", "dev", VETH[i]],
                  ["-n", NS[i], "link", "set", VETH[i], "up"],
                  ["-n", NS[i], "link", "set", "lo", "up"]]
    for step in steps:
        result = ip(*step)
        if result.returncode != 0:
            return f"ip {' '.join(step)} failed: {result.stderr.strip()}"
    return None


checks = Checks()
try:
    why = setup_namespaces()
    if why:
        remove_namespaces()
        made.clear()
        skip(why)
    with tempfile.TemporaryDirectory() as tmp:
        def path(name):
            return os.path.join(tmp, name)

        # Open MPI calls the agent as "AGENT [options] HOST COMMAND...", as it would ssh.
        agent = path("netns-agent.sh")
        with open(agent, "w") as f:
            f.write("#!/bin/sh\n"
                    "while [ $# -gt 0 ]; do case \"$1\" in -*) shift;; *) break;; esac; done\n"
                    "host=$1; shift\n"
                    f"case \"$host\" in {ADDRESSES[1]}) ns={NS[1]};; *) ns={NS[0]};; esac\n"
                    f"echo \"$host $ns\" >> {path('agent.log')}\n"
                    "exec ip netns exec \"$ns\" /bin/sh -c \"$*\"\n")
        os.chmod(agent, 0o755)
        hostfile = path("hostfile")
        with open(hostfile, "w") as f:
            f.write(f"{ADDRESSES[0]} slots=2\n{ADDRESSES[1]} slots=2\n")

        single = run(compress_args(path("single"), path("cache-single")))
        checks.check(single.returncode == 0, f"single-process compress: {single.stderr[-500:]}")

        args = ["ip", "netns", "exec", NS[0], mpirun, "--allow-run-as-root", "-n", "4",
                "--hostfile", hostfile, "--mca", "plm_rsh_agent", agent,
                "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "10.213.0.0/24",
                "--mca", "oob_tcp_if_include", "10.213.0.0/24"]
        result = run(args + compress_args(path("netns"), path("cache-netns"), "--threads", "1"),
                     timeout=240)
        checks.check(result.returncode == 0,
                     f"4 ranks over two namespaces: exit 0 ({result.stderr[-1500:]!r})")
        if result.returncode == 0:
            same, why = same_tree(path("single"), path("netns"))
            checks.check(same, f"the model equals the single-process one ({why})")
            a, b = cache_file(path("cache-single")), cache_file(path("cache-netns"))
            checks.check(a and b and open(a, "rb").read() == open(b, "rb").read(),
                         "the error-table cache equals the single-process one")
            r = report(result)
            per_rank = r["rank_decompositions"] if r else []
            checks.check(r is not None and r["ranks"] == 4 and len(per_rank) == 4,
                         f"the report counts 4 ranks: {per_rank}")
            checks.check(len(per_rank) == 4 and per_rank[2] > 0 and per_rank[3] > 0,
                         f"ranks 2 and 3 (second namespace) decomposed: {per_rank}")
            log = open(path("agent.log")).read() if os.path.exists(path("agent.log")) else ""
            checks.check(f"{ADDRESSES[1]} {NS[1]}" in log,
                         f"the agent started the second host's daemon in {NS[1]}: {log!r}")
finally:
    remove_namespaces()
    left = ip("netns", "list").stdout
    checks.check(all(name not in left for name in NS), f"namespaces removed: {left!r}")

checks.finish()
