// LQ layers at small batches (8 < n <= 64 tokens: batched decode) on tensor cores, reading the
// packed Q once per call and never writing a dequantized copy of it anywhere.
//
// y[n, rows] = x · Qᵀ + (x · L2ᵀ) · L1ᵀ, with Q packed as core/nf.h lays it out. Per call:
//   1. (rank > 0) t = x · L2ᵀ [n, rank] in fp32: lq_lowrank_project_kernel, one launch of a CTA
//      per (rank row, 8 tokens). It waits for x's producer and then lets the GEMM launch, so
//      the GEMM stages x at once and waits for t only in its epilogue: the projection runs
//      beside the main loop. (It was cuBLAS past 16 tokens, a skinny SGEMM on a handful of
//      CTAs that no kernel after it could overlap; and x went through a conversion kernel
//      of its own, which the GEMM's staging now does.)
//   2. (the GEMM rounds x to fp16 as it stages it)
//   3. lq_mma_kernel<b0, blocks per chunk, NT>: NT = n padded to 16, 32, 48 or 64 token slots.
//      Grid (row bands of 256) x (splits of K in k-tiles of 128 columns), 8 warps, as many
//      CTAs as the SMs hold at once (one wave: 2 per SM for the 16- and 32-token kernels, whose
//      registers allow it, else 1; lq_mma_plan_for). The CTA stages its K slice of x for all NT
//      tokens in shared memory once (fp16, in fragment order), then each warp streams the packed
//      codes of its 32 rows straight from HBM into registers and dequantizes them INTO mma.sync
//      m16n8k16 A fragments — no dequantized tile exists in shared or global memory, no barrier in
//      the main loop. The trick that makes this possible without re-laying out the weights (what
//      Marlin does offline): a dot product does not care about the order of k, so inside each
//      k-tile the k index that the fragment layout gives lane (g, c) at step s is mapped to column
//      32c + 4s + j of the tile. Lane c of a quad then needs exactly the 32 codes of chunk c
//      of the tile for each of its rows: b0 aligned 32-bit words, one vector load (the same
//      chunks the decode kernels read), fully used. x is staged with the same permutation.
//      Decoding: a per-lane pair table in shared memory, entry (lo | hi << b0) = half2(table[lo],
//      table[hi]) in word entry·32 + lane, so lane l always reads bank l (conflict-free for any
//      codes); per two values one shift, one LOP3, one LDS.32 and one HMUL2 by the block scale.
//      The block scale itself is rebuilt exactly as core/nf.c does (fp32, the FMA-corrected
//      division), then rounded to fp16. Loads for tile k+1 are issued before tile k is decoded.
//      Accumulation in fp32. The low-rank term: split s adds L1[rows, share_s]·t[share_s] for
//      its share of the rank into its accumulators (fp32 FMAs in the fragment layout) before
//      storing, so no separate pass over y is needed.
//   4. (splits > 1) lq_mma_reduce_kernel: y = Σ partials in split order. Deterministic.
//   Kernels 3 and 4 use programmatic dependent launch when available: the GEMM loads its first
//   tile, builds its table, stages x and runs its main loop while the projection runs (without
//   factors it waits for the kernel before it to end before staging x); the reduction is
//   resident when it ends.
//
// Fast path only: b0 in {2, 3, 4}, cols % 32 == 0, B0 a multiple of 32, or 16 (B1 even), or 8
// (B1 % 4 == 0) — every 32-code chunk inside one group — and rows·cols < 2^31; anything else
// (and b0 = 8, whose 65536-entry pair table does not fit) takes the existing paths.
//
// Precision: weights are fp16(fp16(table[code]) · fp16(ŝ)) (<= 1.5 ulp of fp16 from the CPU's
// value, vs 0.5 ulp for the tile path), x is fp16, everything else fp32: ~5e-4 relative L2
// error on random data, under the tests' 4e-3 for the tensor-core paths.
//
// Cost model (H100/H200 per SM and clock: 4 issue slots, 128 B of shared memory, HBM ~16 B at
// full bandwidth, i.e. ~40 weights at 3.2 bits). The main loop is ~560 warp instructions per
// 4096 weights at NT = 16 and ~700 at NT = 64 (SASS of b0 = 3: 64 LDS.32 pair lookups with
// 128 shift/LOP3 and 64 HMUL2, NT·2 LDS.64 of x, NT·2 HMMA.16816, ~250 of loads, scales and
// addresses), so it is issue-bound at ~29 weights per clock at NT = 16 and ~23 at NT = 64,
// where the tensor cores (2·64 FLOP per weight on mma.sync) are about as busy. Shared memory:
// 2 B/weight of pair table + NT/16 B/weight of x. On top, from L2: each CTA's x slice (bands ·
// n·cols·2 bytes in all) and the partials (splits · n·rows·4, written and read). Estimate for
// 11008 x 4096 at ~3.2 bits (17.6 MB, 4.1 µs at 4.25 TB/s): ~6-7 µs at n = 16 (~60% of HBM
// bandwidth), ~9-10 µs at n = 64 (~45%, compute-bound); 4096 x 4096 fares worse (~50% / ~35%)
// as the fixed costs (staging, the reduction, four launches) weigh more. To be measured.
#include <stdint.h>
#include <string.h>

