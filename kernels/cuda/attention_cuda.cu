// Attention of the CUDA backend: causal grouped-query attention in fp32, for a prefill or one
// sequence's decode step (lq_cuda_attention) and for one decode step of many sequences of
// different lengths (lq_cuda_attention_batch). Matches kernels/cpu/attention_cpu.c to fp32
// rounding: scores q·k in fp32 times 1/sqrt(head_dim), softmax with the row maximum, expf.
//
// Design: one tiled flash-attention kernel serves both entry points.
//   - Query rows. For one kv head, the rows that read its cache are the (token, head) pairs of
//     its group of heads: rows = tokens * group, row ρ is token ρ / group, head
//     kv_head * group + ρ % group. A block takes a tile of BR rows (32, or 8 when a kv head
//     has at most 8 rows, as in a decode step), so the K/V tile it loads is shared by all
//     of them: by the heads of a GQA group and, in a prefill, by neighbouring tokens.
//   - Keys. The block walks its keys in tiles of BC (64; 32 when head_dim > 128) through
//     shared memory with cp.async, K of the next tile loading during this tile's P·V and V
//     during the next tile's scores. 128 threads: thread (tr = t / 16, tc = t % 16) scores
//     rows tr*RPT.. against keys tc + 16j, keeps an online softmax (running max, partial
//     sum) for those rows, and accumulates P·V for the same rows and head dimensions
//     W*tc + 16*W*c + e, so the rescaling by the new max stays in the thread. The 16
//     threads of a row are one half-warp: the row maximum and the final sum are shuffles.
//     head_dim is padded to HDP (16, 32, 64, 128, 256) with zeros in shared memory, which is
//     why any head_dim up to 256 works with one instantiation per HDP.
//   - Causality. Row ρ attends to keys 0..start+ρ/group; a tile's keys run to the largest of
//     its rows and each score past a row's last key is masked. Tiles are launched longest
//     first (reversed blockIdx.x) so a prefill's long rows do not finish last.
//   - Split-K (flash decoding). When the tiles times kv heads times sequences give fewer
//     than two blocks per SM (a decode step, a short prefill against a long cache), the keys
//     are also split across blocks, aiming at four blocks per SM (grid.z = sequences *
//     splits; each split a multiple of BC keys and at least 128; at most 128 splits). Each
//     block leaves its unnormalized output and (max, sum) per row in workspace
//     LQ_CUDA_ATTENTION, rows_out * splits * (head_dim + 2) floats, and attention_combine
//     (one block per output row) merges them. Batch-1 decode at context 4096 with 8 kv heads
//     thus runs 256 blocks, not 8.
//   - Batch decode. grid.z also runs over sequences (each with its own cache pointers and
//     position, staged to LQ_CUDA_STAGE_0/1/2). Storing k_new/v_new is fused into the same
//     kernel: every block reads the new key from k_new rather than the cache, and the one
//     block per (sequence, kv head) whose split holds the position writes it to the cache,
//     so no block reads a row another block writes. One launch, plus the combine when split.
#include <cuda_pipeline.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/pdl_cuda.cuh"
#include "kernels/cuda/rope_angle_cuda.cuh"
#include "kernels/cuda/rope_args.h"

