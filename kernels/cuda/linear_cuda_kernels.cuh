// The kernels of kernels/cuda/linear_cuda.cu (see the design notes there): fused dequantize +
// GEMV for decode, the low-rank projection, fp16 tile dequantization for prefill. Device code
// and the argument structs only; included by linear_cuda.cu alone.
#ifndef LQ_LINEAR_CUDA_KERNELS_CUH
#define LQ_LINEAR_CUDA_KERNELS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "core/nf.h"
}

#include "kernels/backend.h"
#include "kernels/cuda/divisor.h"
#include "kernels/cuda/pdl_cuda.cuh"
#include "kernels/cuda/prefetch_cuda.cuh"

#define LQ_DECODE_WARPS 8
#define LQ_DECODE_THREADS (LQ_DECODE_WARPS * 32)
#define LQ_SLICE_CHUNKS 32 // 32-value chunks per column slice: one per lane
#define LQ_SLICE_COLS (LQ_SLICE_CHUNKS * 32)

#define LQ_FULL_MASK 0xffffffffu

// The packed matrix as the kernels see it.
struct lq_packed {
    const uint32_t *codes, *scale_codes;
    const uint8_t *group_scales;
    const float *table;
    int rows, cols;
    int b0, b1, b2, B0, B1;
    float offset, levels, inv_levels; // levels = 2^b1 − 1, inv_levels = RN(1 / levels)
    lq_divisor chunk_block;           // 32-value chunk → block when B0 % 32 == 0 (B0 / 32)
    lq_divisor block;                 // value → block (B0)
    lq_divisor group;                 // block → group (B1)
};

struct lq_decode_args {
    lq_packed q;
    const float *x;
    int n;
    float *y;
    const float *lora_B; // L1
    const float *t;      // x · L2ᵀ [n, rank] from lq_lowrank_project_kernel, or with
    int t_slices;        // t_slices > 0 (one token) its column slices' sums [t_slices][rank]
    int rank;
    float *partials; // [slices][NT][rows]
    unsigned *tickets;
    int chunks_per_row, iters;
    lq_prefetch prefetch; // the next layer's buffers, into L2 while this one runs
};

// ---------------------------------------------------------------------------------------------
// Decoding pieces shared by the kernels.

// ŝ = offset + code·gs / levels in core/nf.c's operation order. q·levels is an FMA-exact
// residual, and with inv_levels = RN(1/levels) one correction step gives RN(a / levels)
// (Markstein; checked against IEEE division for every mantissa and b1 = 1..8).
__device__ __forceinline__ float lq_block_scale(const lq_packed &q, uint32_t code,
                                                float group_scale) {
    const float product = __fmul_rn(__uint2float_rn(code), group_scale);
    float quotient = __fmul_rn(product, q.inv_levels);
    quotient = __fmaf_rn(__fmaf_rn(-quotient, q.levels, product), q.inv_levels, quotient);
    return __fadd_rn(q.offset, quotient);
}

__device__ __forceinline__ float lq_group_scale(const lq_packed &q, uint64_t group) {
    if (q.b2 == LQ_SCALE_FP32) return __ldg((const float *)q.group_scales + group);
    const unsigned short half = __ldg((const unsigned short *)q.group_scales + group);
    if (q.b2 == LQ_SCALE_BF16) return __uint_as_float((uint32_t)half << 16);
    return __half2float(__ushort_as_half(half));
}

// The 32 bits of a packed word stream starting at bit `bit` (two aligned loads; the padding
// keeps the second inside the buffer).
__device__ __forceinline__ uint32_t lq_bit_window(const uint32_t *words, uint64_t bit) {
    const uint32_t *p = words + (bit >> 5);
    return __funnelshift_r(__ldg(p), __ldg(p + 1), (uint32_t)bit);
}

// Code `index` of a byte-packed stream of `bits`-bit codes (lq_bitpack_get on the device).
__device__ __forceinline__ uint32_t lq_packed_get(const void *packed, uint64_t index, int bits) {
    const uint64_t bit = index * (uint64_t)bits;
    const uint8_t *p = (const uint8_t *)packed + (bit >> 3);
    const uint32_t window = (uint32_t)__ldg(p) | ((uint32_t)__ldg(p + 1) << 8);
    return (window >> (bit & 7)) & ((1u << bits) - 1u);
}

