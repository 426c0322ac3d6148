// silu(gate)·up for one value, the CPU's expression: shared by the swiglu op (ops_cuda.cu) and
// the one-token decode kernel that takes SwiGLU into its last write (gemv_mma1_cuda.cuh), so
// that both give the same bits.
#ifndef LQ_SILU_CUDA_CUH
#define LQ_SILU_CUDA_CUH

__device__ __forceinline__ static float lq_silu_times(float gate, float up) {
    return gate / (1.0f + expf(-gate)) * up; // IEEE division
}

#endif