namespace {

constexpr int THREADS = 128;
constexpr int MAX_HEAD_DIM = 256;
constexpr int MAX_SPLITS = 128;
constexpr int MIN_SPLIT_KEYS = 128; // below this a split costs more to combine than it saves

struct attention_params {
    const float *q; // [sequences * tokens, heads * head_dim]
    float *out;     // like q
    // one sequence (k_caches == nullptr): its caches and the position of its first new token
    const float *k_cache, *v_cache;
    int start;
    // batch decode: device copies of the per-sequence caches and positions, and the new rows
    float *const *k_caches, *const *v_caches;
    const int *positions;
    const float *k_new, *v_new; // [sequences, kv_heads * head_dim]
    int tokens;                 // new tokens per sequence (1 in a batch)
    int heads, kv_heads, head_dim, group;
    int splits, split_len; // split_len: a multiple of the kernel's key tile
    float scale;
    int vec;                  // head_dim % 4 == 0 and every array 16-byte aligned: float4 copies
    float *part_out;          // splits > 1: [rows_out][splits][head_dim], unnormalized
    float *part_stats;        // splits > 1: [rows_out][splits][2], (max, sum)
    struct lq_rope_args rope; // the one-token kernel's rotary embedding of q and the new keys
};

__device__ float4 load4(const float *p) {
    return *(const float4 *)p;
}

__device__ float component(float4 v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// W consecutive floats from shared memory (W = 1, 2, 4; p aligned to W floats).
template <int W> __device__ void load_chunk(const float *p, float *v) {
    if constexpr (W == 4) {
        float4 t = *(const float4 *)p;
        v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
    } else if constexpr (W == 2) {
        float2 t = *(const float2 *)p;
        v[0] = t.x, v[1] = t.y;
    } else {
        v[0] = *p;
    }
}

// Writes v[0..W) to dst[d0..] where below head_dim: one vector store when it fits.
template <int W>
__device__ void store_chunk(float *dst, int d0, int head_dim, bool vec, const float *v) {
    if (vec && d0 + W <= head_dim) {
        if constexpr (W == 4)
            *(float4 *)(dst + d0) = make_float4(v[0], v[1], v[2], v[3]);
        else if constexpr (W == 2)
            *(float2 *)(dst + d0) = make_float2(v[0], v[1]);
        else
            dst[d0] = v[0];
        return;
    }
#pragma unroll
    for (int e = 0; e < W; e++)
        if (d0 + e < head_dim) dst[d0 + e] = v[e];
}

// Copies R rows of head_dim floats into shared memory at dst (row stride `stride`), row i from
// source(i), or zeros where that is null; columns head_dim.. are not touched. With vec, as
// 16-byte cp.async (a null row zero-filled, `any` standing in as a readable address); otherwise
// with plain loads. Commits one cp.async group either way, so the groups keep their count.
template <int R, typename Source>
__device__ void load_rows(float *dst, int stride, int head_dim, bool vec, const float *any,
                          Source source) {
    if (vec) {
        const int chunks = head_dim / 4;
        for (int i = threadIdx.x; i < R * chunks; i += THREADS) {
            const int row = i / chunks, c = i - row * chunks;
            const float *src = source(row);
            __pipeline_memcpy_async(dst + row * stride + 4 * c, src ? src + 4 * c : any, 16,
                                    src ? 0 : 16);
        }
    } else {
        for (int i = threadIdx.x; i < R * head_dim; i += THREADS) {
            const int row = i / head_dim, d = i - row * head_dim;
            const float *src = source(row);
            dst[row * stride + d] = src ? src[d] : 0.0f;
        }
    }
    __pipeline_commit();
}

// Zeros columns head_dim..width-1 of R rows: the padding of the head dimension, so that the
// dot products and P·V over the padded width add exact zeros.
template <int R> __device__ void zero_padding(float *dst, int stride, int head_dim, int width) {
    const int pad = width - head_dim;
    for (int i = threadIdx.x; i < R * pad; i += THREADS) {
        const int row = i / pad;
        dst[row * stride + head_dim + (i - row * pad)] = 0.0f;
    }
}

// Sum or max over the 16 lanes of a half-warp (one row's threads).
__device__ float half_warp_max(float v) {
    for (int offset = 8; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ float half_warp_sum(float v) {
    for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// The tile kernel's shared memory in floats: Q rows, K rows (both padded by 4 floats against
// bank conflicts), V rows, and the probabilities P.
__host__ __device__ constexpr int tile_floats(int rpt, int dpt, int kpt) {
    return (8 * rpt + 16 * kpt) * (16 * dpt + 4) + 16 * kpt * 16 * dpt + 8 * rpt * (16 * kpt + 4);
}

// grid (row tiles, kv_heads, sequences * splits), THREADS threads, tile_floats(...) * 4 bytes
// of dynamic shared memory. RPT rows and KPT keys per thread in the score tile, DPT head
// dimensions per thread in the output.
template <int RPT, int DPT, int KPT>
__global__ void __launch_bounds__(THREADS, 2) attention_tile(const attention_params p) {
    lq_pdl_enter();
    constexpr int BR = 8 * RPT, BC = 16 * KPT, HDP = 16 * DPT;
    constexpr int QS = HDP + 4, PS = BC + 4;           // row strides of Q/K and P
    constexpr int W = DPT < 4 ? DPT : 4, CH = DPT / W; // output chunks: CH of W floats

    extern __shared__ float4 shared4[];
    float *qs = (float *)shared4;
    float *ks = qs + BR * QS;
    float *vs = ks + BC * QS;
    float *ps = vs + BC * HDP;

    const int tile = gridDim.x - 1 - blockIdx.x; // the longest rows first
    const int kv_head = blockIdx.y;
    const int seq = blockIdx.z / p.splits, split = blockIdx.z % p.splits;
    const int hd = p.head_dim, kv_dim = p.kv_heads * hd, group = p.group;
    const bool batch = p.k_caches != nullptr;
    const int start = batch ? p.positions[seq] : p.start;
    const int rows = p.tokens * group, row0 = tile * BR;
    const int row_end = min(row0 + BR, rows);
    const int key_end = start + (row_end - 1) / group + 1; // one past the tile's last key
    const int begin = split * p.split_len;
    if (begin >= key_end) return; // none of this tile's keys in this split: the combine skips it
    const int key_hi = min(begin + p.split_len, key_end);

    const float *k_base = (batch ? p.k_caches[seq] : p.k_cache) + (size_t)kv_head * hd;
    const float *v_base = (batch ? p.v_caches[seq] : p.v_cache) + (size_t)kv_head * hd;
    // a batch's new key (at `start`) comes from k_new/v_new, never from the cache row that
    // this launch writes
    const int fresh_key = batch ? start : -1;
    const float *k_fresh = batch ? p.k_new + (size_t)seq * kv_dim + (size_t)kv_head * hd : nullptr;
    const float *v_fresh = batch ? p.v_new + (size_t)seq * kv_dim + (size_t)kv_head * hd : nullptr;
    if (batch && tile == 0 && begin <= start && start < key_hi) {
        float *k_row = p.k_caches[seq] + (size_t)start * kv_dim + (size_t)kv_head * hd;
        float *v_row = p.v_caches[seq] + (size_t)start * kv_dim + (size_t)kv_head * hd;
        for (int d = threadIdx.x; d < hd; d += THREADS) {
            k_row[d] = k_fresh[d];
            v_row[d] = v_fresh[d];
        }
    }

    auto q_row = [&](int i) -> const float * {
        const int rho = row0 + i;
        if (rho >= rows) return nullptr;
        const int token = rho / group;
        const size_t out_row = ((size_t)seq * p.tokens + token) * p.heads +
                               (size_t)kv_head * group + (rho - token * group);
        return p.q + out_row * hd;
    };
    int load_key0 = begin; // the first key of the tile that k_row/v_row load
    auto k_row = [&](int i) -> const float * {
        const int key = load_key0 + i;
        return key >= key_hi ? nullptr : key == fresh_key ? k_fresh : k_base + (size_t)key * kv_dim;
    };
    auto v_row = [&](int i) -> const float * {
        const int key = load_key0 + i;
        return key >= key_hi ? nullptr : key == fresh_key ? v_fresh : v_base + (size_t)key * kv_dim;
    };

    const bool vec = p.vec != 0;
    zero_padding<BR>(qs, QS, hd, HDP);
    zero_padding<BC>(ks, QS, hd, HDP);
    zero_padding<BC>(vs, HDP, hd, HDP);
    load_rows<BR>(qs, QS, hd, vec, p.q, q_row);
    load_rows<BC>(ks, QS, hd, vec, p.q, k_row);
    load_rows<BC>(vs, HDP, hd, vec, p.q, v_row);

    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
    int last[RPT]; // each row's last key; -1 for rows past the end (all masked)
    float m[RPT], l[RPT], acc[RPT][DPT];
#pragma unroll
    for (int r = 0; r < RPT; r++) {
        const int rho = row0 + tr * RPT + r;
        last[r] = rho < rows ? start + rho / group : -1;
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int d = 0; d < DPT; d++) acc[r][d] = 0.0f;
    }

    for (int key0 = begin; key0 < key_hi; key0 += BC) {
        __pipeline_wait_prior(1); // this tile's K (and Q) landed; its V may still be coming
        __syncthreads();

        // scores of rows tr*RPT+r against keys tc+16j
        float s[RPT][KPT];
#pragma unroll
        for (int r = 0; r < RPT; r++)
#pragma unroll
            for (int j = 0; j < KPT; j++) s[r][j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < HDP; d += 4) {
            float4 qv[RPT];
#pragma unroll
            for (int r = 0; r < RPT; r++) qv[r] = load4(qs + (tr * RPT + r) * QS + d);
#pragma unroll
            for (int j = 0; j < KPT; j++) {
                const float4 kv = load4(ks + (tc + 16 * j) * QS + d);
#pragma unroll
                for (int r = 0; r < RPT; r++) {
                    s[r][j] = fmaf(qv[r].x, kv.x, s[r][j]);
                    s[r][j] = fmaf(qv[r].y, kv.y, s[r][j]);
                    s[r][j] = fmaf(qv[r].z, kv.z, s[r][j]);
                    s[r][j] = fmaf(qv[r].w, kv.w, s[r][j]);
                }
            }
        }

        // online softmax: new row max, rescale what was accumulated, probabilities to P
#pragma unroll
        for (int r = 0; r < RPT; r++) {
            float tile_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < KPT; j++) {
                const int key = key0 + tc + 16 * j;
                s[r][j] = key <= last[r] ? s[r][j] * p.scale : -INFINITY;
                tile_max = fmaxf(tile_max, s[r][j]);
            }
            const float m_new = fmaxf(m[r], half_warp_max(tile_max));
            // a row with no key yet keeps everything at zero instead of exp(-inf + inf)
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha = expf(m[r] - m_use);
            m[r] = m_new;
            l[r] *= alpha;
#pragma unroll
            for (int d = 0; d < DPT; d++) acc[r][d] *= alpha;
#pragma unroll
            for (int j = 0; j < KPT; j++) {
                const float e = expf(s[r][j] - m_use);
                l[r] += e;
                ps[(tr * RPT + r) * PS + tc + 16 * j] = e;
            }
        }

        __pipeline_wait_prior(0); // this tile's V
        __syncthreads();          // P and V visible; every thread done with K
        if (key0 + BC < key_hi) {
            load_key0 = key0 + BC;
            load_rows<BC>(ks, QS, hd, vec, p.q, k_row); // next K during this P·V
        } else {
            __pipeline_commit(); // an empty group keeps wait_prior's counting
        }

        // acc[r][c*W+e] += P[row][k] * V[k][W*tc + 16*W*c + e]
#pragma unroll 2
        for (int k = 0; k < BC; k += 4) {
            float4 pv[RPT];
#pragma unroll
            for (int r = 0; r < RPT; r++) pv[r] = load4(ps + (tr * RPT + r) * PS + k);
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                const float *v_k = vs + (k + kk) * HDP + W * tc;
#pragma unroll
                for (int c = 0; c < CH; c++) {
                    float v[W];
                    load_chunk<W>(v_k + 16 * W * c, v);
#pragma unroll
                    for (int r = 0; r < RPT; r++) {
                        const float pr = component(pv[r], kk);
#pragma unroll
                        for (int e = 0; e < W; e++)
                            acc[r][c * W + e] = fmaf(pr, v[e], acc[r][c * W + e]);
                    }
                }
            }
        }

        __syncthreads(); // every thread done with V and P
        if (key0 + BC < key_hi) {
            load_rows<BC>(vs, HDP, hd, vec, p.q, v_row); // next V during the next scores
        } else {
            __pipeline_commit();
        }
    }

    // the row sums, then the output (normalized) or this split's partial result
#pragma unroll
    for (int r = 0; r < RPT; r++) {
        const float sum = half_warp_sum(l[r]);
        const int rho = row0 + tr * RPT + r;
        if (rho >= rows) continue;
        const int token = rho / group;
        const size_t out_row = ((size_t)seq * p.tokens + token) * p.heads +
                               (size_t)kv_head * group + (rho - token * group);
        float *dst;
        float factor;
        if (p.splits == 1) {
            dst = p.out + out_row * hd;
            factor = 1.0f / sum;
        } else {
            const size_t part = out_row * p.splits + split;
            dst = p.part_out + part * hd;
            factor = 1.0f;
            if (tc == 0) {
                p.part_stats[2 * part] = m[r];
                p.part_stats[2 * part + 1] = sum;
            }
        }
#pragma unroll
        for (int c = 0; c < CH; c++) {
            float v[W];
#pragma unroll
            for (int e = 0; e < W; e++) v[e] = acc[r][c * W + e] * factor;
            store_chunk<W>(dst, W * tc + 16 * W * c, hd, vec, v);
        }
    }
}

// Merges the splits of output row blockIdx.x (a (token, head) pair of any sequence): the
// splits that hold some of its keys, weighted by exp(max_s - max) and divided by the total.
__global__ void attention_combine(const attention_params p) {
    lq_pdl_enter();
    __shared__ float weight[MAX_SPLITS];
    const size_t out_row = blockIdx.x;
    const int token_row = (int)(out_row / p.heads);
    const int seq = token_row / p.tokens, token = token_row % p.tokens;
    const int last = (p.k_caches ? p.positions[seq] : p.start) + token;
    const int count = min(p.splits, last / p.split_len + 1); // splits with a key of this row
    const float *stats = p.part_stats + out_row * p.splits * 2;
    const float *part = p.part_out + out_row * p.splits * p.head_dim;

    float max = -INFINITY;
    for (int s = 0; s < count; s++) max = fmaxf(max, stats[2 * s]);
    for (int s = threadIdx.x; s < count; s += blockDim.x) weight[s] = expf(stats[2 * s] - max);
    __syncthreads();
    float total = 0.0f;
    for (int s = 0; s < count; s++) total += weight[s] * stats[2 * s + 1];
    const float inverse = 1.0f / total;
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
        float sum = 0.0f;
        for (int s = 0; s < count; s++) sum += weight[s] * part[(size_t)s * p.head_dim + d];
        p.out[out_row * p.head_dim + d] = sum * inverse;
    }
}

// ---------- one token (attention_decode_kernel.h holds the code and the why) ----------

__device__ __forceinline__ void lq_ad_load4(const float *p, float v[4]) {
    const float4 t = *(const float4 *)p;
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
}
__device__ __forceinline__ float lq_ad_shfl_xor(float v, int offset) {
    return __shfl_xor_sync(0xffffffffu, v, offset);
}
__device__ __forceinline__ void lq_ad_sync(void) {
    __syncthreads();
}
__device__ __forceinline__ float lq_ad_exp(float x) {
    return expf(x);
}
__device__ __forceinline__ float lq_ad_fmul(float x, float y) {
    return __fmul_rn(x, y);
}
__device__ __forceinline__ float lq_ad_fadd(float x, float y) {
    return __fadd_rn(x, y);
}
__device__ __forceinline__ float lq_ad_fsub(float x, float y) {
    return __fsub_rn(x, y);
}
__device__ __forceinline__ void lq_ad_rope_angle(int position, int k, int head_dim, float theta,
                                                 float *c, float *s) {
    lq_rope_angle(position, k, head_dim, theta, c, s);
}

} // namespace