// The BPC block scales of 32-value chunk `chunk` (its blocks share one group: checked on the
// host). BPC = 1: B0 is a multiple of 32; 2, 4: B0 = 16, 8.
template <int BPC>
__device__ __forceinline__ void lq_chunk_scales(const lq_packed &q, uint32_t chunk,
                                                float (&scale)[BPC]) {
    const uint32_t block0 = BPC == 1 ? lq_div(chunk, q.chunk_block) : chunk * BPC;
    const float group_scale = lq_group_scale(q, lq_div(block0, q.group));
    const uint32_t window = lq_bit_window(q.scale_codes, (uint64_t)block0 * (uint32_t)q.b1);
    const uint32_t mask = (1u << q.b1) - 1u;
#pragma unroll
    for (int b = 0; b < BPC; b++) // BPC·b1 <= 32: every code is inside the window
        scale[b] = lq_block_scale(q, (window >> (b * q.b1)) & mask, group_scale);
}

// Code i of a chunk's 32·BITS bits, at the bottom of the result; bits above it belong to the
// next codes (the shuffle lookup ignores them, the shared-table lookup masks them).
template <int BITS>
__device__ __forceinline__ uint32_t lq_code_bits(const uint32_t (&w)[BITS], int i) {
    const int bit = i * BITS, word = bit >> 5, shift = bit & 31;
    if (shift + BITS <= 32) return w[word] >> shift;
    return __funnelshift_r(w[word], w[word + 1 < BITS ? word + 1 : BITS - 1], shift);
}

// table[code]: for BITS <= 4 lane k holds table[k mod 2^BITS] and shfl reads the source lane
// from the low 5 bits of `bits`; for BITS = 8 a shared table.
template <int BITS>
__device__ __forceinline__ float lq_lookup(uint32_t bits, float lane_value, const float *table) {
    if constexpr (BITS == 8) {
        (void)lane_value;
        return table[bits & 255u];
    } else {
        (void)table;
        return __shfl_sync(LQ_FULL_MASK, lane_value, (int)bits);
    }
}

template <int BITS>
__device__ __forceinline__ void lq_load_chunk(const uint32_t *codes, uint32_t chunk,
                                              uint32_t (&w)[BITS]) {
    const uint32_t *p = codes + (size_t)chunk * BITS; // 4·BITS-byte aligned
    if constexpr (BITS == 2) {
        const uint2 v = __ldg((const uint2 *)p);
        w[0] = v.x, w[1] = v.y;
    } else if constexpr (BITS == 4) {
        const uint4 v = __ldg((const uint4 *)p);
        w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (BITS == 8) {
        const uint4 v = __ldg((const uint4 *)p), u = __ldg((const uint4 *)p + 1);
        w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
        w[4] = u.x, w[5] = u.y, w[6] = u.z, w[7] = u.w;
    } else {
#pragma unroll
        for (int i = 0; i < BITS; i++) w[i] = __ldg(p + i);
    }
}

__device__ __forceinline__ float lq_component(const float4 &v, int e) {
    return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
}

// Sums V (a power of two, <= 32) values across the warp; lane L ends with the total of value
// L / (32 / V). Each step hands the half this lane does not keep to its partner, so V values
// cost V − 1 + (5 − log2 V) shuffles instead of 5·V.
template <int V> __device__ __forceinline__ float lq_reduce_scatter(float (&v)[V], int lane) {
#pragma unroll
    for (int step = 0; (1 << step) < V; step++) {
        const int count = V >> step, half = count / 2, offset = 16 >> step;
        const bool upper = (lane & offset) != 0;
#pragma unroll
        for (int j = 0; j < half; j++) {
            const float keep = upper ? v[j + half] : v[j];
            const float give = upper ? v[j] : v[j + half];
            v[j] = keep + __shfl_xor_sync(LQ_FULL_MASK, give, offset);
        }
    }
#pragma unroll
    for (int offset = 16 / V; offset > 0; offset >>= 1)
        v[0] += __shfl_xor_sync(LQ_FULL_MASK, v[0], offset);
    return v[0];
}

__device__ __forceinline__ float lq_warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(LQ_FULL_MASK, v, offset);
    return v;
}

// L1[row] · t[token] for tokens < n, summed across the warp (every lane gets the sums).
template <int NT>
__device__ __forceinline__ void lq_lowrank_dots(const lq_decode_args &a, int row, int lane,
                                                float (&dot)[NT]) {
#pragma unroll
    for (int t = 0; t < NT; t++) dot[t] = 0.0f;
    if (a.rank <= 0) return;
    const float *l1 = a.lora_B + (size_t)row * a.rank;
    for (int k = lane; k < a.rank; k += 32) {
        const float b = __ldg(l1 + k);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < a.n) dot[t] = fmaf(b, __ldcg(a.t + (size_t)t * a.rank + k), dot[t]);
    }
