// The tiled backward of causal grouped-query attention (FlashAttention-2 style), in fp32, for
// head_dim up to 256. Same contract, formulas and row statistics as the untiled kernels of
// attention_backward_cuda.cu (which picks between them): with P = softmax(scale · q·k),
// dP = dO·Vᵀ, D_i = Σ_t P_it dP_it,
//   dS = P ⊙ (dP − D),  dQ = scale · dS · K,  dK = scale · Σ_group dSᵀ · Q,  dV = Σ_group Pᵀ · dO.
//
// Tiles of T rows (64, or 32 at head_dim 256) of q, dO, k and v sit in shared memory, zero
// padded to HD columns (64, 128 or 256) and past the sequence's end, so no inner loop checks
// bounds; the causal mask and the row limit are applied to the scores only.
//   1. stats_kernel, one CTA per (query tile, head, sequence): walks the key tiles up to the
//      diagonal with an online softmax that also carries a = Σ exp(s − m) dP, and writes
//      {M, 1/Σ, D} per (row, head) to the workspace (the untiled kernels' layout).
//   2. keys_kernel, one CTA per (key tile, head, sequence): walks the query tiles from the
//      diagonal on, recomputing P and dS from the stats, and accumulates that head's dK and dV
//      tile in registers. With one head per KV head they go straight to dk, dv; with GQA each
//      head's tile goes to the workspace and reduce_kernel sums a group's heads in head order
//      (one CTA per key tile and head keeps the grid as wide and as balanced as without GQA).
//   3. queries_kernel, one CTA per (query tile, head, sequence): walks the key tiles up to the
//      diagonal and accumulates dQ in registers.
// Deterministic: no atomics, every sum in an order fixed by the shapes alone.
//
// Inside a CTA (256 threads, ty = thread / 16, tx = thread % 16): a thread computes the scores
// of rows ty + 16a and columns tx + 16b of a T x T tile (a, b < T/16), reading float4s along
// the head dimension (a row stride of HD + 4 floats makes the 16 rows a warp reads fall in
// distinct banks). It accumulates output rows ty + 16a, columns 64j + 4tx + e (j < HD/64, e <
// 4): a warp's float4 reads of a tile row are contiguous.
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/cuda_internal.h"

