// v6's instances with the projection t = x·L2ᵀ in the kernel (gemv_mma1_kernel.h, PROJECT = 1;
// LQ_CUDA_MMA1_INLINE_T=1), in a translation unit of their own: linear_cuda.cu compiles the
// others, and the two build side by side.
#include "kernels/cuda/gemv_mma1_select_cuda.cuh"

lq_m1_fn lq_mma1_projecting_kernel(int bits, int bpc, bool share, int ctas, bool stage) {
    return lq_mma1_select<1>(bits, bpc, share, ctas, stage);
}