#pragma unroll
    for (int t = 0; t < NT; t++) dot[t] = lq_warp_sum(dot[t]);
}

template <int NT> __device__ __forceinline__ float lq_pick(const float (&v)[NT], int index) {
    float out = v[0];
#pragma unroll
    for (int t = 1; t < NT; t++) out = index == t ? v[t] : out;
    return out;
}

// ---------------------------------------------------------------------------------------------
// Decode, fast path.

__host__ __device__ constexpr int lq_decode_rows(int bits, int nt) {
    return nt == 1 ? (bits == 8 ? 4 : 8) : 4;
}

// x's slice for the CTA into shared memory, zero past cols and n. The lane owning chunk k reads
// its float4 q at k·8 + (q ^ (k & 7)): in a quarter warp the 8 lanes hit 8 different 16-byte
// bank groups, so the LDS.128 takes the minimum 4 wavefronts.
template <int NT>
__device__ __forceinline__ void lq_stage_x(const float *x, int n, int cols, int col0, float4 *xs) {
    for (int i = threadIdx.x; i < NT * 256; i += LQ_DECODE_THREADS) {
        const int t = i >> 8, g = i & 255, chunk = g >> 3, q = g & 7, c = col0 + g * 4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (t < n && c < cols) v = __ldg((const float4 *)(x + (size_t)t * cols + c));
        xs[t * 256 + chunk * 8 + (q ^ (chunk & 7))] = v;
    }
}

// Pair table of the slice (one token, b0 = 2): for pair j of chunk l (codes 2j, 2j+1, i.e. the
// nibble j of the chunk) and nibble value c, table[c & 3]·x[2j] + table[c >> 2]·x[2j+1] at float
// (j·16 + c)·32 + l. Lane l only ever touches bank l. Warp w builds pairs 2w and 2w + 1.
__device__ __forceinline__ void lq_build_pairs(const float4 *xs, const float *nf_table,
                                               float *pairs, int lane, int warp) {
    const float4 xv = xs[lane * 8 + (warp ^ (lane & 7))];
    float table[4];
#pragma unroll
    for (int k = 0; k < 4; k++) table[k] = __ldg(nf_table + k);
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int j = 2 * warp + h;
        const float x0 = h ? xv.z : xv.x, x1 = h ? xv.w : xv.y;
        float low[4];
#pragma unroll
        for (int k = 0; k < 4; k++) low[k] = __fmul_rn(table[k], x0);
#pragma unroll
        for (int c = 0; c < 16; c++)
            pairs[(j * 16 + c) * 32 + lane] = __fmaf_rn(table[c >> 2], x1, low[c & 3]);
    }
}

// One token, b0 = 2: 16 pair lookups per chunk and row, summed per block, then scaled.
template <int BPC, int R>
__device__ __forceinline__ void lq_decode_pairs(const uint32_t (&w)[R][2],
                                                const float (&scale)[R][BPC], const float *pairs,
                                                int lane, float (&acc)[R][1]) {
    constexpr int PAIRS_PER_BLOCK = 16 / BPC;
    const uint32_t lane_bytes = (uint32_t)lane * 4u;
    float block_sum[R];
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int shift = 4 * (j & 7);
#pragma unroll
        for (int r = 0; r < R; r++) {
            // nibble j moved to bits 7..10: byte offset c·128 + l·4 in pair j's 2 KiB
            const uint32_t word = w[r][j >> 3];
            const uint32_t moved = shift >= 7 ? word >> (shift - 7) : word << (7 - shift);
            const uint32_t offset = (moved & 0x780u) | lane_bytes;
            const float v = *(const float *)((const char *)pairs + j * 2048 + offset);
            block_sum[r] = j % PAIRS_PER_BLOCK == 0 ? v : block_sum[r] + v;
            if ((j + 1) % PAIRS_PER_BLOCK == 0)
                acc[r][0] = fmaf(block_sum[r], scale[r][j / PAIRS_PER_BLOCK], acc[r][0]);
        }
    }
}

