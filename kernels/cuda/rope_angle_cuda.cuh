// cos and sin of angle k of a position, written as the CPU writes them (the angle, pow and
// sincos in double) so that both round the same way. Shared by the rope kernels
// (ops_cuda.cu) and the one-token attention kernel, which does a step's rope itself
// (attention_decode_kernel.h): both must give the same bits.
#ifndef LQ_ROPE_ANGLE_CUDA_CUH
#define LQ_ROPE_ANGLE_CUDA_CUH

#include <math.h>

__device__ __forceinline__ static void lq_rope_angle(int position, int k, int head_dim, float theta,
                                                     float *c, float *s) {
    double angle = position * pow((double)theta, -2.0 * k / head_dim);
    double sine, cosine;
    sincos(angle, &sine, &cosine);
    *c = (float)cosine, *s = (float)sine;
}

#endif