namespace {

constexpr int THREADS = 256;

template <int HD> struct tiling {
    static constexpr int T = HD >= 256 ? 32 : 64; // rows per tile (queries or keys)
    static constexpr int HDS = HD + 4;            // shared row stride of q, dO, k, v tiles
    static constexpr int TS = T + 4;              // shared row stride of P and dS tiles
    static constexpr int R = T / 16;              // score rows (and columns) per thread
    static constexpr int CJ = HD / 64;            // float4 column groups per thread
    static constexpr size_t TILE = (size_t)T * HDS;
};

struct tiled_params {
    const float *q, *k, *v, *dout;
    float *dq, *dk, *dv;
    float4 *stats;  // per (sequence * n + row) * heads + head: {max, 1/sum, D, 0}
    float *partial; // GQA: per-head dK, dV tiles, [batch * n, heads * head_dim] each
    int n, heads, kv_heads, head_dim, group, tiles;
    size_t q_ld, kv_ld;
    float scale;
};

// dst[r][d] = src[(first + r) * ld + d] for r < T, d < HD; zero past n rows or head_dim
// columns. src points at the sequence's row 0, head column offset applied.
template <int HD>
__device__ __forceinline__ void load_tile(float *dst, const float *__restrict__ src, size_t ld,
                                          int first, int n, int hd) {
    using C = tiling<HD>;
    for (int index = (int)threadIdx.x; index < C::T * HD; index += THREADS) {
        const int r = index / HD, d = index % HD, row = first + r;
        dst[r * C::HDS + d] = row < n && d < hd ? __ldg(src + (size_t)row * ld + d) : 0.0f;
    }
}

// dst[r] = the stats of query first + r and head h for r < T (zeros past n rows): a query
// tile's. first_row: the sequence's row 0.
template <int HD>
__device__ __forceinline__ void load_stats(float4 *dst, const float4 *stats, int heads, int h,
                                           size_t first_row, int first, int n) {
    for (int r = (int)threadIdx.x; r < tiling<HD>::T; r += THREADS) {
        const int i = first + r;
        dst[r] = i < n ? stats[(first_row + i) * heads + h] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// acc[a][b] = A[ty + 16a] · B[tx + 16b], the rows of two shared tiles, summed along the head
// dimension in order.
template <int HD>
__device__ __forceinline__ void tile_dots(const float *A, const float *B, int ty, int tx,
                                          float (&acc)[tiling<HD>::R][tiling<HD>::R]) {
    using C = tiling<HD>;
#pragma unroll
    for (int a = 0; a < C::R; a++)
#pragma unroll
        for (int b = 0; b < C::R; b++) acc[a][b] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < HD; d += 4) {
        float4 x[C::R], y[C::R];
#pragma unroll
        for (int a = 0; a < C::R; a++)
            x[a] = *reinterpret_cast<const float4 *>(A + (ty + 16 * a) * C::HDS + d);
#pragma unroll
        for (int b = 0; b < C::R; b++)
            y[b] = *reinterpret_cast<const float4 *>(B + (tx + 16 * b) * C::HDS + d);
#pragma unroll
        for (int a = 0; a < C::R; a++)
#pragma unroll
            for (int b = 0; b < C::R; b++) {
                float s = acc[a][b];
                s = fmaf(x[a].x, y[b].x, s);
                s = fmaf(x[a].y, y[b].y, s);
                s = fmaf(x[a].z, y[b].z, s);
                s = fmaf(x[a].w, y[b].w, s);
                acc[a][b] = s;
            }
    }
}

// out[a][j][e] += Σ_k W[k][ty + 16a] · X[k][64j + 4tx + e] over the T rows k of the shared
// tiles W (stride TS) and X (stride HDS), in order.
template <int HD>
__device__ __forceinline__ void tile_accumulate(const float *W, const float *X, int ty, int tx,
                                                float (&out)[tiling<HD>::R][tiling<HD>::CJ][4]) {
    using C = tiling<HD>;
#pragma unroll 2
    for (int k = 0; k < C::T; k++) {
        float w[C::R];
#pragma unroll
        for (int a = 0; a < C::R; a++) w[a] = W[k * C::TS + ty + 16 * a];
#pragma unroll
        for (int j = 0; j < C::CJ; j++) {
            const float4 x = *reinterpret_cast<const float4 *>(X + k * C::HDS + 64 * j + 4 * tx);
#pragma unroll
            for (int a = 0; a < C::R; a++) {
                out[a][j][0] = fmaf(w[a], x.x, out[a][j][0]);
                out[a][j][1] = fmaf(w[a], x.y, out[a][j][1]);
                out[a][j][2] = fmaf(w[a], x.z, out[a][j][2]);
                out[a][j][3] = fmaf(w[a], x.w, out[a][j][3]);
            }
        }
    }
}

// row[64j + 4tx + e] = factor · out[a][j][e] for the columns below head_dim.
template <int HD>
__device__ __forceinline__ void store_row(float *row, int tx, int hd, float factor,
                                          const float (&out)[tiling<HD>::CJ][4]) {
#pragma unroll
    for (int j = 0; j < tiling<HD>::CJ; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int c = 64 * j + 4 * tx + e;
            if (c < hd) row[c] = factor * out[j][e];
        }
}

// Grid (tiles, heads, sequences), query tiles longest first. Shared: q, dO, k, v tiles.
template <int HD> __global__ void __launch_bounds__(THREADS) stats_kernel(tiled_params p) {
    using C = tiling<HD>;
    extern __shared__ float4 shared4[];
    float *sq = reinterpret_cast<float *>(shared4), *sdo = sq + C::TILE, *sk = sdo + C::TILE,
          *sv = sk + C::TILE;
    const int qt = p.tiles - 1 - (int)blockIdx.x, h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int g = h / p.group, hd = p.head_dim, n = p.n;
    const int ty = (int)threadIdx.x / 16, tx = (int)threadIdx.x % 16;
    const size_t first_row = (size_t)b * n;
    load_tile<HD>(sq, p.q + first_row * p.q_ld + (size_t)h * hd, p.q_ld, qt * C::T, n, hd);
    load_tile<HD>(sdo, p.dout + first_row * p.q_ld + (size_t)h * hd, p.q_ld, qt * C::T, n, hd);
    const float *k0 = p.k + first_row * p.kv_ld + (size_t)g * hd;
    const float *v0 = p.v + first_row * p.kv_ld + (size_t)g * hd;

    float m[C::R], l[C::R], acc[C::R];
#pragma unroll
    for (int a = 0; a < C::R; a++) m[a] = -INFINITY, l[a] = 0.0f, acc[a] = 0.0f;
    for (int kt = 0; kt <= qt; kt++) {
        __syncthreads(); // the previous key tile is no longer read
        load_tile<HD>(sk, k0, p.kv_ld, kt * C::T, n, hd);
        load_tile<HD>(sv, v0, p.kv_ld, kt * C::T, n, hd);
        __syncthreads();
        float s[C::R][C::R], dp[C::R][C::R];
        tile_dots<HD>(sq, sk, ty, tx, s);
        tile_dots<HD>(sdo, sv, ty, tx, dp);
#pragma unroll
        for (int a = 0; a < C::R; a++) {
            const int i = qt * C::T + ty + 16 * a;
            float tile_max = -INFINITY;
#pragma unroll
            for (int bb = 0; bb < C::R; bb++) {
                const int t = kt * C::T + tx + 16 * bb;
                s[a][bb] *= p.scale;
                if (i < n && t <= i) tile_max = fmaxf(tile_max, s[a][bb]);
            }
            if (tile_max == -INFINITY) continue; // none of this thread's keys count
            const float m_new = fmaxf(m[a], tile_max), c = expf(m[a] - m_new); // 0 from −∞
            l[a] *= c, acc[a] *= c, m[a] = m_new;
#pragma unroll
            for (int bb = 0; bb < C::R; bb++) {
                const int t = kt * C::T + tx + 16 * bb;
                if (i < n && t <= i) {
                    const float e = expf(s[a][bb] - m_new);
                    l[a] += e, acc[a] = fmaf(e, dp[a][bb], acc[a]);
                }
            }
        }
    }
    // The 16 threads of a row (tx, one half-warp) merge their partial softmaxes.
#pragma unroll
    for (int a = 0; a < C::R; a++)
#pragma unroll
        for (int offset = 1; offset < 16; offset <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m[a], offset);
            const float l2 = __shfl_xor_sync(0xffffffffu, l[a], offset);
            const float a2 = __shfl_xor_sync(0xffffffffu, acc[a], offset);
            const float M = fmaxf(m[a], m2);
            const bool any = M != -INFINITY;
            const float c1 = any ? expf(m[a] - M) : 0.0f, c2 = any ? expf(m2 - M) : 0.0f;
            l[a] = l[a] * c1 + l2 * c2, acc[a] = acc[a] * c1 + a2 * c2, m[a] = M;
        }
    if (tx == 0)
#pragma unroll
        for (int a = 0; a < C::R; a++) {
            const int i = qt * C::T + ty + 16 * a;
            if (i >= n) continue;
            const float inverse = 1.0f / l[a];
            p.stats[(first_row + i) * p.heads + h] =
                make_float4(m[a], inverse, acc[a] * inverse, 0.0f);
        }
}

// Grid (tiles, heads, sequences), key tiles longest first (tile 0 sees every query tile).
// Shared: k, v, q, dO tiles, P and dS tiles [query][key], the query tile's stats.
template <int HD> __global__ void __launch_bounds__(THREADS) keys_kernel(tiled_params p) {
    using C = tiling<HD>;
    extern __shared__ float4 shared4[];
    float *sk = reinterpret_cast<float *>(shared4), *sv = sk + C::TILE, *sq = sv + C::TILE,
          *sdo = sq + C::TILE, *sp = sdo + C::TILE, *sds = sp + C::T * C::TS;
    float4 *sstats = reinterpret_cast<float4 *>(sds + C::T * C::TS);
    const int kt = (int)blockIdx.x, h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int g = h / p.group, hd = p.head_dim, n = p.n;
    const int ty = (int)threadIdx.x / 16, tx = (int)threadIdx.x % 16;
    const size_t first_row = (size_t)b * n;
    load_tile<HD>(sk, p.k + first_row * p.kv_ld + (size_t)g * hd, p.kv_ld, kt * C::T, n, hd);
    load_tile<HD>(sv, p.v + first_row * p.kv_ld + (size_t)g * hd, p.kv_ld, kt * C::T, n, hd);
    const float *q0 = p.q + first_row * p.q_ld + (size_t)h * hd;
    const float *do0 = p.dout + first_row * p.q_ld + (size_t)h * hd;

    float dk[C::R][C::CJ][4], dv[C::R][C::CJ][4];
#pragma unroll
    for (int a = 0; a < C::R; a++)
#pragma unroll
        for (int j = 0; j < C::CJ; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk[a][j][e] = 0.0f, dv[a][j][e] = 0.0f;
    for (int qt = kt; qt < p.tiles; qt++) {
        __syncthreads(); // the previous query tile, P and dS are no longer read
        load_tile<HD>(sq, q0, p.q_ld, qt * C::T, n, hd);
        load_tile<HD>(sdo, do0, p.q_ld, qt * C::T, n, hd);
        load_stats<HD>(sstats, p.stats, p.heads, h, first_row, qt * C::T, n);
        __syncthreads();
        float s[C::R][C::R], dp[C::R][C::R];
        tile_dots<HD>(sk, sq, ty, tx, s); // key ty + 16a, query tx + 16b
        tile_dots<HD>(sv, sdo, ty, tx, dp);
#pragma unroll
        for (int a = 0; a < C::R; a++)
#pragma unroll
            for (int bb = 0; bb < C::R; bb++) {
                const int key = ty + 16 * a, query = tx + 16 * bb;
                const int t = kt * C::T + key, i = qt * C::T + query;
                const float4 st = sstats[query];
                float prob = 0.0f, ds = 0.0f;
                if (i < n && t <= i) {
                    prob = expf(s[a][bb] * p.scale - st.x) * st.y;
                    ds = prob * (dp[a][bb] - st.z);
                }
                sp[query * C::TS + key] = prob;
                sds[query * C::TS + key] = ds;
            }
        __syncthreads();
        tile_accumulate<HD>(sp, sdo, ty, tx, dv);
        tile_accumulate<HD>(sds, sq, ty, tx, dk);
    }
#pragma unroll
    for (int a = 0; a < C::R; a++) {
        const int t = kt * C::T + ty + 16 * a;
        if (t >= n) continue;
        const size_t row = first_row + t;
        if (p.group == 1) {
            store_row<HD>(p.dk + row * p.kv_ld + (size_t)g * hd, tx, hd, p.scale, dk[a]);
            store_row<HD>(p.dv + row * p.kv_ld + (size_t)g * hd, tx, hd, 1.0f, dv[a]);
        } else {
            const size_t rows = (size_t)gridDim.z * n; // the dK partials, then the dV ones
            float *partial = p.partial + row * p.q_ld + (size_t)h * hd;
            store_row<HD>(partial, tx, hd, 1.0f, dk[a]);
            store_row<HD>(partial + rows * p.q_ld, tx, hd, 1.0f, dv[a]);
        }
    }
}

// GQA: dk = scale · Σ_group partial dK, dv = Σ_group partial dV, heads in order. One thread
// per (row, kv column).
__global__ void __launch_bounds__(THREADS) reduce_kernel(tiled_params p, size_t rows) {
    const size_t index = (size_t)blockIdx.x * THREADS + threadIdx.x;
    if (index >= rows * p.kv_ld) return;
    const size_t row = index / p.kv_ld;
    const int column = (int)(index % p.kv_ld), g = column / p.head_dim, c = column % p.head_dim;
    const float *k_part = p.partial + row * p.q_ld + (size_t)g * p.group * p.head_dim + c;
    const float *v_part = k_part + rows * p.q_ld;
    float sum_k = 0.0f, sum_v = 0.0f;
    for (int hh = 0; hh < p.group; hh++) {
        sum_k += k_part[(size_t)hh * p.head_dim];
        sum_v += v_part[(size_t)hh * p.head_dim];
    }
    p.dk[index] = p.scale * sum_k;
    p.dv[index] = sum_v;
}

// Grid (tiles, heads, sequences), query tiles longest first. Shared: q, dO, k, v tiles, the dS
// tile [key][query], the query tile's stats.
template <int HD> __global__ void __launch_bounds__(THREADS) queries_kernel(tiled_params p) {
    using C = tiling<HD>;
    extern __shared__ float4 shared4[];
    float *sq = reinterpret_cast<float *>(shared4), *sdo = sq + C::TILE, *sk = sdo + C::TILE,
          *sv = sk + C::TILE, *sds = sv + C::TILE;
    float4 *sstats = reinterpret_cast<float4 *>(sds + C::T * C::TS);
    const int qt = p.tiles - 1 - (int)blockIdx.x, h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int g = h / p.group, hd = p.head_dim, n = p.n;
    const int ty = (int)threadIdx.x / 16, tx = (int)threadIdx.x % 16;
    const size_t first_row = (size_t)b * n;
    load_tile<HD>(sq, p.q + first_row * p.q_ld + (size_t)h * hd, p.q_ld, qt * C::T, n, hd);
    load_tile<HD>(sdo, p.dout + first_row * p.q_ld + (size_t)h * hd, p.q_ld, qt * C::T, n, hd);
    load_stats<HD>(sstats, p.stats, p.heads, h, first_row, qt * C::T, n);
    const float *k0 = p.k + first_row * p.kv_ld + (size_t)g * hd;
    const float *v0 = p.v + first_row * p.kv_ld + (size_t)g * hd;

    float dq[C::R][C::CJ][4];
#pragma unroll
    for (int a = 0; a < C::R; a++)
#pragma unroll
        for (int j = 0; j < C::CJ; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) dq[a][j][e] = 0.0f;
    for (int kt = 0; kt <= qt; kt++) {
        __syncthreads(); // the previous key tile and dS are no longer read
        load_tile<HD>(sk, k0, p.kv_ld, kt * C::T, n, hd);
        load_tile<HD>(sv, v0, p.kv_ld, kt * C::T, n, hd);
        __syncthreads();
        float s[C::R][C::R], dp[C::R][C::R];
        tile_dots<HD>(sq, sk, ty, tx, s); // query ty + 16a, key tx + 16b
        tile_dots<HD>(sdo, sv, ty, tx, dp);
#pragma unroll
        for (int a = 0; a < C::R; a++)
#pragma unroll
            for (int bb = 0; bb < C::R; bb++) {
                const int query = ty + 16 * a, key = tx + 16 * bb;
                const int i = qt * C::T + query, t = kt * C::T + key;
                const float4 st = sstats[query];
                float ds = 0.0f;
                if (i < n && t <= i)
                    ds = expf(s[a][bb] * p.scale - st.x) * st.y * (dp[a][bb] - st.z);
                sds[key * C::TS + query] = ds;
            }
        __syncthreads();
        tile_accumulate<HD>(sds, sk, ty, tx, dq);
    }
#pragma unroll
    for (int a = 0; a < C::R; a++) {
        const int i = qt * C::T + ty + 16 * a;
        if (i < n)
            store_row<HD>(p.dq + (first_row + i) * p.q_ld + (size_t)h * hd, tx, hd, p.scale, dq[a]);
    }
}

template <int HD> size_t stats_shared() {
    return 4 * tiling<HD>::TILE * sizeof(float);
}
template <int HD> size_t keys_shared() {
    using C = tiling<HD>;
    return (4 * C::TILE + 2 * (size_t)C::T * C::TS) * sizeof(float) + C::T * sizeof(float4);
}
template <int HD> size_t queries_shared() {
    using C = tiling<HD>;
    return (4 * C::TILE + (size_t)C::T * C::TS) * sizeof(float) + C::T * sizeof(float4);
}

template <int HD> int launch(struct lq_cuda *cuda, tiled_params p, int batch) {
    // keys_kernel needs the most; a device with less (sm_80's 163 KiB at head_dim 128) is
    // left to the untiled kernels
    int optin = 0;
    LQ_CUDA_TRY(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cuda->device),
        "attention backward: shared memory per block");
    if (keys_shared<HD>() > (size_t)optin) return LQ_EUNSUPPORTED;
    p.tiles = (p.n + tiling<HD>::T - 1) / tiling<HD>::T;
    const dim3 grid((unsigned)p.tiles, (unsigned)p.heads, (unsigned)batch);
    // beyond 48 KiB of dynamic shared memory a kernel must opt in
    LQ_CUDA_TRY(cudaFuncSetAttribute(stats_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)stats_shared<HD>()),
                "attention backward (stats): shared memory");
    LQ_CUDA_TRY(cudaFuncSetAttribute(keys_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)keys_shared<HD>()),
                "attention backward (keys): shared memory");
    LQ_CUDA_TRY(cudaFuncSetAttribute(queries_kernel<HD>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)queries_shared<HD>()),
                "attention backward (queries): shared memory");
    stats_kernel<HD><<<grid, THREADS, stats_shared<HD>(), cuda->stream>>>(p);
    LQ_CUDA_LAUNCHED("attention backward (stats)");
    keys_kernel<HD><<<grid, THREADS, keys_shared<HD>(), cuda->stream>>>(p);
    LQ_CUDA_LAUNCHED("attention backward (keys)");
    if (p.group > 1) {
        const size_t rows = (size_t)batch * p.n, count = rows * p.kv_ld;
        reduce_kernel<<<(unsigned)((count + THREADS - 1) / THREADS), THREADS, 0, cuda->stream>>>(
            p, rows);
        LQ_CUDA_LAUNCHED("attention backward (group sums)");
    }
    queries_kernel<HD><<<grid, THREADS, queries_shared<HD>(), cuda->stream>>>(p);
    LQ_CUDA_LAUNCHED("attention backward (queries)");
    return LQ_OK;
}

} // namespace

