// The pipelined one-token decode kernel (LQ_CUDA_DECODE=v2, kernels/cuda/linear_cuda.cu): the
// same fused dequantize + GEMV as lq_decode_kernel<BITS, BPC, 1, false> for b0 = 3 and 4, with
// the same arithmetic in the same order (every output has the same bits), laid out so that HBM
// latency overlaps the decoding. Included by linear_cuda.cu alone, after linear_cuda_kernels.cuh.
//
// What differs from lq_decode_kernel, and why:
//   - Each warp takes LQ_GEMV_ROWS (4) rows at a time and loads the NEXT group's packed words,
//     block scales and L1 values into a second register set before it decodes the current one
//     (double buffering): v1 loads one group of 8 rows and then decodes, so an SM's warps all
//     wait for memory at once and then all compute at once.
//   - The grid is one wave of CTAs (2 per SM; the host sizes it), each CTA walking `iters`
//     groups of its band, so every warp has a load in flight behind its decoding.
//   - A lane keeps its chunk's 32 x values in registers (the lane's chunk is the same in every
//     group): no shared-memory staging, no __syncthreads before the first decode, and the
//     shuffle lookup is the only shared-memory-pipe (MIO) instruction per code. v1's LDS.128 of
//     x costs 4 wavefronts per 4 codes x 8 rows, +12% over the lookups.
//   - t = x·L2ᵀ (this lane's first rank value) is read once, not once per group.
// The partials and the last-CTA sum of the slices are lq_decode_kernel's, except with
// LQ_CUDA_DECODE=v3 or v4 (CLUSTER; v4 only changes the grid, see lq_gemv_grid_for): the slices of
// a band (at most 8) then run as one thread-block cluster, each CTA keeps its per-row sums in its
// shared memory, and after a cluster barrier CTA s adds the slices' sums (in slice order, the same
// bits) for its 1/slices of the band's rows, read through distributed shared memory: no partials in
// global memory, no fence, no ticket, no second pass by the last CTA.
#ifndef LQ_GEMV_CUDA_CUH
#define LQ_GEMV_CUDA_CUH

#include <cooperative_groups.h>

#include "kernels/cuda/linear_cuda_kernels.cuh"

#define LQ_GEMV_ROWS 4 // rows per warp and group: 2 sets of 4·(b0 + BPC + 1) registers
#define LQ_GEMV_GROUP_ROWS (LQ_DECODE_WARPS * LQ_GEMV_ROWS)
#define LQ_GEMV_CTAS_PER_SM 2      // the __launch_bounds__ below: <= 128 registers
#define LQ_GEMV_MAX_CLUSTER 8      // slices per band for v3 (the portable cluster size)
#define LQ_GEMV_MAX_BAND_ROWS 8192 // v3: a band's sums in <= 32 KiB of shared memory

// This lane's 32 x values (zeros for a lane past the last chunk). x is 16-byte aligned (the
// host only takes the fast path then) and a chunk is 128 bytes.
__device__ __forceinline__ void lq_gemv_load_x(const float *x, int chunk, bool active,
                                               float (&xr)[32]) {
    const float4 *p = (const float4 *)(x + (size_t)chunk * 32);
#pragma unroll
    for (int q = 0; q < 8; q++) {
        const float4 v = active ? __ldg(p + q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        xr[4 * q] = v.x, xr[4 * q + 1] = v.y, xr[4 * q + 2] = v.z, xr[4 * q + 3] = v.w;
    }
}

// One group's chunk: per row the block sums of table[code]·x, each scaled into acc (the order
// of lq_decode_direct with NT = 1).
template <int BITS, int BPC, int R>
__device__ __forceinline__ void lq_gemv_decode(const uint32_t (&w)[R][BITS],
                                               const float (&scale)[R][BPC], const float (&xr)[32],
                                               float lane_value, float (&acc)[R]) {
    constexpr int CODES_PER_BLOCK = 32 / BPC;
    float block_sum[R];
#pragma unroll
    for (int r = 0; r < R; r++) block_sum[r] = 0.0f, acc[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; i++) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float v = lq_lookup<BITS>(lq_code_bits<BITS>(w[r], i), lane_value, nullptr);
            block_sum[r] = fmaf(v, xr[i], block_sum[r]);
            if ((i + 1) % CODES_PER_BLOCK == 0) {
                acc[r] = fmaf(block_sum[r], scale[r][i / CODES_PER_BLOCK], acc[r]);
                block_sum[r] = 0.0f;
            }
        }
    }
}