#define LQ_AD_FN __device__ __forceinline__ static
#define LQ_AD_UNROLL _Pragma("unroll")
#include "kernels/cuda/attention_decode_kernel.h"

namespace {

// grid (kv_heads, sequences * splits), LQ_AD_THREADS threads, lq_ad_shared_floats(G,
// head_dim, split_len) floats of dynamic shared memory.
template <int M, int G>
__global__ void __launch_bounds__(LQ_AD_THREADS) attention_decode(const lq_ad_args a) {
    lq_pdl_enter();
    extern __shared__ float4 decode_shared4[];
    lq_ad_body(&a, M, G, (int)blockIdx.x, (int)blockIdx.y, (int)threadIdx.x,
               (float *)decode_shared4);
}

bool aligned16(const void *pointer) {
    return ((uintptr_t)pointer & 15) == 0;
}

int ceil_div(int a, int b) {
    return (a + b - 1) / b;
}

// Launches attention_tile<RPT, DPT, KPT>: grid (tiles, kv_heads, sequences * splits).
template <int RPT, int DPT>
int launch_tile(struct lq_cuda *cuda, const attention_params &p, int tiles, int z) {
    constexpr int KPT = DPT == 16 ? 2 : 4;
    const size_t bytes = tile_floats(RPT, DPT, KPT) * sizeof(float);
    auto kernel = attention_tile<RPT, DPT, KPT>;
    // beyond the default the kernel must opt in; once per process (ops run under the op lock)
    static bool opted_in = false;
    if (bytes > 48 * 1024 && !opted_in) {
        LQ_CUDA_TRY(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
            "attention shared memory");
        opted_in = true;
    }
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, kernel, dim3(tiles, p.kv_heads, z), dim3(THREADS), bytes,
                              cuda->stream, p),
                "attention");
    return LQ_OK;
}

