// v6's kernel instances (gemv_mma1_cuda.cuh) by their run-time description: the template
// arguments, the shared-memory limit each is allowed, and whether it runs here. linear_cuda.cu
// instantiates those without the projection in the kernel, gemv_mma1_project_cuda.cu those
// with it (PROJECT = 1): two translation units, compiled side by side.
#ifndef LQ_GEMV_MMA1_SELECT_CUDA_CUH
#define LQ_GEMV_MMA1_SELECT_CUDA_CUH

#include <cuda_runtime.h>

#include "kernels/cuda/gemv_mma1_cuda.cuh"

typedef void (*lq_m1_fn)(lq_m1_args);

// v6's dynamic shared memory: x in fp16 and the pair table up to this; with staged codes also
// the warps' rings (linear_cuda.cu's lq_mma1_pick keeps CTAS of them within an SM); the
// projection's pieces (lq_m1_t_area_bytes) within the same limits.
#define LQ_M1_MAX_SHARED (100 * 1024)
#define LQ_M1_MAX_SHARED_STAGED (200 * 1024)

// The instance, or NULL where it cannot run here (before sm_80, or its shared-memory limit could
// not be raised). Under the op lock (the first call of each instance sets its attribute).
template <int BITS, int BPC, int SHARE, int CTAS, int STAGE, int PROJECT>
static lq_m1_fn lq_mma1_kernel(void) {
    static int state = -1; // 1 when it runs here
    lq_m1_fn kernel = lq_gemv_mma1_kernel<BITS, BPC, SHARE, CTAS, STAGE, PROJECT>;
    if (state < 0) {
        cudaFuncAttributes attributes;
        state =
            cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
            attributes.binaryVersion >= 80 &&
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 STAGE ? LQ_M1_MAX_SHARED_STAGED : LQ_M1_MAX_SHARED) == cudaSuccess;
        // its CTAs wait for each other: an SM's shared memory all for them, so that as many
        // fit as the host counted on (linear_cuda.cu, lq_mma1_shape_for)
        if (PROJECT && state)
            state = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         cudaSharedmemCarveoutMaxShared) == cudaSuccess;
        cudaGetLastError();
    }
    return state ? kernel : NULL;
}

template <int BITS, int CTAS, int STAGE, int PROJECT>
static lq_m1_fn lq_mma1_kernel_for(int bpc, bool share) {
    return bpc == 2 ? lq_mma1_kernel<BITS, 2, 0, CTAS, STAGE, PROJECT>()
           : share  ? lq_mma1_kernel<BITS, 1, 1, CTAS, STAGE, PROJECT>()
                    : lq_mma1_kernel<BITS, 1, 0, CTAS, STAGE, PROJECT>();
}

// b0 = 2, 3, 4; 1 or 2 blocks per chunk; 2, 3 or 4 CTAs per SM (no staged instance at 4: their
// 64 registers already spill, nor one with the projection); staged or not.
template <int PROJECT, int BITS>
static lq_m1_fn lq_mma1_kernel_for(int bpc, bool share, int ctas, bool stage) {
    if (stage)
        return ctas == 2   ? lq_mma1_kernel_for<BITS, 2, 1, PROJECT>(bpc, share)
               : ctas == 3 ? lq_mma1_kernel_for<BITS, 3, 1, PROJECT>(bpc, share)
                           : NULL;
    if constexpr (PROJECT)
        return ctas == 2   ? lq_mma1_kernel_for<BITS, 2, 0, PROJECT>(bpc, share)
               : ctas == 3 ? lq_mma1_kernel_for<BITS, 3, 0, PROJECT>(bpc, share)
                           : NULL;
    else
        return ctas == 4   ? lq_mma1_kernel_for<BITS, 4, 0, PROJECT>(bpc, share)
               : ctas == 2 ? lq_mma1_kernel_for<BITS, 2, 0, PROJECT>(bpc, share)
                           : lq_mma1_kernel_for<BITS, 3, 0, PROJECT>(bpc, share);
}

template <int PROJECT>
static lq_m1_fn lq_mma1_select(int bits, int bpc, bool share, int ctas, bool stage) {
    return bits == 2   ? lq_mma1_kernel_for<PROJECT, 2>(bpc, share, ctas, stage)
           : bits == 3 ? lq_mma1_kernel_for<PROJECT, 3>(bpc, share, ctas, stage)
           : bits == 4 ? lq_mma1_kernel_for<PROJECT, 4>(bpc, share, ctas, stage)
                       : NULL;
}

// The instance with the projection in the kernel (gemv_mma1_project_cuda.cu), or NULL.
lq_m1_fn lq_mma1_projecting_kernel(int bits, int bpc, bool share, int ctas, bool stage);

#endif