#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/linear_mma_cuda.cuh"

extern "C" {
#include "core/nf.h"
}

// Shared memory kept back from the x slice (the static pair table is counted separately).
#define LQ_MMA_SMEM_RESERVE 1024

static int lq_mma_tokens(int n) {
    return n <= 16 ? 16 : n <= 32 ? 32 : n <= 48 ? 48 : 64;
}

// The kernels were compiled for sm_80 or newer (mma.sync m16n8k16) and load on this device.
static int lq_mma_code_ok(void) {
    static int state = -1; // ops run under the op lock; the answer is the same for every call
    if (state < 0) {
        cudaFuncAttributes attributes;
        state = cudaFuncGetAttributes(&attributes, lq_mma_kernel<4, 1, 16>) == cudaSuccess &&
                attributes.binaryVersion >= 80;
        cudaGetLastError();
    }
    return state;
}

int lq_cuda_linear_mma_supported(struct lq_cuda *cuda, const struct lq_linear *w, int n) {
    (void)cuda;
    if (!w->is_lq || n < 1 || n > LQ_CUDA_MMA_MAX_TOKENS) return 0;
    const int b0 = w->q.config.b0;
    if ((b0 != 2 && b0 != 3 && b0 != 4) || !lq_cuda_blocks_per_chunk(w)) return 0;
    return lq_mma_code_ok();
}

static unsigned lq_mma_grid_for(size_t items, const struct lq_cuda *cuda) {
    const size_t blocks = (items + 255) / 256;
    const size_t cap = (size_t)(cuda->sm_count > 0 ? cuda->sm_count : 1) * 8;
    return (unsigned)(blocks < 1 ? 1 : blocks < cap ? blocks : cap);
}

typedef void (*lq_mma_fn)(lq_mma_args);

// The GEMM kernel for (b0, blocks per chunk, token slots).
template <int BITS, int BPC> static lq_mma_fn lq_mma_kernel_for(int nt) {
    return nt == 16   ? lq_mma_kernel<BITS, BPC, 16>
           : nt == 32 ? lq_mma_kernel<BITS, BPC, 32>
           : nt == 48 ? lq_mma_kernel<BITS, BPC, 48>
                      : lq_mma_kernel<BITS, BPC, 64>;
}
template <int BITS> static lq_mma_fn lq_mma_kernel_for(int bpc, int nt) {
    return bpc == 1   ? lq_mma_kernel_for<BITS, 1>(nt)
           : bpc == 2 ? lq_mma_kernel_for<BITS, 2>(nt)
                      : lq_mma_kernel_for<BITS, 4>(nt);
}
static lq_mma_fn lq_mma_kernel_for(int b0, int bpc, int nt) {
    return b0 == 2   ? lq_mma_kernel_for<2>(bpc, nt)
           : b0 == 3 ? lq_mma_kernel_for<3>(bpc, nt)
                     : lq_mma_kernel_for<4>(bpc, nt);
}

// How many CTAs of a GEMM kernel its registers let an SM hold (at most LQ_MMA_MAX_CTAS_PER_SM;
// 1 when the runtime cannot say), asked once per kernel (ops run under the op lock).
#define LQ_MMA_MAX_CTAS_PER_SM 3
static int lq_mma_ctas_by_registers(lq_mma_fn kernel) {
    static struct {
        lq_mma_fn kernel;
        int ctas;
    } known[3 * 3 * 4];
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        if (known[i].kernel == kernel) return known[i].ctas;
        if (known[i].kernel) continue;
        int ctas = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, LQ_MMA_THREADS, 0) !=
                cudaSuccess ||
            ctas < 1) {
            cudaGetLastError();
            ctas = 1;
        }
        if (ctas > LQ_MMA_MAX_CTAS_PER_SM) ctas = LQ_MMA_MAX_CTAS_PER_SM;
        known[i].kernel = kernel, known[i].ctas = ctas;
        return ctas;
    }
    return 1;
}