template <int RPT>
int launch_rows(struct lq_cuda *cuda, const attention_params &p, int dpt, int tiles, int z) {
    switch (dpt) {
    case 1:
        return launch_tile<RPT, 1>(cuda, p, tiles, z);
    case 2:
        return launch_tile<RPT, 2>(cuda, p, tiles, z);
    case 4:
        return launch_tile<RPT, 4>(cuda, p, tiles, z);
    case 8:
        return launch_tile<RPT, 8>(cuda, p, tiles, z);
    default:
        return launch_tile<RPT, 16>(cuda, p, tiles, z);
    }
}

// With p.splits > 1: the workspace for the splits' partial results (part_out, part_stats).
int split_workspace(struct lq_cuda *cuda, attention_params *p, int sequences) {
    if (p->splits <= 1) return LQ_OK;
    const size_t rows_out = (size_t)sequences * p->tokens * p->heads;
    const size_t part_floats = rows_out * p->splits * (size_t)p->head_dim;
    void *workspace = NULL;
    int rc = lq_cuda_slot(cuda, LQ_CUDA_ATTENTION,
                          (part_floats + rows_out * p->splits * 2) * sizeof(float), &workspace);
    if (rc) return rc;
    p->part_out = (float *)workspace;
    p->part_stats = p->part_out + part_floats;
    return LQ_OK;
}

