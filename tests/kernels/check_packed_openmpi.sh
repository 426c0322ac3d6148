#!/bin/sh
# Proves here that the Open MPI runtime pack_for_gpu.sh packed into .devrun/ works without the
# system's: in a private mount namespace (nothing outside it changes) the system's Open MPI,
# PMIx, hwloc and libevent are hidden (empty folders and /dev/null bound over their folders,
# programs and libraries), .devrun/mpi-env.sh is sourced, and the packed mpirun runs
# tests/mpi/compare_ranks.py on the CPU: `mpirun -n 2 .devrun/lqd compress` must write the same
# model and cache as the plain command. Needs root (unshare -m) and a packed .devrun:
#   sh tests/kernels/pack_for_gpu.sh build && sh tests/kernels/check_packed_openmpi.sh [COMMAND...]
# A COMMAND (e.g. sh tests/kernels/gpu_check.sh mpi) runs there instead of compare_ranks.py.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if [ ! -f .devrun/mpi-env.sh ]; then
    echo "no .devrun/mpi-env.sh: run tests/kernels/pack_for_gpu.sh here first" >&2
    exit 1
fi
empty=$(mktemp -d)
trap 'rmdir "$empty"' EXIT
exec unshare --mount --propagation private sh -c '
set -eu
empty=$1
multiarch=/usr/lib/x86_64-linux-gnu
for dir in $multiarch/openmpi $multiarch/pmix2 $multiarch/hwloc /usr/share/openmpi /etc/openmpi; do
    [ -d "$dir" ] && mount --bind "$empty" "$dir"
done
hidden=0
for file in $(readlink -f /usr/bin/mpirun /usr/bin/orterun /usr/bin/orted) \
            $(find $multiarch -maxdepth 1 -type f \( -name "libmpi*.so*" -o -name "libopen-*.so*" \
              -o -name "libmca_common*.so*" -o -name "liboshmem*.so*" -o -name "libompitrace*" \
              -o -name "libpmix*.so*" -o -name "libhwloc*.so*" -o -name "libevent*.so*" \)); do
    [ -f "$file" ] && mount --bind /dev/null "$file" && hidden=$((hidden + 1))
done
echo "hidden: $hidden programs and libraries, the Open MPI / PMIx / hwloc folders"
if /usr/bin/mpirun --version >/dev/null 2>&1; then echo "the system mpirun still runs" >&2; exit 1; fi
echo "the system mpirun no longer runs: $(/usr/bin/mpirun --version 2>&1 | head -1)"
. .devrun/mpi-env.sh
flags="--allow-run-as-root --oversubscribe"
# the packed components and help texts are found: no load errors, no "Sorry! ... help" text
out=$(mpirun $flags -n 2 true 2>&1) || { echo "mpirun -n 2 true failed: $out" >&2; exit 1; }
[ -z "$out" ] || { echo "mpirun -n 2 true printed: $out" >&2; exit 1; }
out=$(mpirun $flags -n 1 /nonexistent-program 2>&1) && exit 1
case "$out" in
*"Sorry!"*|*"supposed to get help"*) echo "help texts not found: $out" >&2; exit 1 ;;
esac
echo "the packed mpirun runs 2 ranks and finds its help texts (\"$(echo "$out" | grep -m1 "unable")\")"
shift
[ $# -gt 0 ] || set -- env LQD=.devrun/lqd LQ_REPO_ROOT="$PWD" \
    python3 tests/mpi/compare_ranks.py --devices cpu --ranks 2
"$@"
' sh "$empty" "$@"