int lq_cuda_attention_backward_tiled(struct lq_cuda *cuda, const float *q, const float *k,
                                     const float *v, const float *dout, int batch, int n, int heads,
                                     int kv_heads, int head_dim, float *dq, float *dk, float *dv) {
    if (head_dim > LQ_CUDA_ATTENTION_BACKWARD_TILED_MAX_HEAD_DIM) return LQ_EUNSUPPORTED;
    tiled_params p;
    p.q = q, p.k = k, p.v = v, p.dout = dout;
    p.dq = dq, p.dk = dk, p.dv = dv;
    p.n = n, p.heads = heads, p.kv_heads = kv_heads, p.head_dim = head_dim;
    p.group = heads / kv_heads, p.tiles = 0;
    p.q_ld = (size_t)heads * head_dim, p.kv_ld = (size_t)kv_heads * head_dim;
    p.scale = 1.0f / sqrtf((float)head_dim); // the CPU's scale, to the bit
    // the stats, then (GQA) the per-head dK and dV partials, in one workspace
    const size_t rows = (size_t)batch * n;
    const size_t stats_bytes = rows * heads * sizeof(float4);
    const size_t partial_bytes = p.group > 1 ? 2 * rows * p.q_ld * sizeof(float) : 0;
    void *workspace = NULL;
    int rc = lq_cuda_slot(cuda, LQ_CUDA_ATTENTION, stats_bytes + partial_bytes, &workspace);
    if (rc) return rc;
    p.stats = (float4 *)workspace;
    p.partial = p.group > 1 ? (float *)((char *)workspace + stats_bytes) : NULL;
    if (head_dim <= 64) return launch<64>(cuda, p, batch);
    if (head_dim <= 128) return launch<128>(cuda, p, batch);
    return launch<256>(cuda, p, batch);
}