// How the GEMM is cut: bands of 256 rows x splits of K, each split a whole number of k-tiles
// whose x slice fits in shared memory. As many splits as fill the SMs with the CTAs they can
// hold at once (one wave): fewer leave SMs without weights to stream (one CTA per SM is 8
// warps, too few loads in flight to keep HBM busy), more add partial sums (n·rows·4 bytes per
// split). Where registers allow 2 or 3 CTAs per SM (the 16- and 32-token kernels), the splits
// double or triple, as long as each CTA's x slice still fits its share of the SM's shared
// memory.
struct lq_mma_plan {
    int nt, bands, splits, tiles_per_split;
    size_t smem;     // dynamic: the x slice
    size_t smem_max; // the most dynamic shared memory a CTA may have (opt-in)
};

static int lq_mma_plan_for(struct lq_cuda *cuda, const struct lq_linear *w, int n, int bpc,
                           lq_mma_plan *plan) {
    int optin = 0;
    LQ_CUDA_TRY(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cuda->device),
        "LQ mma shared memory limit");
    plan->nt = lq_mma_tokens(n);
    const size_t table = ((size_t)1 << (2 * w->q.config.b0)) * 32 * sizeof(uint32_t);
    const size_t tile = (size_t)LQ_MMA_TILE_COLS * plan->nt * sizeof(__half);
    const size_t budget = (size_t)optin > table + LQ_MMA_SMEM_RESERVE + tile
                              ? (size_t)optin - table - LQ_MMA_SMEM_RESERVE
                              : tile; // not reached on sm_80+ (>= 99 KiB)
    const int tiles_fit = (int)(budget / tile);
    const int ktiles = (w->cols / 32 + LQ_MMA_TILE_CHUNKS - 1) / LQ_MMA_TILE_CHUNKS;
    const int sms = cuda->sm_count > 0 ? cuda->sm_count : 1;
    plan->bands = (w->rows + LQ_MMA_BAND_ROWS - 1) / LQ_MMA_BAND_ROWS;
    const int by_registers =
        lq_mma_ctas_by_registers(lq_mma_kernel_for(w->q.config.b0, bpc, plan->nt));
    for (int per_sm = by_registers; per_sm >= 1; per_sm--) {
        int splits = sms * per_sm / plan->bands;
        if (splits > ktiles) splits = ktiles;
        if (splits < (ktiles + tiles_fit - 1) / tiles_fit)
            splits = (ktiles + tiles_fit - 1) / tiles_fit;
        if (splits < 1) splits = 1;
        plan->tiles_per_split = (ktiles + splits - 1) / splits;
        plan->splits = (ktiles + plan->tiles_per_split - 1) / plan->tiles_per_split; // none empty
        plan->smem = (size_t)plan->tiles_per_split * tile;
        // per_sm CTAs' slices, tables and reserves within the SM's shared memory
        const size_t reserve = cuda->reserved_shared ? cuda->reserved_shared : 1024;
        if (per_sm == 1 || !cuda->shared_per_sm ||
            (size_t)per_sm * (plan->smem + table + reserve) <= cuda->shared_per_sm)
            break;
    }
    plan->smem_max = (size_t)tiles_fit * tile;
    return LQ_OK;
}

template <int BITS, int BPC, int NT>
static int lq_mma_launch_gemm(struct lq_cuda *cuda, const lq_mma_plan &plan, bool overlap,
                              const lq_mma_args &a) {
    auto kernel = lq_mma_kernel<BITS, BPC, NT>;
    // Static (pair table) + dynamic beyond 48 KiB needs the opt-in: once per kernel, to the
    // whole budget (ops run under the op lock).
    static size_t opted = 0;
    if (plan.smem > opted) {
        LQ_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)plan.smem_max),
                    "LQ mma shared memory");
        opted = plan.smem_max;
    }
    LQ_CUDA_TRY(lq_launch_pdl(overlap, kernel, dim3((unsigned)plan.bands, (unsigned)plan.splits),
                              dim3(LQ_MMA_THREADS), plan.smem, cuda->stream, a),
                "lq_mma_kernel");
    return LQ_OK;
}

