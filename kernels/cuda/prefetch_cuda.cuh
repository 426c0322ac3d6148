// The device side of struct lq_prefetch (cuda_internal.h): every thread of the grid takes
// pieces of the regions and hands each to the bulk-copy engine as one L2 prefetch
// (cp.async.bulk.prefetch, sm_90), which proceeds on its own while the kernel computes and
// after it has ended. A hint only: nothing waits for it and nothing depends on it.
#ifndef LQ_PREFETCH_CUDA_CUH
#define LQ_PREFETCH_CUDA_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_internal.h"

#define LQ_PREFETCH_PIECE 16384u // bytes per prefetch instruction

__device__ __forceinline__ void lq_prefetch_issue(const struct lq_prefetch &p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (p.count == 0) return;
    const uint32_t total = p.end_piece[p.count - 1];
    const uint32_t threads = blockDim.x * blockDim.y * blockDim.z;
    const uint32_t cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const uint32_t stride = gridDim.x * gridDim.y * gridDim.z * threads;
    for (uint32_t piece = cta * threads + threadIdx.x; piece < total; piece += stride) {
        int r = 0;
        while (r + 1 < p.count && piece >= p.end_piece[r]) r++;
        const uint32_t first = r ? p.end_piece[r - 1] : 0u;
        const uint32_t offset = (piece - first) * LQ_PREFETCH_PIECE;
        const uint32_t left = p.bytes[r] - offset;
        const uint32_t size = left < LQ_PREFETCH_PIECE ? left : LQ_PREFETCH_PIECE;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p.base[r] + offset),
                     "r"(size)
                     : "memory");
    }
#else
    (void)p;
#endif
}

#endif