// Table lookups: one token sums per block and scales the sum; more tokens scale each value.
template <int BITS, int BPC, int NT, int R>
__device__ __forceinline__ void
lq_decode_direct(const uint32_t (&w)[R][BITS], const float (&scale)[R][BPC], const float4 *xs,
                 int lane, float lane_value, const float *lut, float (&acc)[R][NT]) {
    constexpr int CODES_PER_BLOCK = 32 / BPC;
    const int x_base = lane * 8, swizzle = lane & 7;
    float block_sum[R];
#pragma unroll
    for (int r = 0; r < R; r++) block_sum[r] = 0.0f;
#pragma unroll
    for (int q = 0; q < 8; q++) {
        float4 xv[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) xv[t] = xs[t * 256 + x_base + (q ^ swizzle)];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = 4 * q + e;
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float v = lq_lookup<BITS>(lq_code_bits<BITS>(w[r], i), lane_value, lut);
                if constexpr (NT == 1) {
                    block_sum[r] = fmaf(v, lq_component(xv[0], e), block_sum[r]);
                    if ((i + 1) % CODES_PER_BLOCK == 0) {
                        acc[r][0] = fmaf(block_sum[r], scale[r][i / CODES_PER_BLOCK], acc[r][0]);
                        block_sum[r] = 0.0f;
                    }
                } else {
                    const float weight = __fmul_rn(v, scale[r][i / CODES_PER_BLOCK]);
#pragma unroll
                    for (int t = 0; t < NT; t++)
                        acc[r][t] = fmaf(weight, lq_component(xv[t], e), acc[r][t]);
                }
            }
        }
    }
}

// Whether this CTA is the last of its band (blockIdx.x) to finish: it then adds the slices'
// partials (threadFenceReduction's ticket pattern: the fences make every CTA's partials
// visible before its ticket). Every thread calls it; *last is the CTA's shared flag.
__device__ __forceinline__ bool lq_last_of_band(const lq_decode_args &a, int *last) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned done = atomicAdd(a.tickets + blockIdx.x, 1u);
        *last = done == gridDim.y - 1;
        if (*last) __threadfence();
    }
    __syncthreads();
    return *last != 0;
}

// The last CTA of a band: y = Σ slices' partials, in slice order (one output per thread).
template <int NT>
__device__ void lq_finish_band(const lq_decode_args &a, int row_first, int row_count) {
    const int rows = a.q.rows, slices = (int)gridDim.y;
    for (int i = threadIdx.x; i < row_count * NT; i += LQ_DECODE_THREADS) {
        const int t = i / row_count, row = row_first + i % row_count;
        if (t >= a.n || row >= rows) continue;
        const float *p = a.partials + (size_t)t * rows + row;
        float sum = 0.0f;
#pragma unroll 4
        for (int s = 0; s < slices; s++) sum += __ldcg(p + (size_t)s * NT * rows);
        a.y[(size_t)t * rows + row] = sum;
    }
}

// This CTA's share [begin, end) of the rank: slice s adds L1[:, share]·t[share] into its
// partials, so the low-rank term needs no pass of its own.
struct lq_rank_share {
    int begin, end;
};

__device__ __forceinline__ lq_rank_share lq_rank_share_of(const lq_decode_args &a) {
    const int share = (a.rank + (int)gridDim.y - 1) / (int)gridDim.y;
    lq_rank_share out;
    out.begin = (int)blockIdx.y * share;
    out.end = out.begin + share < a.rank ? out.begin + share : a.rank;
    return out;
}

// Packed words and block scales of rows row0 .. row0 + R − 1 for this lane's chunk, and the
// first L1 value of each row for this lane's part of the rank share (same round trip to
// memory); zeros where the lane or the row is past the end (idle lanes still take part in the
// shuffles).
// One row's packed words and block scales at chunk `chunk`, zeros where the lane is inactive
// or the row is past the end.
template <int BITS, int BPC>
__device__ __forceinline__ void lq_load_row_chunk(const lq_decode_args &a, int row, int chunk,
                                                  bool active, uint32_t (&w)[BITS],
                                                  float (&scale)[BPC]) {
    if (active && row < a.q.rows) {
        const uint32_t ci = (uint32_t)row * (uint32_t)a.chunks_per_row + (uint32_t)chunk;
        lq_load_chunk<BITS>(a.q.codes, ci, w);
        lq_chunk_scales<BPC>(a.q, ci, scale);
    } else {
#pragma unroll
        for (int b = 0; b < BITS; b++) w[b] = 0u;
#pragma unroll
        for (int b = 0; b < BPC; b++) scale[b] = 0.0f;
    }
}

