// The kernels of kernels/cuda/linear_mma_cuda.cu (the design notes are there): packed LQ codes
// dequantized in registers straight into mma.sync m16n8k16 fragments, the fp16 conversion of x
// and the split-K reduction. Device code and the argument struct; included by
// linear_mma_cuda.cu alone (its names differ from linear_cuda_kernels.cuh's on purpose: the
// two files are separate translation units).
#ifndef LQ_LINEAR_MMA_CUDA_CUH
#define LQ_LINEAR_MMA_CUDA_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "core/nf.h"
}

#include "kernels/cuda/gemv_mma1_cuda.cuh" // lq_m1_mma, lq_m1_pair_offset
#include "kernels/cuda/divisor.h"
#include "kernels/cuda/pdl_cuda.cuh"
#include "kernels/cuda/prefetch_cuda.cuh"

#define LQ_MMA_WARPS 8
#define LQ_MMA_THREADS (LQ_MMA_WARPS * 32)
#define LQ_MMA_WARP_ROWS 32 // two m16 tiles per warp
#define LQ_MMA_BAND_ROWS (LQ_MMA_WARPS * LQ_MMA_WARP_ROWS)
#define LQ_MMA_TILE_COLS 128 // a k-tile: one 32-code chunk per lane of a quad
#define LQ_MMA_TILE_CHUNKS (LQ_MMA_TILE_COLS / 32)
#define LQ_MMA_STEPS (LQ_MMA_TILE_COLS / 16) // mma k-steps per k-tile

#define LQ_MMA_FULL_MASK 0xffffffffu

struct lq_mma_args {
    const uint32_t *codes, *scale_codes; // packed as core/nf.h lays them out (+ 16 bytes of zeros)
    const uint8_t *group_scales;
    const float *table; // the NF table of b0 bits
    int rows, cols, b1, b2;
    float offset, levels, inv_levels; // levels = 2^b1 − 1, inv_levels = RN(1 / levels)
    lq_divisor chunk_block;           // 32-value chunk → block when B0 % 32 == 0 (B0 / 32)
    lq_divisor group;                 // block → group (B1)
    const float *x;                   // the tokens [n][cols], rounded to fp16 as staged
    int n;
    int x_vector; // x 16-byte aligned: staged by float4 loads
    // x was complete when this grid launched (the kernel before it waited for its own
    // predecessor before letting this one launch: the projection of t), so x is staged before
    // the wait, and only t, in the epilogue, waits for that kernel; else all waits at first
    int x_early;
    const float *lora_B; // L1 [rows][rank]
    const float *t;      // x · L2ᵀ [n][rank], fp32
    int rank;
    float *out;           // [splits][n][rows] partial sums; y itself when there is one split
    int tiles_per_split;  // k-tiles per CTA (the last split may have fewer)
    int chunks_per_row;   // cols / 32
    lq_prefetch prefetch; // the next layer's buffers, into L2 while this one runs
};

// ---------------------------------------------------------------------------------------------
// Hardware pieces.

__device__ __forceinline__ uint32_t lq_mma_hmul2(uint32_t a, uint32_t b) {
    __half2 ha, hb;
    memcpy(&ha, &a, 4);
    memcpy(&hb, &b, 4);
    const __half2 p = __hmul2(ha, hb);
    uint32_t out;
    memcpy(&out, &p, 4);
    return out;
}

__device__ __forceinline__ uint32_t lq_mma_half2_bits(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t out;
    memcpy(&out, &h, 4);
    return out;
}

// ---------------------------------------------------------------------------------------------
// Decoding (core/nf.c's arithmetic; the same as linear_cuda_kernels.cuh).

