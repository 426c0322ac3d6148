#!/bin/sh
# Packs what a GPU machine without lqd's Debian libraries needs to run the GPU checks: the
# binaries of BUILD (default build/, configured with CUDA) and the CUDA module lqd loads (next to
# lqd, where it looks first), the shared libraries they load
# (except libc's and CUDA's own, which the GPU machine has), and the perplexity text, into
# .devrun/ (git-ignored). Then on the GPU machine: sh tests/kernels/gpu_check.sh
set -eu
build=${1:-build}
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/.devrun"
rm -rf "$out" && mkdir -p "$out/lib"
for binary in server/lqd kernels/liblqd_cuda.so tests/test_cuda_ops tests/test_cuda_train_ops tests/test_cuda_attention_backward tests/test_cuda_graph tests/test_cuda_sample tests/bench_cuda; do
    cp "$root/$build/$binary" "$out/"
    ldd "$root/$build/$binary" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
        case "$(basename "$lib")" in
        libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libcuda*|libcublas*|libcusolver*|libcudart*|libcusparse*|libnvJitLink*) ;;
        *) cp -L "$lib" "$out/lib/" ;;
        esac
    done
done
cp "$root/../shared/data/tinystories_val_subset.txt" "$out/"
# the device tool carries at most 64 MiB: OpenBLAS alone is 36 MiB unpacked
strip --strip-unneeded "$out"/lib/* 2>/dev/null || true
tar -C "$out" -cJf "$out/lib.tar.xz" lib && rm -rf "$out/lib"
du -sh "$out"