template <int BITS, int BPC, int R>
__device__ __forceinline__ void lq_load_rows(const lq_decode_args &a, int row0, int chunk,
                                             bool active, int lane, uint32_t (&w)[R][BITS],
                                             float (&scale)[R][BPC], float (&l1)[R]) {
    const lq_rank_share share = lq_rank_share_of(a);
    const int k = share.begin + lane;
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int row = row0 + r;
        lq_load_row_chunk<BITS, BPC>(a, row, chunk, active, w[r], scale[r]);
        l1[r] = k < share.end && row < a.q.rows ? __ldg(a.lora_B + (size_t)row * a.rank + k) : 0.0f;
    }
}

// acc += L1[rows, share] · t[share] per lane (lane takes k ≡ lane mod 32 of the share); the
// warp's reduction then sums it with the rest. Only t waits for the projection kernel.
template <int NT, int R>
__device__ __forceinline__ void lq_add_lowrank(const lq_decode_args &a, int row0, int lane,
                                               const float (&l1_first)[R], float (&acc)[R][NT]) {
    const lq_rank_share share = lq_rank_share_of(a);
    lq_pdl_wait();
    for (int k = share.begin + lane; k < share.end; k += 32) {
        float l1[R];
#pragma unroll
        for (int r = 0; r < R; r++)
            l1[r] = k < share.begin + 32  ? l1_first[r]
                    : row0 + r < a.q.rows ? __ldg(a.lora_B + (size_t)(row0 + r) * a.rank + k)
                                          : 0.0f;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t >= a.n) break;
            const float tk = __ldcg(a.t + (size_t)t * a.rank + k);
#pragma unroll
            for (int r = 0; r < R; r++) acc[r][t] = fmaf(l1[r], tk, acc[r][t]);
        }
    }
}

template <int BITS, int BPC, int NT, bool PAIRS>
__global__ void __launch_bounds__(LQ_DECODE_THREADS, 2)
    lq_decode_kernel(const __grid_constant__ lq_decode_args a) {
    lq_pdl_trigger(); // the next kernel waits for this one before it reads (pdl_cuda.cuh)
    constexpr int R = lq_decode_rows(BITS, NT);
    constexpr int V = R * NT; // values each warp reduces per row group
    static_assert(V <= 32 && (V & (V - 1)) == 0, "reduce-scatter needs a power of two <= 32");
    static_assert(!PAIRS || (BITS == 2 && NT == 1), "pair tables are for one token at b0 = 2");
    __shared__ float4 xs[NT * 256];
    __shared__ float pairs[PAIRS ? 16 * 16 * 32 : 1];
    __shared__ float lut[BITS == 8 ? 256 : 1];
    __shared__ int last;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunk = blockIdx.y * LQ_SLICE_CHUNKS + lane;
    const bool active = chunk < a.chunks_per_row;
    const int band_rows = LQ_DECODE_WARPS * R * a.iters;
    const int band0 = blockIdx.x * band_rows;
    // The first rows' loads go out before the shared-memory setup: HBM latency overlaps it.
    uint32_t w[R][BITS];
    float scale[R][BPC], l1[R];
    lq_load_rows<BITS, BPC, R>(a, band0 + warp * R, chunk, active, lane, w, scale, l1);
    lq_prefetch_issue(a.prefetch);
    lq_stage_x<NT>(a.x, a.n, a.q.cols, blockIdx.y * LQ_SLICE_COLS, xs);
    float lane_value = 0.0f;
    if constexpr (BITS == 8) {
        for (int i = threadIdx.x; i < 256; i += LQ_DECODE_THREADS) lut[i] = __ldg(a.q.table + i);
    } else if constexpr (!PAIRS) {
        lane_value = __ldg(a.q.table + (lane & ((1 << BITS) - 1)));
    }
    __syncthreads();
    if constexpr (PAIRS) {
        lq_build_pairs(xs, a.q.table, pairs, lane, warp);
        __syncthreads();
    }

    for (int it = 0; it < a.iters; it++) {
        const int row0 = band0 + (it * LQ_DECODE_WARPS + warp) * R;
        if (it > 0) lq_load_rows<BITS, BPC, R>(a, row0, chunk, active, lane, w, scale, l1);
        float acc[R][NT];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
        if constexpr (PAIRS)
            lq_decode_pairs<BPC, R>(w, scale, pairs, lane, acc);
        else
            lq_decode_direct<BITS, BPC, NT, R>(w, scale, xs, lane, lane_value, lut, acc);
        if (a.rank > 0) lq_add_lowrank<NT, R>(a, row0, lane, l1, acc);

        float v[V];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) v[r * NT + t] = acc[r][t];
        const float total = lq_reduce_scatter<V>(v, lane);
        const int held = lane / (32 / V), r = held / NT, t = held % NT, row = row0 + r;
        if (lane % (32 / V) == 0 && t < a.n && row < a.q.rows)
            a.partials[((size_t)blockIdx.y * NT + t) * a.q.rows + row] = total;
    }

    if (!lq_last_of_band(a, &last)) return;
    lq_finish_band<NT>(a, band0, band_rows);
    if (threadIdx.x == 0) a.tickets[blockIdx.x] = 0; // every CTA of the band has taken its ticket
}