// acc += L1[rows, share]·t[share] in lq_add_lowrank's order; t_first is t[share.begin + lane]
// (0 past the share), read once per kernel.
template <int R>
__device__ __forceinline__ void lq_gemv_lowrank(const lq_decode_args &a, const lq_rank_share &share,
                                                int row0, int lane, float t_first,
                                                const float (&l1_first)[R], float (&acc)[R]) {
    const int k0 = share.begin + lane;
    if (k0 < share.end) {
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = fmaf(l1_first[r], t_first, acc[r]);
    }
    for (int k = k0 + 32; k < share.end; k += 32) { // shares of more than 32 (few slices)
        const float tk = __ldcg(a.t + k);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float l1 =
                row0 + r < a.q.rows ? __ldg(a.lora_B + (size_t)(row0 + r) * a.rank + k) : 0.0f;
            acc[r] = fmaf(l1, tk, acc[r]);
        }
    }
}

// Reduces a group's R sums across the warp and writes one partial per row: to the partials in
// global memory, or (band_sums != NULL, v3) to this CTA's shared sums of its band.
template <int R>
__device__ __forceinline__ void lq_gemv_store(const lq_decode_args &a, int row0, int band0,
                                              int lane, const float (&acc)[R], float *band_sums) {
    float v[R];
#pragma unroll
    for (int r = 0; r < R; r++) v[r] = acc[r];
    const float total = lq_reduce_scatter<R>(v, lane);
    const int row = row0 + lane / (32 / R);
    if (lane % (32 / R) != 0 || row >= a.q.rows) return;
    if (band_sums)
        band_sums[row - band0] = total;
    else
        a.partials[(size_t)blockIdx.y * a.q.rows + row] = total;
}

// Decodes, adds the low-rank term and stores one group (row0 .. row0 + R − 1).
template <int BITS, int BPC, int R>
__device__ __forceinline__ void
lq_gemv_group(const lq_decode_args &a, const lq_rank_share &share, int row0, int band0, int lane,
              const uint32_t (&w)[R][BITS], const float (&scale)[R][BPC], const float (&l1)[R],
              const float (&xr)[32], float lane_value, float &t_first, bool &t_ready,
              float *band_sums) {
    float acc[R];
    lq_gemv_decode<BITS, BPC, R>(w, scale, xr, lane_value, acc);
    if (a.rank > 0) {
        if (!t_ready) { // t is the projection kernel's output: wait for it once
            lq_pdl_wait();
            t_first = share.begin + lane < share.end ? __ldcg(a.t + share.begin + lane) : 0.0f;
            t_ready = true;
        }
        lq_gemv_lowrank<R>(a, share, row0, lane, t_first, l1, acc);
    }
    lq_gemv_store<R>(a, row0, band0, lane, acc, band_sums);
}

// v3's epilogue: after every slice's sums are in its shared memory, CTA s of the cluster writes
// y for rows s, s + slices·256, ... of the band, the slices added in slice order as
// lq_finish_band does (cluster rank s is slice s: the cluster spans gridDim.y).
__device__ __forceinline__ void lq_gemv_cluster_finish(const lq_decode_args &a, int band0,
                                                       int band_rows, float *band_sums) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync(); // release / acquire: the other CTAs' sums are visible
    const int slices = (int)gridDim.y, rank = (int)cluster.block_rank();
    for (int i = rank * LQ_DECODE_THREADS + (int)threadIdx.x; i < band_rows;
         i += slices * LQ_DECODE_THREADS) {
        const int row = band0 + i;
        if (row >= a.q.rows) break; // i only grows
        float sum = 0.0f;
        for (int s = 0; s < slices; s++) sum += cluster.map_shared_rank(band_sums, s)[i];
        a.y[row] = sum;
    }
    cluster.sync(); // no CTA leaves while another still reads its shared memory
}