// ŝ = offset + code·gs / levels in core/nf.c's operation order: q·levels is an FMA-exact
// residual, and with inv_levels = RN(1/levels) one correction step gives RN(a / levels).
__device__ __forceinline__ float lq_mma_block_scale(const lq_mma_args &a, uint32_t code,
                                                    float group_scale) {
    const float product = __fmul_rn(__uint2float_rn(code), group_scale);
    float quotient = __fmul_rn(product, a.inv_levels);
    quotient = __fmaf_rn(__fmaf_rn(-quotient, a.levels, product), a.inv_levels, quotient);
    return __fadd_rn(a.offset, quotient);
}

__device__ __forceinline__ float lq_mma_group_scale(int b2, uint32_t bits) {
    if (b2 == LQ_SCALE_FP32) return __uint_as_float(bits);
    if (b2 == LQ_SCALE_BF16) return __uint_as_float(bits << 16);
    return __half2float(__ushort_as_half((unsigned short)bits));
}

// What one lane loads for one row and one 32-code chunk: the chunk's BITS code words, the
// 32-bit window of scale codes that starts at its first block, and its group scale's bits.
template <int BITS> struct lq_mma_raw {
    uint32_t w[BITS];
    uint32_t window, group_bits;
};

// Chunk `ci` (row · cols/32 + chunk) of a valid row; zeros otherwise. The window's two words
// and the chunk's words lie inside the buffers thanks to their 16 bytes of padding.
template <int BITS, int BPC>
__device__ __forceinline__ void lq_mma_load(const lq_mma_args &a, bool valid, uint32_t ci,
                                            lq_mma_raw<BITS> &r) {
    if (!valid) {
#pragma unroll
        for (int i = 0; i < BITS; i++) r.w[i] = 0u;
        r.window = 0u, r.group_bits = 0u;
        return;
    }
    const uint32_t *p = a.codes + (size_t)ci * BITS; // 4·BITS-byte aligned
    if constexpr (BITS == 2) {
        const uint2 v = __ldg((const uint2 *)p);
        r.w[0] = v.x, r.w[1] = v.y;
    } else if constexpr (BITS == 4) {
        const uint4 v = __ldg((const uint4 *)p);
        r.w[0] = v.x, r.w[1] = v.y, r.w[2] = v.z, r.w[3] = v.w;
    } else {
#pragma unroll
        for (int i = 0; i < BITS; i++) r.w[i] = __ldg(p + i);
    }
    const uint32_t block0 = BPC == 1 ? lq_div(ci, a.chunk_block) : ci * BPC;
    const uint32_t group = lq_div(block0, a.group);
    const uint64_t bit = (uint64_t)block0 * (uint32_t)a.b1;
    const uint32_t *s = a.scale_codes + (bit >> 5);
    r.window = __funnelshift_r(__ldg(s), __ldg(s + 1), (uint32_t)bit);
    r.group_bits = a.b2 == LQ_SCALE_FP32
                       ? __ldg((const uint32_t *)a.group_scales + group)
                       : (uint32_t)__ldg((const unsigned short *)a.group_scales + group);
}

// The BPC block scales of a loaded chunk as half2 (both halves equal); 0 for an invalid one.
template <int BITS, int BPC>
__device__ __forceinline__ void lq_mma_scales(const lq_mma_args &a, const lq_mma_raw<BITS> &r,
                                              bool valid, uint32_t (&scale)[BPC]) {
    const float group_scale = lq_mma_group_scale(a.b2, r.group_bits);
    const uint32_t mask = (1u << a.b1) - 1u;
#pragma unroll
    for (int b = 0; b < BPC; b++) { // BPC·b1 <= 32: every code is inside the window
        const float s = lq_mma_block_scale(a, (r.window >> (b * a.b1)) & mask, group_scale);
        scale[b] = lq_mma_half2_bits(valid ? s : 0.0f, valid ? s : 0.0f);
    }
}