// ---------------------------------------------------------------------------------------------
// Decode, generic path: one warp per row, every value decoded on its own (any B0, B1, cols).

template <int NT>
__global__ void __launch_bounds__(256)
    lq_decode_generic_kernel(const __grid_constant__ lq_decode_args a) {
    lq_pdl_trigger(); // the next kernel waits for this one before it reads (pdl_cuda.cuh)
    __shared__ float table[256];
    const lq_packed &q = a.q;
    lq_prefetch_issue(a.prefetch);
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        table[i] = i < (1 << q.b0) ? __ldg(q.table + i) : 0.0f;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= q.rows) return;

    // Row-level divisions in 64 bits once; per value only 32-bit offsets (< B0 + cols).
    const uint64_t base = (uint64_t)row * (uint64_t)q.cols;
    const uint64_t block0 = base / (uint64_t)q.B0, group0 = block0 / (uint64_t)q.B1;
    const uint32_t within_block = (uint32_t)(base - block0 * (uint64_t)q.B0);
    const uint32_t within_group = (uint32_t)(block0 - group0 * (uint64_t)q.B1);
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    uint64_t cached_block = ~(uint64_t)0;
    float scale = 0.0f;
    for (int c = lane; c < q.cols; c += 32) {
        const uint32_t blocks_on = lq_div(within_block + (uint32_t)c, q.block);
        const uint64_t block = block0 + blocks_on;
        if (block != cached_block) {
            const uint64_t group = group0 + lq_div(within_group + blocks_on, q.group);
            scale = lq_block_scale(q, lq_packed_get(q.scale_codes, block, q.b1),
                                   lq_group_scale(q, group));
            cached_block = block;
        }
        const float value = __fmul_rn(table[lq_packed_get(q.codes, base + c, q.b0)], scale);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < a.n) acc[t] = fmaf(value, __ldg(a.x + (size_t)t * q.cols + c), acc[t]);
    }
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = lq_warp_sum(acc[t]);
    if (a.rank > 0) lq_pdl_wait();
    float dot[NT];
    lq_lowrank_dots<NT>(a, row, lane, dot);
    if (lane < a.n)
        a.y[(size_t)lane * q.rows + row] = lq_pick<NT>(acc, lane) + lq_pick<NT>(dot, lane);
}

// The layers one projection launch serves (layers of one input decode together:
// linear_cuda.cu, lq_decode_layers): layer i's rank rows are the CTA rows [first[i],
// first[i + 1]), its x · L2ᵀ goes to t[i]. A lone layer is a group of one.
#define LQ_PROJECT_GROUP_MAX 4
struct lq_project_group {
    int count;
    int first[LQ_PROJECT_GROUP_MAX + 1];
    const float *lora_A[LQ_PROJECT_GROUP_MAX];
    int rank[LQ_PROJECT_GROUP_MAX];
    float *t[LQ_PROJECT_GROUP_MAX];
    // What x is (lq_lowrank_project_split_kernel only; the others take LQ_INPUT_PLAIN): the
    // token, or the input of the rmsnorm that the decode kernels fuse (gemv_mma1_kernel.h), with
    // `second` the norm's weight.
    int input;
    const float *second;
};

// The layer of CTA row `row`, and the rank row k within it.
__device__ __forceinline__ int lq_project_layer(const lq_project_group &g, int row, int *k) {
    int layer = 0;
#pragma unroll
    for (int j = 1; j < LQ_PROJECT_GROUP_MAX; j++) layer += j < g.count && row >= g.first[j];
    *k = row - g.first[layer];
    return layer;
}