// With p.splits > 1: attention_combine over every output row.
int launch_combine(struct lq_cuda *cuda, const attention_params &p, int sequences) {
    if (p.splits <= 1) return LQ_OK;
    const size_t rows_out = (size_t)sequences * p.tokens * p.heads;
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, attention_combine, dim3((unsigned)rows_out), dim3(THREADS),
                              0, cuda->stream, p),
                "attention combine");
    return LQ_OK;
}

// How many splits of the keys: fewer than two blocks per SM leaves most of the GPU idle, so
// split then, aiming at four blocks per SM, each split at least MIN_SPLIT_KEYS; a grid that is
// already about full gains nothing from a combine.
int split_count(const struct lq_cuda *cuda, long long blocks, int sequences, int keys) {
    const long long sms = cuda->sm_count > 0 ? cuda->sm_count : 1, target = 4 * sms;
    if (blocks >= 2 * sms) return 1;
    long long want = (target + blocks - 1) / blocks;
    const int by_keys = ceil_div(keys, MIN_SPLIT_KEYS), by_grid = 65535 / sequences;
    if (want > by_keys) want = by_keys;
    if (want > MAX_SPLITS) want = MAX_SPLITS;
    if (want > by_grid) want = by_grid;
    return want < 1 ? 1 : (int)want;
}