// CLUSTER: launched in clusters of (1, gridDim.y, 1) with band_rows floats of dynamic shared
// memory (v3, v4); else the partials and tickets of lq_decode_kernel (v2).
template <int BITS, int BPC, bool CLUSTER>
__device__ __forceinline__ void lq_gemv(const lq_decode_args &a) {
    static_assert(BITS == 3 || BITS == 4, "shuffle lookups, one token");
    static_assert(BPC == 1 || BPC == 2, "4 block scales per chunk would spill");
    constexpr int R = LQ_GEMV_ROWS;
    __shared__ int last;
    extern __shared__ float dynamic_shared[];
    float *const band_sums = CLUSTER ? dynamic_shared : nullptr;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunk = blockIdx.y * LQ_SLICE_CHUNKS + lane;
    const bool active = chunk < a.chunks_per_row;
    const int band_rows = LQ_GEMV_GROUP_ROWS * a.iters;
    const int band0 = blockIdx.x * band_rows;
    const lq_rank_share share = lq_rank_share_of(a);
    // group g of this warp: rows band0 + g·LQ_GEMV_GROUP_ROWS + warp·R ..
    const int warp_row0 = band0 + warp * R;

    uint32_t w0[R][BITS], w1[R][BITS];
    float scale0[R][BPC], scale1[R][BPC], l1_0[R], l1_1[R];
    lq_load_rows<BITS, BPC, R>(a, warp_row0, chunk, active, lane, w0, scale0, l1_0);
    if (a.iters > 1)
        lq_load_rows<BITS, BPC, R>(a, warp_row0 + LQ_GEMV_GROUP_ROWS, chunk, active, lane, w1,
                                   scale1, l1_1);
    lq_prefetch_issue(a.prefetch);
    float xr[32];
    lq_gemv_load_x(a.x, chunk, active, xr);
    const float lane_value = __ldg(a.q.table + (lane & ((1 << BITS) - 1)));
    float t_first = 0.0f;
    bool t_ready = false;

    // Groups in pairs so that both register sets have static indices: while one set is
    // decoded, the loads of the other are in flight.
    for (int g = 0; g < a.iters; g += 2) {
        lq_gemv_group<BITS, BPC, R>(a, share, warp_row0 + g * LQ_GEMV_GROUP_ROWS, band0, lane, w0,
                                    scale0, l1_0, xr, lane_value, t_first, t_ready, band_sums);
        if (g + 1 >= a.iters) break;
        if (g + 2 < a.iters)
            lq_load_rows<BITS, BPC, R>(a, warp_row0 + (g + 2) * LQ_GEMV_GROUP_ROWS, chunk, active,
                                       lane, w0, scale0, l1_0);
        lq_gemv_group<BITS, BPC, R>(a, share, warp_row0 + (g + 1) * LQ_GEMV_GROUP_ROWS, band0, lane,
                                    w1, scale1, l1_1, xr, lane_value, t_first, t_ready, band_sums);
        if (g + 3 < a.iters)
            lq_load_rows<BITS, BPC, R>(a, warp_row0 + (g + 3) * LQ_GEMV_GROUP_ROWS, chunk, active,
                                       lane, w1, scale1, l1_1);
    }

    if constexpr (CLUSTER) {
        lq_gemv_cluster_finish(a, band0, band_rows, band_sums);
        return;
    }
    // The band's last CTA to finish adds the slices (as lq_decode_kernel does).
    if (!lq_last_of_band(a, &last)) return;
    lq_finish_band<1>(a, band0, band_rows);
    if (threadIdx.x == 0) a.tickets[blockIdx.x] = 0;
}

template <int BITS, int BPC, bool CLUSTER>
__global__ void __launch_bounds__(LQ_DECODE_THREADS, LQ_GEMV_CTAS_PER_SM)
    lq_gemv_kernel(const __grid_constant__ lq_decode_args a) {
    lq_pdl_trigger(); // the next kernel waits for this one before it reads (pdl_cuda.cuh)
    lq_gemv<BITS, BPC, CLUSTER>(a);
}

#endif