// t[token, k] = x[token] · L2[k] for tokens < n: one CTA per rank row k (of each layer) and
// group of NT tokens (blockIdx.y: tokens NT·y ..; one group where gridDim.y = 1).
template <int NT>
__global__ void __launch_bounds__(256)
    lq_lowrank_project_kernel(const float *x, int n, int cols,
                              const __grid_constant__ lq_project_group g, int vector) {
    // x is ready (when launched with the attribute, the kernel before has ended); the decode
    // kernel may launch now: it waits for t only in its epilogue
    lq_pdl_enter();
    __shared__ float partial[8][NT];
    int row;
    const int layer = lq_project_layer(g, (int)blockIdx.x, &row);
    const int rank = g.rank[layer], first = (int)blockIdx.y * NT;
    float *t = g.t[layer] + (size_t)first * rank;
    x += (size_t)first * cols;
    n -= first;
    const float *a_row = g.lora_A[layer] + (size_t)row * cols;
    float acc[NT];
#pragma unroll
    for (int k = 0; k < NT; k++) acc[k] = 0.0f;
    if (vector) { // cols % 4 == 0 and x 16-byte aligned
        const int quads = cols >> 2;
        // unrolled so that a thread's loads of the row go out together, not one round trip each
#pragma unroll 4
        for (int i = threadIdx.x; i < quads; i += blockDim.x) {
            const float4 av = __ldg((const float4 *)a_row + i);
#pragma unroll
            for (int k = 0; k < NT; k++)
                if (k < n) {
                    const float4 xv = __ldg((const float4 *)(x + (size_t)k * cols) + i);
                    acc[k] = fmaf(av.x, xv.x, acc[k]);
                    acc[k] = fmaf(av.y, xv.y, acc[k]);
                    acc[k] = fmaf(av.z, xv.z, acc[k]);
                    acc[k] = fmaf(av.w, xv.w, acc[k]);
                }
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float av = __ldg(a_row + c);
#pragma unroll
            for (int k = 0; k < NT; k++)
                if (k < n) acc[k] = fmaf(av, __ldg(x + (size_t)k * cols + c), acc[k]);
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < NT; k++) {
        const float sum = lq_warp_sum(acc[k]);
        if (lane == 0) partial[warp][k] = sum;
    }
    __syncthreads();
    if ((int)threadIdx.x < n && threadIdx.x < NT) {
        float sum = 0.0f;
        for (int w8 = 0; w8 < (int)(blockDim.x / 32); w8++) sum += partial[w8][threadIdx.x];
        t[(size_t)threadIdx.x * rank + row] = sum;
    }
}

// One token: partials[s, k] = x[slice s] · L2[k, slice s] over slices of LQ_PROJECT_SLICE
// columns, CTA (k, s) (k over each layer's rank rows), one float4 of the row per thread (cols %
// 4 == 0, x 16-byte aligned): a single round trip to memory per CTA, where
// lq_lowrank_project_kernel's one CTA per rank row walks the whole row. The reader adds the
// slices in order (deterministic). A layer's partials go to g.t[layer]. A normed input
// (g.input, linear_fused): w·x for rmsnorm(x, w), whose scale needs all of x: the decode kernel
// multiplies the sum by it.
#define LQ_PROJECT_SLICE 1024
__global__ void __launch_bounds__(256)
    lq_lowrank_project_split_kernel(const float *x, int cols,
                                    const __grid_constant__ lq_project_group g) {
    lq_pdl_enter(); // as lq_lowrank_project_kernel: the decode kernel waits only in its epilogue
    __shared__ float warp_sums[8];
    int k;
    const int layer = lq_project_layer(g, (int)blockIdx.x, &k), slice = blockIdx.y;
    const int quad = slice * (LQ_PROJECT_SLICE / 4) + (int)threadIdx.x;
    float acc = 0.0f;
    if (quad < cols / 4) {
        const float4 av = __ldg((const float4 *)(g.lora_A[layer] + (size_t)k * cols) + quad);
        float4 xv = __ldg((const float4 *)x + quad);
        if (g.input == LQ_INPUT_RMSNORM) {
            const float4 w = __ldg((const float4 *)g.second + quad);
            xv = make_float4(xv.x * w.x, xv.y * w.y, xv.z * w.z, xv.w * w.w);
        }
        acc = fmaf(av.x, xv.x, acc);
        acc = fmaf(av.y, xv.y, acc);
        acc = fmaf(av.z, xv.z, acc);
        acc = fmaf(av.w, xv.w, acc);
    }
    acc = lq_warp_sum(acc);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int w = 0; w < 8; w++) sum += warp_sums[w];
        g.t[layer][(size_t)slice * g.rank[layer] + k] = sum;
    }
}

// ---------------------------------------------------------------------------------------------
// Tiles of Q: fp16 for prefill's tensor-core GEMMs, fp32 or bf16 for training (train_cuda.cu).

