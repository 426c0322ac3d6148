// The one-token tensor-core decode kernel (LQ_CUDA_DECODE=v6) on the GPU: the primitives that
// gemv_mma1_kernel.h (the kernel's code and the why) asks of its includer, and the kernel for
// compile-time b0 and blocks per chunk. Included by linear_cuda.cu, and by linear_mma_cuda.cuh
// for lq_m1_mma and lq_m1_pair_offset.
#ifndef LQ_GEMV_MMA1_CUDA_CUH
#define LQ_GEMV_MMA1_CUDA_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cuda/pdl_cuda.cuh"
#include "kernels/cuda/silu_cuda.cuh"

#define LQ_M1_FN __device__ __forceinline__ static
#define LQ_M1_HD __host__ __device__ __forceinline__ static
#define LQ_M1_UNROLL _Pragma("unroll")

// Volatile: the front end keeps each load where the kernel puts it, a tile ahead of its use
// (ptxas still schedules them: with two tiles a pass it sank half of them to their use whether
// they were volatile or not, and the loop now takes one tile a pass; this is what ran on the
// H100).
__device__ __forceinline__ static uint32_t lq_m1_ldg_u32(const uint32_t *p) {
    uint32_t v;
    asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ static float lq_m1_ldg_f32(const float *p) {
    float v;
    asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
// t is written by the projection kernel that runs beside this one: L2 only, never a stale L1.
__device__ __forceinline__ static float lq_m1_ldcg_f32(const float *p) {
    return __ldcg(p);
}
__device__ __forceinline__ static void lq_m1_ldg_f32x4(const float *p, float v[4]) {
    const float4 q = __ldg((const float4 *)p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
__device__ __forceinline__ static void lq_m1_lds_u32x8(uint32_t address, uint32_t v[8]) {
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%8];\n\t"
                 "ld.shared.v4.u32 {%4, %5, %6, %7}, [%8+16];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]), "=r"(v[4]), "=r"(v[5]),
                   "=r"(v[6]), "=r"(v[7])
                 : "r"(address)
                 : "memory");
}
// The kernel's dynamic shared memory (gemv_mma1_kernel.h: its layout).
extern __shared__ uint4 lq_m1_shared[];
__device__ __forceinline__ static uint32_t lq_m1_window(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
// A lookup by its window address (lq_m1_pair_offset: the pair's bits OR the lane's address).
// Volatile with a memory clobber: the compiler must not move it above the barrier after the
// table is staged.
__device__ __forceinline__ static uint32_t lq_m1_lds_pair(uint32_t address) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address) : "memory");
    return v;
}
__device__ __forceinline__ static void lq_m1_copy16_window(uint32_t address,
                                                           const uint32_t *global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address), "l"(global)
                 : "memory");
}
__device__ __forceinline__ static void lq_m1_sts_u32x4(uint32_t *shared, uint32_t v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(lq_m1_window(shared)), "r"(v)
                 : "memory");
}
// Thread-block clusters (sm_90; the host launches clusters only there).
__device__ __forceinline__ static int lq_m1_cluster_rank(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return (int)rank;
#else
    return 0;
#endif
}
__device__ __forceinline__ static void lq_m1_cluster_sync(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\t"
                 "barrier.cluster.wait.acquire.aligned;" ::
                     : "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ static void lq_m1_st_cluster_u32x2(uint32_t address, int rank,
                                                              uint32_t lo, uint32_t hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
    asm volatile("st.shared::cluster.v2.u32 [%0], {%1, %2};" ::"r"(remote), "r"(lo), "r"(hi)
                 : "memory");
#else
    (void)address, (void)rank, (void)lo, (void)hi;
    __trap();
#endif
}
__device__ __forceinline__ static double lq_m1_ld_cluster_f64(uint32_t address, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t remote;
    double v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
    asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(remote) : "memory");
    return v;
#else
    (void)address, (void)rank;
    __trap();
    return 0.0;
