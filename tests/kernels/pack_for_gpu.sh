#!/bin/sh
# Packs what a GPU machine without lqd's Debian libraries needs to run the GPU checks: the
# binaries of BUILD (default build/, configured with CUDA) and the CUDA module lqd loads (next to
# lqd, where it looks first), the shared libraries they load
# (except libc's and CUDA's own, which the GPU machine has), and the perplexity text, into
# .devrun/ (git-ignored); where Open MPI is installed, also a relocatable Open MPI runtime
# (pack_openmpi.sh; .devrun/mpi-env.sh points it there) for the mpi case. Then on the GPU
# machine: sh tests/kernels/gpu_check.sh [case]
set -eu
build=${1:-build}
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/.devrun"
binaries="server/lqd kernels/liblqd_cuda.so tests/test_cuda_ops tests/test_cuda_train_ops
          tests/test_cuda_attention_backward tests/test_cuda_graph tests/test_cuda_sample
          tests/test_cuda_eig tests/bench_cuda tests/bench_stream_ceiling"
rm -rf "$out" && mkdir -p "$out/lib"
packed=lib
for binary in $binaries; do
    cp "$root/$build/$binary" "$out/"
    packed="$packed $(basename "$binary")"
    ldd "$root/$build/$binary" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
        case "$(basename "$lib")" in
        libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libcuda*|libcublas*|libcusolver*|libcudart*|libcusparse*|libnvJitLink*) ;;
        *) cp -L "$lib" "$out/lib/" ;;
        esac
    done
done
cp "$root/../shared/data/tinystories_val_subset.txt" "$out/"
sh "$root/tests/kernels/pack_openmpi.sh" "$out"
[ -d "$out/mpi" ] && packed="$packed mpi"
# The device tool carries at most 64 MiB: OpenBLAS alone is 36 MiB unpacked, and the CUDA
# binaries (28 MiB, their fat binaries much alike) take 1.4 MiB in xz. So everything but the
# text and mpi-env.sh goes into lib.tar.xz, which gpu_check.sh (and mpi-env.sh) unpack.
strip --strip-unneeded "$out"/lib/* 2>/dev/null || true
# shellcheck disable=SC2086 # a list of names
tar -C "$out" -cJf "$out/lib.tar.xz" $packed && (cd "$out" && rm -rf $packed)
du -sh "$out"