template <int BITS, int BPC>
static int lq_mma_launch_gemm(struct lq_cuda *cuda, const lq_mma_plan &plan, bool overlap,
                              const lq_mma_args &a) {
    switch (plan.nt) {
    case 16:
        return lq_mma_launch_gemm<BITS, BPC, 16>(cuda, plan, overlap, a);
    case 32:
        return lq_mma_launch_gemm<BITS, BPC, 32>(cuda, plan, overlap, a);
    case 48:
        return lq_mma_launch_gemm<BITS, BPC, 48>(cuda, plan, overlap, a);
    default:
        return lq_mma_launch_gemm<BITS, BPC, 64>(cuda, plan, overlap, a);
    }
}

template <int BITS>
static int lq_mma_launch_gemm(struct lq_cuda *cuda, int bpc, const lq_mma_plan &plan, bool overlap,
                              const lq_mma_args &a) {
    switch (bpc) {
    case 1:
        return lq_mma_launch_gemm<BITS, 1>(cuda, plan, overlap, a);
    case 2:
        return lq_mma_launch_gemm<BITS, 2>(cuda, plan, overlap, a);
    default:
        return lq_mma_launch_gemm<BITS, 4>(cuda, plan, overlap, a);
    }
}

// The layers' plans and blocks per chunk, or LQ_EUNSUPPORTED where one cannot run here.
static int lq_mma_plans(struct lq_cuda *cuda, const struct lq_linear *const *w, int count, int n,
                        lq_mma_plan *plans, int *bpcs) {
    for (int i = 0; i < count; i++) {
        const struct lq_nf_config *c = &w[i]->q.config;
        bpcs[i] = lq_cuda_blocks_per_chunk(w[i]);
        if (n < 1 || n > LQ_CUDA_MMA_MAX_TOKENS || !bpcs[i] ||
            (c->b0 != 2 && c->b0 != 3 && c->b0 != 4) || w[i]->cols != w[0]->cols)
            return LQ_EUNSUPPORTED;
        plans[i] = lq_mma_plan{};
        const int rc = lq_mma_plan_for(cuda, w[i], n, bpcs[i], &plans[i]);
        if (rc) return rc;
    }
    return LQ_OK;
}