#endif
}
__device__ __forceinline__ static void lq_m1_copy_commit(void) {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
// n: a constant after inlining (wait_group takes an immediate)
__device__ __forceinline__ static void lq_m1_copy_wait_groups(int n) {
    if (n <= 0)
        asm volatile("cp.async.wait_group 0;" ::: "memory");
    else if (n == 1)
        asm volatile("cp.async.wait_group 1;" ::: "memory");
    else if (n == 2)
        asm volatile("cp.async.wait_group 2;" ::: "memory");
    else if (n == 3)
        asm volatile("cp.async.wait_group 3;" ::: "memory");
    else
        asm volatile("cp.async.wait_group 4;" ::: "memory");
}
// The projection in the kernel (gemv_mma1_kernel.h): the pieces' counter of the layer.
__device__ __forceinline__ static uint32_t lq_m1_ld_acquire_u32(const uint32_t *p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ static uint32_t lq_m1_add_release_u32(uint32_t *p, uint32_t v) {
    uint32_t old;
    asm volatile("atom.release.gpu.global.add.u32 %0, [%1], %2;"
                 : "=r"(old)
                 : "l"(p), "r"(v)
                 : "memory");
    return old;
}
__device__ __forceinline__ static uint32_t lq_m1_add_acq_rel_u32(uint32_t *p, uint32_t v) {
    uint32_t old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;"
                 : "=r"(old)
                 : "l"(p), "r"(v)
                 : "memory");
    return old;
}
__device__ __forceinline__ static void lq_m1_st_relaxed_u32(uint32_t *p, uint32_t v) {
    asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ static void lq_m1_backoff(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    __nanosleep(128);
#endif
}
// A tile's words of one row from its slot (bits constant: one 64-bit, one 128-bit or three
// 32-bit loads; the slot's layout makes each conflict-free). Volatile with a memory clobber: it
// stays after the copy wait and the warp's barrier.
__device__ __forceinline__ static void lq_m1_lds_words(uint32_t address, int bits, uint32_t w[4]) {
    w[0] = w[1] = w[2] = w[3] = 0u;
    if (bits == 2)
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                     : "=r"(w[0]), "=r"(w[1])
                     : "r"(address)
                     : "memory");
    else if (bits == 4)
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                     : "r"(address)
                     : "memory");
    else
        asm volatile("ld.shared.u32 %0, [%3];\n\t"
                     "ld.shared.u32 %1, [%3+4];\n\t"
                     "ld.shared.u32 %2, [%3+8];"
                     : "=r"(w[0]), "=r"(w[1]), "=r"(w[2])
                     : "r"(address)
                     : "memory");
}
__device__ __forceinline__ static void lq_m1_misaligned(void) {
    __trap();
}
__device__ __forceinline__ static uint32_t lq_m1_funnel(uint32_t lo, uint32_t hi, uint32_t shift) {
    return __funnelshift_r(lo, hi, shift);
}
__host__ __device__ __forceinline__ static uint32_t lq_m1_half2_bits(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t out;
    memcpy(&out, &h, 4);
    return out;
}
__device__ __forceinline__ static float lq_m1_u2f(uint32_t v) {
    return __uint2float_rn(v);
}
__device__ __forceinline__ static float lq_m1_fmul(float x, float y) {
    return __fmul_rn(x, y);
}
__device__ __forceinline__ static float lq_m1_fadd(float x, float y) {
    return __fadd_rn(x, y);
}
__device__ __forceinline__ static float lq_m1_fma(float x, float y, float z) {
    return __fmaf_rn(x, y, z);
}
// d += A · B for one m16n8k16 tile, fp16 inputs, fp32 accumulators. Fragments (PTX ISA, "Matrix
// Fragments for mma.m16n8k16", g = lane / 4, c = lane % 4; a register's low half holds the
// element with the lower column / k index):
//   a[0] = A[g][2c, 2c+1]      a[1] = A[g+8][2c, 2c+1]
//   a[2] = A[g][2c+8, 2c+9]    a[3] = A[g+8][2c+8, 2c+9]
//   b0 = B[2c, 2c+1][g]        b1 = B[2c+8, 2c+9][g]
//   d = {D[g][2c], D[g][2c+1], D[g+8][2c], D[g+8][2c+1]}
__device__ __forceinline__ static void lq_m1_mma(float d[4], const uint32_t a[4], uint32_t b0,
                                                 uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    (void)d, (void)a, (void)b0, (void)b1;
    __trap(); // the host launches this kernel on sm_80 and later only
#endif
}
__device__ __forceinline__ static float lq_m1_shfl_xor(float v, int offset) {
    return __shfl_xor_sync(0xffffffffu, v, offset);
}
__device__ __forceinline__ static double lq_m1_shfl_xor_f64(double v, int offset) {
    return __shfl_xor_sync(0xffffffffu, v, offset);
}
__device__ __forceinline__ static float lq_m1_silu_times(float gate, float up) {
    return lq_silu_times(gate, up);
}
__device__ __forceinline__ static void lq_m1_sync(void) {
    __syncthreads();
}
__device__ __forceinline__ static void lq_m1_wait_prerequisite(void) {
    lq_pdl_wait();
}

// A scheduling boundary between a tile's loads of the next tile and its decode (the loop's
// instructions per code are 0.03-0.1 fewer with it: tests/kernels/check_sass_budget.py).
__device__ __forceinline__ static void lq_m1_tile_fence(void) {
    __syncwarp();
}

__device__ __forceinline__ static void lq_m1_prefetch_l2(const void *p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

#include "kernels/cuda/gemv_mma1_kernel.h"

static_assert(LQ_M1_RING <= 4, "lq_m1_copy_wait_groups waits with up to 4 groups pending");

// CTAS CTAs per SM: 2 (16 warps, up to 128 registers a thread: layers whose grid is no wider
// than 2 CTAs a SM anyway), 3 (24 warps, 80 registers: wider layers) or 4 (32 warps, 64
// registers, some loads late and a few bytes spilled: slower on the H100, kept for
// LQ_CUDA_MMA1_CTAS=4). linear_cuda.cu's lq_mma1_pick chooses.
// STAGE: the codes go through the warps' rings in shared memory (gemv_mma1_kernel.h).
// PROJECT: t = x·L2ᵀ is computed in the kernel (a.t_pieces > 0: gemv_mma1_kernel.h).
template <int BITS, int BPC, int SHARE, int CTAS, int STAGE, int PROJECT>
__global__ void __launch_bounds__(LQ_M1_THREADS, CTAS)
    lq_gemv_mma1_kernel(const __grid_constant__ lq_m1_args a) {
    lq_pdl_trigger(); // the next kernel waits for this one before it reads (pdl_cuda.cuh)
    static_assert(BITS >= 2 && BITS <= LQ_M1_MAX_BITS, "pair tables of 16 to 256 entries");
    static_assert(BPC == 1 || BPC == 2, "one block per chunk, or two (B0 = 16)");
    static_assert(!SHARE || BPC == 1, "shared scales need B0 % 64 == 0");
    lq_m1_body(&a, BITS, BPC, SHARE, STAGE, PROJECT, (int)blockIdx.x, (int)threadIdx.x,
               (uint32_t *)lq_m1_shared);
}

#endif