template <int M, int G> void (*decode_kernel_for_rows(void))(lq_ad_args) {
    if constexpr (M * G > LQ_AD_MAX_ROWS_CHUNKS)
        return nullptr;
    else
        return attention_decode<M, G>;
}

template <int M> void (*decode_kernel_for(int rows))(lq_ad_args) {
    return rows == 1   ? decode_kernel_for_rows<M, 1>()
           : rows == 2 ? decode_kernel_for_rows<M, 2>()
           : rows == 4 ? decode_kernel_for_rows<M, 4>()
                       : decode_kernel_for_rows<M, 8>();
}

// The one-token kernel (attention_decode_kernel.h) where it applies: one token per sequence,
// float4 rows, head_dim <= 256, the group's q rows times head_dim chunks within its registers,
// a split's scores within its shared memory; 1 (nothing queued) where it does not, and with
// LQ_CUDA_ATTENTION_DECODE=0 (read on every call).
int attention_decode_run(struct lq_cuda *cuda, attention_params p, int sequences, int keys) {
    const char *choice = getenv("LQ_CUDA_ATTENTION_DECODE");
    if (choice && strcmp(choice, "0") == 0) return 1;
    const int chunks = lq_ad_chunks(p.head_dim), rows = lq_ad_rows(p.group);
    if (p.tokens != 1 || !p.vec || chunks == 0 || rows == 0 ||
        chunks * rows > LQ_AD_MAX_ROWS_CHUNKS)
        return 1;
    int splits = 0, split_len = 0;
    if (lq_ad_plan(keys, rows,
                   split_count(cuda, (long long)p.kv_heads * sequences, sequences, keys), sequences,
                   MAX_SPLITS, &splits, &split_len))
        return 1;
    p.splits = splits, p.split_len = split_len;
    int rc = split_workspace(cuda, &p, sequences);
    if (rc) return rc;

    lq_ad_args a = {};
    a.q = p.q, a.out = p.out;
    a.k_cache = p.k_cache, a.v_cache = p.v_cache, a.start = p.start;
    a.k_caches = p.k_caches, a.v_caches = p.v_caches, a.positions = p.positions;
    a.k_new = p.k_new, a.v_new = p.v_new;
    a.heads = p.heads, a.kv_heads = p.kv_heads, a.head_dim = p.head_dim, a.group = p.group;
    a.splits = p.splits, a.split_len = p.split_len, a.scale = p.scale;
    a.part_out = p.part_out, a.part_stats = p.part_stats;
    a.rope = p.rope;
    void (*kernel)(lq_ad_args) = chunks == 1   ? decode_kernel_for<1>(rows)
                                 : chunks == 2 ? decode_kernel_for<2>(rows)
                                 : chunks == 4 ? decode_kernel_for<4>(rows)
                                               : decode_kernel_for<8>(rows);
    const size_t bytes = lq_ad_shared_floats(rows, p.head_dim, split_len) * sizeof(float);
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, kernel,
                              dim3((unsigned)p.kv_heads, (unsigned)(sequences * splits)),
                              dim3(LQ_AD_THREADS), bytes, cuda->stream, a),
                "attention (one token)");
    return launch_combine(cuda, p, sequences);
}