// A block scale for an fp32 tile: core/nf.c's offset + code·gs / levels with its IEEE
// division, so a training tile is the CPU's bit for bit (an fp16 tile takes lq_block_scale).
__device__ __forceinline__ float lq_block_scale_divided(const lq_packed &q, uint32_t code,
                                                        float group_scale) {
    return __fadd_rn(q.offset, __fdiv_rn(__fmul_rn(__uint2float_rn(code), group_scale), q.levels));
}

__device__ __forceinline__ void lq_tile_store(__half *tile, size_t i, float v) {
    tile[i] = __float2half_rn(v);
}
__device__ __forceinline__ void lq_tile_store(float *tile, size_t i, float v) {
    tile[i] = v;
}
__device__ __forceinline__ void lq_tile_store(__nv_bfloat16 *tile, size_t i, float v) {
    tile[i] = __float2bfloat16_rn(v);
}

// Two values rounded to a 16-bit type, packed as one 32-bit word (the first in the low half).
__device__ __forceinline__ uint32_t lq_tile_pair(const __half *, float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    uint32_t word;
    memcpy(&word, &h, sizeof word);
    return word;
}
__device__ __forceinline__ uint32_t lq_tile_pair(const __nv_bfloat16 *, float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    uint32_t word;
    memcpy(&word, &h, sizeof word);
    return word;
}

// 8 consecutive values (one block: B0 % 8 == 0, cols % 8 == 0) per thread: one 16-byte store
// of fp16 or bf16 values, two of fp32.
template <int BITS, typename T>
__global__ void __launch_bounds__(256)
    lq_dequant_tile_kernel(const __grid_constant__ lq_packed q, uint32_t first_octet,
                           uint32_t octets, T *tile) {
    constexpr bool F32 = sizeof(T) == sizeof(float);
    __shared__ float table[1 << BITS];
    for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) table[i] = __ldg(q.table + i);
    __syncthreads();
    const uint32_t mask = (1u << q.b1) - 1u;
    for (uint32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < octets;
         g += gridDim.x * blockDim.x) {
        const uint32_t octet = first_octet + g;
        uint32_t low, high = 0u;
        if constexpr (BITS == 8) {
            const uint2 v = __ldg((const uint2 *)q.codes + octet);
            low = v.x, high = v.y;
        } else {
            low = lq_bit_window(q.codes, (uint64_t)octet * (8 * BITS));
        }
        const uint32_t block = lq_div(octet * 8u, q.block);
        const uint32_t scale_code =
            lq_bit_window(q.scale_codes, (uint64_t)block * (uint32_t)q.b1) & mask;
        const float group_scale = lq_group_scale(q, lq_div(block, q.group));
        const float scale = F32 ? lq_block_scale_divided(q, scale_code, group_scale)
                                : lq_block_scale(q, scale_code, group_scale);
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t code = BITS == 8 ? ((i < 4 ? low : high) >> (8 * (i & 3))) & 255u
                                            : (low >> (i * BITS)) & ((1u << BITS) - 1u);
            v[i] = __fmul_rn(table[code], scale);
        }
        if constexpr (F32) {
            float4 *out = (float4 *)tile + 2 * (size_t)g;
            out[0] = make_float4(v[0], v[1], v[2], v[3]);
            out[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            const uint4 packed =
                make_uint4(lq_tile_pair(tile, v[0], v[1]), lq_tile_pair(tile, v[2], v[3]),
                           lq_tile_pair(tile, v[4], v[5]), lq_tile_pair(tile, v[6], v[7]));
            *((uint4 *)tile + g) = packed;
        }
    }
}

// Any configuration: one value per thread.
template <typename T>
__global__ void __launch_bounds__(256)
    lq_dequant_tile_generic_kernel(const __grid_constant__ lq_packed q, uint64_t first,
                                   uint64_t count, T *tile) {
    __shared__ float table[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        table[i] = i < (1 << q.b0) ? __ldg(q.table + i) : 0.0f;
    __syncthreads();
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t f = first + i, block = f / (uint64_t)q.B0;
        const uint32_t scale_code = lq_packed_get(q.scale_codes, block, q.b1);
        const float group_scale = lq_group_scale(q, block / (uint64_t)q.B1);
        const float scale = sizeof(T) == sizeof(float)
                                ? lq_block_scale_divided(q, scale_code, group_scale)
                                : lq_block_scale(q, scale_code, group_scale);
        lq_tile_store(tile, i, __fmul_rn(table[lq_packed_get(q.codes, f, q.b0)], scale));
    }
}

__global__ void __launch_bounds__(256)
    lq_to_half_kernel(const float *x, size_t count, __half *out) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2half_rn(x[i]);
}

#endif
