#!/bin/sh
# Packs a relocatable copy of this machine's Open MPI runtime (Debian 12's 4.1 with its external
# PMIx) into OUT (pack_for_gpu.sh's .devrun/), for a GPU machine without Open MPI:
#   OUT/mpi/bin         mpirun (= orterun), orterun, orted
#   OUT/mpi/lib/openmpi3  the MCA components; OUT/mpi/lib/pmix: PMIx's own components
#   OUT/mpi/share/openmpi, OUT/mpi/share/pmix  help texts; OUT/mpi/etc  the MCA parameter file
#   OUT/lib             the shared libraries all of these load (beside lqd's; not libc's, CUDA's)
#   OUT/mpi-env.sh      sourced there: points Open MPI and PMIx at these folders
# Exits 0 with a note, packing nothing, when Open MPI is not installed here.
set -eu
out=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
multiarch=/usr/lib/x86_64-linux-gnu
components=$multiarch/openmpi/lib/openmpi3
pmix_components=$multiarch/pmix2/lib/pmix
orterun=$(command -v orterun || true)
orted=$(command -v orted || true)
if [ -z "$orterun" ] || [ -z "$orted" ] || [ ! -d "$components" ] \
   || [ ! -d /usr/share/openmpi ]; then
    echo "pack_openmpi: Open MPI (orterun, orted, $components) is not installed here: not packed" \
         "(apt-get install openmpi-bin libopenmpi-dev); the gpu_check.sh mpi case will fail" >&2
    exit 0
fi
mkdir -p "$out/lib" "$out/mpi/bin" "$out/mpi/lib/openmpi3" "$out/mpi/lib/pmix" "$out/mpi/share" \
         "$out/mpi/etc"
cp "$orterun" "$orted" "$out/mpi/bin/"
ln -sf orterun "$out/mpi/bin/mpirun"
cp "$components"/*.so "$out/mpi/lib/openmpi3/"
[ -d "$pmix_components" ] && cp "$pmix_components"/*.so "$out/mpi/lib/pmix/"
cp -r /usr/share/openmpi "$out/mpi/share/openmpi"
[ -d "$multiarch/pmix2/share/pmix" ] && cp -r "$multiarch/pmix2/share/pmix" "$out/mpi/share/pmix"
# Debian's parameter file (it turns off the network transports a single host does not need)
cp /etc/openmpi/openmpi-mca-params.conf /etc/openmpi/openmpi-default-hostfile "$out/mpi/etc/"
# every library the programs and components load, followed through ldd (transitive)
for file in "$out"/mpi/bin/orterun "$out"/mpi/bin/orted "$out"/mpi/lib/openmpi3/*.so \
            "$out"/mpi/lib/pmix/*.so; do
    ldd "$file" | awk '$3 ~ /^\// {print $3}'
done | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libcuda*|libnvidia*) ;;
    *) [ -e "$out/lib/$(basename "$lib")" ] || cp -L "$lib" "$out/lib/" ;;
    esac
done
strip --strip-unneeded "$out"/mpi/bin/orterun "$out"/mpi/bin/orted "$out"/mpi/lib/*/*.so
cp "$root/tests/kernels/mpi-env.sh" "$out/mpi-env.sh"
echo "pack_openmpi: Open MPI $(orterun --version 2>/dev/null | head -1 | awk '{print $NF}'):" \
     "$(find "$out/mpi/lib/openmpi3" -name "*.so" | wc -l) components packed"