// Chooses the kernel (one token: attention_decode_run), the tile shape and the split of the
// keys, then runs the tile kernel and, when the keys were split, the combine. p holds
// everything but splits, split_len and the workspace. keys: the longest sequence's keys (its
// last position + 1).
int attention_run(struct lq_cuda *cuda, attention_params p, int sequences, int keys) {
    const int decoded = attention_decode_run(cuda, p, sequences, keys);
    if (decoded <= 0) return decoded;
    const int hd = p.head_dim;
    const int dpt = hd <= 16 ? 1 : hd <= 32 ? 2 : hd <= 64 ? 4 : hd <= 128 ? 8 : 16;
    const int kpt = dpt == 16 ? 2 : 4, key_tile = 16 * kpt;

    // 32-row tiles when a kv head has more than 8 rows per sequence, if the device has the
    // shared memory for them
    int shared_max = 0;
    LQ_CUDA_TRY(
        cudaDeviceGetAttribute(&shared_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, cuda->device),
        "attention shared memory limit");
    const int rows = p.tokens * p.group;
    int rpt = rows > 8 ? 4 : 1;
    if (rpt == 4 && (size_t)tile_floats(4, dpt, kpt) * sizeof(float) > (size_t)shared_max) rpt = 1;
    if ((size_t)tile_floats(rpt, dpt, kpt) * sizeof(float) > (size_t)shared_max) {
        fprintf(stderr,
                "lqd: cuda: attention: head_dim %d needs more shared memory than the "
                "device's %d bytes per block\n",
                hd, shared_max);
        return LQ_EUNSUPPORTED;
    }
    const int tiles = ceil_div(rows, 8 * rpt);

    int splits = split_count(cuda, (long long)tiles * p.kv_heads * sequences, sequences, keys);
    p.split_len = ceil_div(ceil_div(keys, splits), key_tile) * key_tile;
    splits = ceil_div(keys, p.split_len);
    p.splits = splits;

    int rc = split_workspace(cuda, &p, sequences);
    if (rc) return rc;
    const int z = sequences * splits;
    rc = rpt == 4 ? launch_rows<4>(cuda, p, dpt, tiles, z) : launch_rows<1>(cuda, p, dpt, tiles, z);
    if (rc) return rc;
    return launch_combine(cuda, p, sequences);
}

// The checks both entry points share; fills the shape fields of p.
int attention_shape(attention_params *p, int heads, int kv_heads, int head_dim) {
    if (heads <= 0 || kv_heads <= 0 || head_dim <= 0 || heads % kv_heads != 0) return LQ_EINVAL;
    if (head_dim > MAX_HEAD_DIM) return LQ_EUNSUPPORTED;
    p->heads = heads;
    p->kv_heads = kv_heads;
    p->head_dim = head_dim;
    p->group = heads / kv_heads;
    p->scale = 1.0f / sqrtf((float)head_dim); // the CPU's scale, to the bit
    return LQ_OK;
}

} // namespace

int lq_cuda_attention(struct lq_backend *backend, const float *q, const float *k_cache,
                      const float *v_cache, int n, int start, int heads, int kv_heads, int head_dim,
                      float *out) {
    if (n < 0 || start < 0) return LQ_EINVAL;
    attention_params p = {};
    int rc = attention_shape(&p, heads, kv_heads, head_dim);
    if (rc || n == 0) return rc;
    p.q = q;
    p.out = out;
    p.k_cache = k_cache;
    p.v_cache = v_cache;
    p.start = start;
    p.tokens = n;
    p.vec = head_dim % 4 == 0 && aligned16(q) && aligned16(out) && aligned16(k_cache) &&
            aligned16(v_cache);
    return attention_run(lq_cuda_of(backend), p, 1, start + n);
}

namespace {

// The parameters of a batched step (attention_batch with its arrays on the device).
int batch_params(attention_params *p, const float *q, const float *k_new, const float *v_new,
                 float *const *k_caches, float *const *v_caches, const int *positions, int heads,
                 int kv_heads, int head_dim, bool caches_aligned, float *out) {
    int rc = attention_shape(p, heads, kv_heads, head_dim);
    if (rc) return rc;
    p->q = q;
    p->out = out;
    p->k_caches = k_caches;
    p->v_caches = v_caches;
    p->positions = positions;
    p->k_new = k_new;
    p->v_new = v_new;
    p->tokens = 1;
    p->vec = head_dim % 4 == 0 && caches_aligned && aligned16(q) && aligned16(out) &&
             aligned16(k_new) && aligned16(v_new);
    return LQ_OK;
}

// attention_batch with its arrays on the device: the entry points below.
int attention_batch_run(struct lq_cuda *cuda, const float *q, const float *k_new,
                        const float *v_new, float *const *k_caches, float *const *v_caches,
                        const int *positions, int n, int heads, int kv_heads, int head_dim,
                        int keys, bool caches_aligned, float *out) {
    attention_params p = {};
    int rc = batch_params(&p, q, k_new, v_new, k_caches, v_caches, positions, heads, kv_heads,
                          head_dim, caches_aligned, out);
    if (rc || n == 0) return rc;
    return attention_run(cuda, p, n, keys);
}

} // namespace