// ---------------------------------------------------------------------------------------------
// The GEMM.
//
// CTA (band, split): rows [band·256, +256) x k-tiles [split·tiles_per_split, +tiles) x all NT
// token slots. Warp w owns rows band·256 + 32w .. +31 as two m16 tiles over the CTA's k-tiles.
// K is permuted inside each k-tile (the dot product does not care, as long as A and B agree):
// for mma step s (0..7) of a k-tile, the k index 2c + j' (j' = 0, 1, 8, 9 → j = 0..3) is column
// 32c + 4s + j of the tile. So lane (g, c) needs, per row, exactly the 32 codes of chunk c of
// the tile — BITS aligned words, one vector load — and decodes codes 4s..4s+3 at step s into
// its two A registers of that row (pairs 2s and 2s+1). B follows: the x staging puts x[token
// 8·jt + g][32c + 4s .. +3] at xs[((tile·8 + s)·JT + jt)·32 + lane], one LDS.64 per fragment.
__device__ __forceinline__ void lq_mma_prefetch_l2(const void *p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

template <int BITS, int BPC, int NT>
__global__ void __launch_bounds__(LQ_MMA_THREADS, 1)
    lq_mma_kernel(const __grid_constant__ lq_mma_args a) {
    constexpr int JT = NT / 8;               // n8 token tiles
    constexpr int ENTRIES = 1 << (2 * BITS); // code pairs
    __shared__ uint32_t pairs[ENTRIES * 32]; // half2 (table[lo], table[hi]) per lane
    extern __shared__ uint2 lq_mma_xs[];     // [tiles][steps][JT][lanes], 4 fp16 each

    lq_prefetch_issue(a.prefetch);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int row_w = blockIdx.x * LQ_MMA_BAND_ROWS + warp * LQ_MMA_WARP_ROWS;
    const int ktiles = (a.chunks_per_row + LQ_MMA_TILE_CHUNKS - 1) / LQ_MMA_TILE_CHUNKS;
    const int tile0 = blockIdx.y * a.tiles_per_split;
    const int tiles = min(a.tiles_per_split, ktiles - tile0);

    // rows of this lane: q = 2·mt + h → row_w + 16·mt + 8·h + g
    int row[4];
    bool row_ok[4];
#pragma unroll
    for (int q = 0; q < 4; q++) {
        row[q] = row_w + 16 * (q >> 1) + 8 * (q & 1) + g;
        row_ok[q] = row[q] < a.rows;
    }
    // The first tile's loads go out before anything else: HBM latency overlaps the setup.
    const uint32_t chunk0 = (uint32_t)tile0 * LQ_MMA_TILE_CHUNKS + c;
    lq_mma_raw<BITS> cur[4];
#pragma unroll
    for (int q = 0; q < 4; q++)
        lq_mma_load<BITS, BPC>(a, row_ok[q] && (int)chunk0 < a.chunks_per_row,
                               (uint32_t)row[q] * (uint32_t)a.chunks_per_row + chunk0, cur[q]);
    // The low-rank epilogue reads this split's share of the rows of L1 once, at the end, one k
    // per loop trip, each trip waiting for its loads: they are asked into L2 now (the four
    // lanes of a row take a 32-byte sector each in turn), so that a trip waits for L2 rather
    // than HBM. No registers stay held across the main loop for it.
    if (a.rank > 0) {
        const int share = (a.rank + (int)gridDim.y - 1) / (int)gridDim.y;
        const int k_begin = (int)blockIdx.y * share, k_end = min(a.rank, k_begin + share);
#pragma unroll
        for (int q = 0; q < 4; q++)
            if (row_ok[q])
                for (int k = k_begin + 8 * c; k < k_end; k += 32)
                    lq_mma_prefetch_l2(a.lora_B + (size_t)row[q] * a.rank + k);
    }
    lq_pdl_trigger(); // the reduction waits for this grid's end before reading

    // Pair table: entry e = lo | hi << BITS holds half2(table[lo], table[hi]) in every lane's
    // column; a warp fills one entry per pass, so its table reads are uniform.
    for (int i = threadIdx.x; i < ENTRIES * 32; i += LQ_MMA_THREADS) {
        const int e = i >> 5;
        pairs[i] = lq_mma_half2_bits(__ldg(a.table + (e & ((1 << BITS) - 1))),
                                     __ldg(a.table + (e >> BITS)));
    }

    // x (and t) come from the kernels before this one (see x_early).
    if (!a.x_early) lq_pdl_wait();
    {
        // 16-byte pieces of x in fp16: piece p of token `token` in tile kt is columns
        // 8p .. 8p+7, i.e. lane c = p / 4's steps 2·(p % 4) and 2·(p % 4) + 1. Each is
        // rounded from fp32 here (what a conversion kernel before this one used to do).
        const int pieces = tiles * NT * 16;
        const int col0 = tile0 * LQ_MMA_TILE_COLS;
        for (int i = threadIdx.x; i < pieces; i += LQ_MMA_THREADS) {
            const int p = i & 15, token = (i >> 4) % NT, kt = (i >> 4) / NT;
            const int col = col0 + kt * LQ_MMA_TILE_COLS + 8 * p;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (token < a.n && col < a.cols) {
                const float *from = a.x + (size_t)token * a.cols + col;
                float f[8];
                if (a.x_vector) {
                    const float4 lo = __ldg((const float4 *)from),
                                 hi = __ldg((const float4 *)from + 1);
                    f[0] = lo.x, f[1] = lo.y, f[2] = lo.z, f[3] = lo.w;
                    f[4] = hi.x, f[5] = hi.y, f[6] = hi.z, f[7] = hi.w;
                } else {
#pragma unroll
                    for (int j = 0; j < 8; j++) f[j] = __ldg(from + j);
                }
                v = make_uint4(lq_mma_half2_bits(f[0], f[1]), lq_mma_half2_bits(f[2], f[3]),
                               lq_mma_half2_bits(f[4], f[5]), lq_mma_half2_bits(f[6], f[7]));
            }
            const int s = 2 * (p & 3), jt = token >> 3, l = (token & 7) * 4 + (p >> 2);
            lq_mma_xs[((kt * LQ_MMA_STEPS + s) * JT + jt) * 32 + l] = make_uint2(v.x, v.y);
            lq_mma_xs[((kt * LQ_MMA_STEPS + s + 1) * JT + jt) * 32 + l] = make_uint2(v.z, v.w);
        }
    }
    __syncthreads();
    if (row_w >= a.rows) return; // no barrier below

    float acc[2][JT][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int jt = 0; jt < JT; jt++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[mt][jt][i] = 0.0f;

    const uint32_t lane_bytes = (uint32_t)lane * 4u;
    const char *table = (const char *)pairs;
#pragma unroll 1
    for (int kt = 0; kt < tiles; kt++) {
        const uint32_t chunk = chunk0 + (uint32_t)kt * LQ_MMA_TILE_CHUNKS;
        const bool chunk_ok = (int)chunk < a.chunks_per_row;
        // the next tile's loads fly while this one is decoded
        lq_mma_raw<BITS> next[4];
        const uint32_t chunk_next = chunk + LQ_MMA_TILE_CHUNKS;
        const bool more = kt + 1 < tiles && (int)chunk_next < a.chunks_per_row;
#pragma unroll
        for (int q = 0; q < 4; q++)
            lq_mma_load<BITS, BPC>(a, more && row_ok[q],
                                   (uint32_t)row[q] * (uint32_t)a.chunks_per_row + chunk_next,
                                   next[q]);
        uint32_t scale[4][BPC];
#pragma unroll
        for (int q = 0; q < 4; q++)
            lq_mma_scales<BITS, BPC>(a, cur[q], row_ok[q] && chunk_ok, scale[q]);

        const uint2 *xs = lq_mma_xs + (size_t)kt * LQ_MMA_STEPS * JT * 32 + lane;
#pragma unroll
        for (int s = 0; s < LQ_MMA_STEPS; s++) {
            constexpr int CODES_PER_BLOCK = 32 / BPC;
            const int block = 4 * s / CODES_PER_BLOCK;
            uint32_t frag[2][4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const uint32_t lo = *(
                    const uint32_t *)(table + lq_m1_pair_offset(cur[q].w, BITS, 2 * s, lane_bytes));
                const uint32_t hi =
                    *(const uint32_t *)(table +
                                        lq_m1_pair_offset(cur[q].w, BITS, 2 * s + 1, lane_bytes));
                frag[q >> 1][q & 1] = lq_mma_hmul2(lo, scale[q][block]);
                frag[q >> 1][2 + (q & 1)] = lq_mma_hmul2(hi, scale[q][block]);
            }
#pragma unroll
            for (int jt = 0; jt < JT; jt++) {
                const uint2 b = xs[(s * JT + jt) * 32];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) lq_m1_mma(acc[mt][jt], frag[mt], b.x, b.y);
            }
        }
#pragma unroll
        for (int q = 0; q < 4; q++) cur[q] = next[q];
    }

    // The low-rank term in fp32: the CTA of split s adds L1[rows, share]·t[share] for its
    // 1/splits share of the rank, so the reduction sums it with the rest.
    if (a.x_early) lq_pdl_wait(); // t: the projection that may have run beside the main loop
    if (a.rank > 0) {
        const int share = (a.rank + (int)gridDim.y - 1) / (int)gridDim.y;
        const int k_begin = (int)blockIdx.y * share;
        const int k_end = min(a.rank, k_begin + share);
#pragma unroll 1
        for (int k = k_begin; k < k_end; k++) {
            float l1[4];
#pragma unroll
            for (int q = 0; q < 4; q++)
                l1[q] = row_ok[q] ? __ldg(a.lora_B + (size_t)row[q] * a.rank + k) : 0.0f;
#pragma unroll
            for (int jt = 0; jt < JT; jt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int token = 8 * jt + 2 * c + e;
                    const float tk = token < a.n ? __ldg(a.t + (size_t)token * a.rank + k) : 0.0f;
#pragma unroll
                    for (int q = 0; q < 4; q++)
                        acc[q >> 1][jt][2 * (q & 1) + e] =
                            fmaf(l1[q], tk, acc[q >> 1][jt][2 * (q & 1) + e]);
                }
        }
    }

    // d[2h + e] of tile (mt, jt) is row 16·mt + 8·h + g, token 8·jt + 2c + e.
    float *out = a.out + (size_t)blockIdx.y * a.n * a.rows;
#pragma unroll
    for (int jt = 0; jt < JT; jt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int token = 8 * jt + 2 * c + e;
            if (token >= a.n) continue;
#pragma unroll
            for (int q = 0; q < 4; q++)
                if (row_ok[q])
                    out[(size_t)token * a.rows + row[q]] = acc[q >> 1][jt][2 * (q & 1) + e];
        }
}

// ---------------------------------------------------------------------------------------------
// Around the GEMM.

// y = Σ_s partials[s] in split order (deterministic), count values each; vector: count % 4 == 0
// and y 16-byte aligned.
__global__ void __launch_bounds__(256)
    lq_mma_reduce_kernel(const float *partials, int splits, size_t count, int vector, float *y) {
    lq_pdl_enter(); // the GEMM has ended and its partials are visible; the next may launch
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    if (vector) {
        const size_t quads = count / 4;
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < quads; i += stride) {
            float4 sum = __ldcg((const float4 *)partials + i);
            for (int s = 1; s < splits; s++) {
                const float4 v = __ldcg((const float4 *)(partials + (size_t)s * count) + i);
                sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
            }
            ((float4 *)y)[i] = sum;
        }
        return;
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        float sum = __ldcg(partials + i);
        for (int s = 1; s < splits; s++) sum += __ldcg(partials + (size_t)s * count + i);
        y[i] = sum;
    }
}

#endif