int lq_cuda_linear_mma_group(struct lq_cuda *cuda, const struct lq_linear *const *w,
                             const struct lq_cuda_lq_buffers *const *b, int count, const float *x,
                             int n, float *const *y) {
    if (count < 1 || count > LQ_CUDA_GROUP_MAX) return LQ_EINVAL;
    lq_mma_plan plans[LQ_CUDA_GROUP_MAX];
    int bpcs[LQ_CUDA_GROUP_MAX];
    int rc = lq_mma_plans(cuda, w, count, n, plans, bpcs);
    if (rc) return rc;

    // Workspaces first, one piece per layer (a layer's GEMM may start while the reduction of
    // the one before still reads its partial sums), each starting on 16 bytes (the reduction
    // reads float4s): nothing is queued when one cannot be had.
    size_t t_size[LQ_CUDA_GROUP_MAX], partial_size[LQ_CUDA_GROUP_MAX];
    size_t t_total = 0, partial_total = 0;
    for (int i = 0; i < count; i++) {
        t_size[i] = ((size_t)n * (size_t)(w[i]->rank > 0 ? w[i]->rank : 0) + 3) & ~(size_t)3;
        partial_size[i] =
            plans[i].splits > 1 ? ((size_t)plans[i].splits * n * w[i]->rows + 3) & ~(size_t)3 : 0;
        t_total += t_size[i], partial_total += partial_size[i];
    }
    void *partials = NULL, *t = NULL;
    if ((partial_total > 0 && (rc = lq_cuda_slot(cuda, LQ_CUDA_LINEAR_TILE,
                                                 partial_total * sizeof(float), &partials))) ||
        (t_total > 0 && (rc = lq_cuda_slot(cuda, LQ_CUDA_LOWRANK, t_total * sizeof(float), &t))))
        return rc;
    float *t_of[LQ_CUDA_GROUP_MAX], *partials_of[LQ_CUDA_GROUP_MAX];
    const float *lora_A[LQ_CUDA_GROUP_MAX];
    int ranks[LQ_CUDA_GROUP_MAX], projected = 0;
    float *t_projected[LQ_CUDA_GROUP_MAX];
    size_t t_at = 0, p_at = 0;
    for (int i = 0; i < count; i++) {
        t_of[i] = (float *)t + t_at, partials_of[i] = (float *)partials + p_at;
        t_at += t_size[i], p_at += partial_size[i];
        if (w[i]->rank > 0) {
            lora_A[projected] = b[i]->lora_A, ranks[projected] = w[i]->rank;
            t_projected[projected++] = t_of[i];
        }
    }

    // t = x · L2ᵀ of every layer with factors, fp32, one launch (a CTA per rank row and 8
    // tokens). It waits for x's producer and then lets the first GEMM launch, so x is complete
    // when any GEMM of the group starts: each stages x at once, and the projection runs beside
    // the GEMMs' main loops (each waits for the kernel before it only in its epilogue, and
    // that kernel waited for the one before: the projection has ended when t is read).
    if (projected > 0 && (rc = lq_cuda_lowrank_project_group(cuda, projected, lora_A, ranks,
                                                             w[0]->cols, x, n, t_projected)))
        return rc;
    // x goes to fp16 as a GEMM stages it (cols % 32 == 0: whole 16-byte pieces)
    const int vector_x = ((uintptr_t)x & 15u) == 0;

    for (int i = 0; i < count; i++) {
        const struct lq_nf_config *c = &w[i]->q.config;
        const lq_mma_plan &plan = plans[i];
        lq_mma_args a;
        memset(&a, 0, sizeof a);
        a.codes = b[i]->codes, a.scale_codes = b[i]->scale_codes;
        a.group_scales = b[i]->group_scales, a.table = b[i]->table;
        a.rows = w[i]->rows, a.cols = w[i]->cols, a.b1 = c->b1, a.b2 = (int)c->b2;
        a.offset = w[i]->q.scale_offset;
        a.levels = (float)((1u << c->b1) - 1u);
        a.inv_levels = 1.0f / a.levels;
        a.chunk_block = lq_make_divisor(c->B0 % 32 == 0 ? (uint32_t)c->B0 / 32 : 1u);
        a.group = lq_make_divisor((uint32_t)c->B1);
        a.x = x, a.n = n, a.x_vector = vector_x;
        // Without a projection the kernel before the first GEMM may still be writing x, and a
        // GEMM lets the next launch before it waits: then each waits before staging x.
        a.x_early = projected > 0;
        a.lora_B = b[i]->lora_B, a.t = t_of[i], a.rank = w[i]->rank;
        a.out = plan.splits > 1 ? partials_of[i] : y[i];
        a.tiles_per_split = plan.tiles_per_split;
        a.chunks_per_row = w[i]->cols / 32;
        a.prefetch = b[i]->prefetch;
        const bool overlap = b[i]->overlap != 0;
        switch (c->b0) {
        case 2:
            rc = lq_mma_launch_gemm<2>(cuda, bpcs[i], plan, overlap, a);
            break;
        case 3:
            rc = lq_mma_launch_gemm<3>(cuda, bpcs[i], plan, overlap, a);
            break;
        default:
            rc = lq_mma_launch_gemm<4>(cuda, bpcs[i], plan, overlap, a);
            break;
        }
        if (rc) return rc;
        if (plan.splits == 1) continue;
        const size_t y_count = (size_t)n * w[i]->rows;
        const int vector_y = ((uintptr_t)y[i] & 15u) == 0 && y_count % 4 == 0;
        LQ_CUDA_TRY(lq_launch_pdl(overlap, lq_mma_reduce_kernel,
                                  dim3(lq_mma_grid_for(vector_y ? y_count / 4 : y_count, cuda)),
                                  dim3(256), 0, cuda->stream, (const float *)partials_of[i],
                                  plan.splits, y_count, vector_y, y[i]),
                    "lq_mma_reduce_kernel");
    }
    return LQ_OK;
}

int lq_cuda_linear_mma(struct lq_cuda *cuda, const struct lq_linear *w,
                       const struct lq_cuda_lq_buffers *b, const float *x, int n, float *y) {
    return lq_cuda_linear_mma_group(cuda, &w, &b, 1, x, n, &y);
}