int lq_cuda_attention_batch_device(struct lq_backend *backend, const float *q, const float *k_new,
                                   const float *v_new, float *const *k_caches,
                                   float *const *v_caches, const int *positions, int n, int heads,
                                   int kv_heads, int head_dim, int keys_bound, float *out) {
    if (n < 0 || keys_bound < 1) return LQ_EINVAL;
    if (n > 65535) return LQ_EUNSUPPORTED; // grid.z
    // the caches' alignment cannot be checked here: lqd's come from cudaMalloc (256-byte
    // aligned), and a cache row is kv_heads * head_dim floats, a multiple of 4 when head_dim is
    return attention_batch_run(lq_cuda_of(backend), q, k_new, v_new, k_caches, v_caches, positions,
                               n, heads, kv_heads, head_dim, keys_bound, true, out);
}

int lq_cuda_attention_batch(struct lq_backend *backend, const float *q, const float *k_new,
                            const float *v_new, float *const *k_caches, float *const *v_caches,
                            const int *positions, int n, int heads, int kv_heads, int head_dim,
                            float *out) {
    if (n < 0) return LQ_EINVAL;
    if (n > 65535) return LQ_EUNSUPPORTED; // grid.z
    int keys = 0;
    bool aligned = true;
    for (int i = 0; i < n; i++) {
        if (positions[i] < 0 || !k_caches[i] || !v_caches[i]) return LQ_EINVAL;
        if (positions[i] + 1 > keys) keys = positions[i] + 1;
        aligned = aligned && aligned16(k_caches[i]) && aligned16(v_caches[i]);
    }
    if (n == 0) // the shape checks alone
        return attention_batch_run(lq_cuda_of(backend), q, k_new, v_new, NULL, NULL, NULL, 0, heads,
                                   kv_heads, head_dim, 1, aligned, out);
    struct lq_cuda *cuda = lq_cuda_of(backend);
    void *device_k = NULL, *device_v = NULL, *device_positions = NULL;
    const size_t pointer_bytes = (size_t)n * sizeof(float *);
    int rc;
    if ((rc = lq_cuda_stage(cuda, LQ_CUDA_STAGE_0, k_caches, pointer_bytes, &device_k)) ||
        (rc = lq_cuda_stage(cuda, LQ_CUDA_STAGE_1, v_caches, pointer_bytes, &device_v)) ||
        (rc = lq_cuda_stage(cuda, LQ_CUDA_STAGE_2, positions, (size_t)n * sizeof(int),
                            &device_positions)))
        return rc;
    return attention_batch_run(cuda, q, k_new, v_new, (float *const *)device_k,
                               (float *const *)device_v, (const int *)device_positions, n, heads,
                               kv_heads, head_dim, keys, aligned, out);
}

int lq_cuda_rope_attention_batch_device(struct lq_backend *backend, float *q, float *k_new,
                                        const float *v_new, float *const *k_caches,
                                        float *const *v_caches, const int *positions, int n,
                                        int heads, int kv_heads, int head_dim, int keys_bound,
                                        float theta, float *out) {
    if (n < 0 || keys_bound < 1) return LQ_EINVAL;
    if (n > 65535) return LQ_EUNSUPPORTED; // grid.z
    struct lq_cuda *cuda = lq_cuda_of(backend);
    const char *fused = getenv("LQ_CUDA_ROPE_FUSED"); // 0: apart (read on every call)
    if (n > 0 && lq_ad_rope_fits(head_dim) && !(fused && strcmp(fused, "0") == 0)) {
        attention_params p = {};
        int rc = batch_params(&p, q, k_new, v_new, k_caches, v_caches, positions, heads, kv_heads,
                              head_dim, true, out); // the caches: as attention_batch_device
        if (rc) return rc;
        p.rope.on = 1;
        p.rope.table = lq_cuda_rope_cos_sin(cuda, theta, head_dim, &p.rope.positions);
        p.rope.theta = theta;
        rc = attention_decode_run(cuda, p, n, keys_bound);
        if (rc <= 0) return rc; // ran (or failed); 1: the one-token kernel does not apply
    }
    int rc =
        lq_cuda_rope_qk_device(backend, q, heads, k_new, kv_heads, n, head_dim, positions, theta);
    return rc ? rc
              : lq_cuda_attention_batch_device(backend, q, k_new, v_new, k_caches, v_caches,
                                               positions, n, heads, kv_heads, head_dim, keys_bound,
                                               out);
}
