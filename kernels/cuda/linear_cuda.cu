// Linear layers on the GPU: y[n, rows] = x[n, cols] · Wᵀ (+ x · L2ᵀ · L1ᵀ for LQ layers).
//
// Dense layers are uploaded as they are and run as cuBLAS SGEMM in full fp32 (the handle's
// default math mode: no TF32). LQ layers stay packed on the device exactly as core/nf.h lays them
// out (b0-bit codes, b1-bit block-scale codes, b2 group scales, the offset) next to the fp32
// factors L1 = lora_B [rows, rank] and L2 = lora_A [rank, cols]. No dense copy of Q is ever made:
// decode dequantizes in registers, prefill one bounded tile of rows at a time.
//
// Decode, n <= LQ_DECODE_MAX_TOKENS (8) tokens, every row of every token from one packed read:
//   1. (rank > 0) lq_lowrank_project_kernel: t[n, rank] = x · L2ᵀ, one CTA per rank row. It lets
//      the next kernel start at once (programmatic dependent launch, Hopper), so the two overlap.
//   2. lq_decode_kernel (fast path: cols % 32 == 0, blocks of 8, 16 or a multiple of 32 values):
//      a grid of (row bands) x (column slices of 1024 columns). In a slice, lane l of each warp
//      owns the 32-value chunk l of every row: the chunk's 32 codes are exactly b0 aligned 32-bit
//      words at word (flat/32)·b0, loaded in one or two vector loads with nothing wasted, and each
//      code is extracted with a compile-time shift. Warps take R rows at a time (R = 8 for one
//      token, 4 for more: up to 8·b0 words in flight per lane), so each x value read from
//      shared memory serves R rows; the first R rows are requested before the CTA stages its x
//      slice, so HBM latency overlaps that setup. 256 threads and <= 128 registers: two CTAs
//      (16 warps) per SM at least. Why lane = chunk and not lane = row: a warp's 32 lanes then read
//      32 consecutive chunks of a row (fully coalesced), the thread count grows with rows·cols/32
//      (enough warps to cover HBM latency even at 4096 rows), and a CTA needs only its slice of x.
//      Code → value lookups are the limit of this kernel, not arithmetic: shared memory and
//      shuffles each deliver 32 fp32 values per clock per SM, while HBM delivers ~13 B per clock
//      per SM, i.e. ~51 2-bit codes. So:
//        - b0 = 2, one token: the CTA first builds a pair table P[pair][16] = t[c0]·x0 + t[c1]·x1
//          for its slice (x folded in), laid out so lane l always reads bank l (conflict-free
//          whatever the codes); one 4-byte lookup then yields two codes' products.
//        - otherwise: the NF table sits in one register per lane (lane i holds table[i mod 2^b0]),
//          and __shfl_sync with the code's bits as source lane is the lookup (shfl uses the low 5
//          bits, so the neighbouring codes above need no masking); b0 = 8 uses a shared table.
//      The block scale is rebuilt exactly as core/nf.c does (offset + code·gs/(2^b1−1), the
//      division by an exact FMA-corrected reciprocal) once per chunk and row. With one token the
//      scale multiplies the block's partial dot product; with more it multiplies each value
//      (table·scale, the CPU's rounding) before the token FMAs. The low-rank term rides along:
//      the CTA of slice s also adds L1[rows, k]·t[k] for its 1/slices share of the rank, per
//      lane before the reduction; its L1 values are requested with the packed words and only the
//      t reads wait for kernel 1. Each warp reduces its rows across lanes (a reduce-scatter: R·NT
//      values in ~R·NT shuffles) and writes one partial per row, token and slice; the last CTA
//      of a band to finish (an atomic ticket) sums the slices in slice order into y.
//      Deterministic: the same inputs give the same bits on every run.
//      LQ_CUDA_DECODE=v2, v3 or v4 (v1 where asked, or where the default v6 cannot run): one
//      token at b0 = 3, 4 with B0 >= 16 takes
//      lq_gemv_kernel (gemv_cuda.cuh) instead, the same arithmetic (the same bits) with the
//      next row group's loads in flight while the current one is decoded, in a one-wave grid;
//      v3 also sums the slices within a thread-block cluster instead of the partials + ticket,
//      v4 is v3 in a grid that fits beside the projection kernel's CTAs.
//   3. Anything else (odd shapes such as 37 x 53, B0 <= 4 or not 8, 16, 32k, chunks whose blocks
//      fall in two groups, x not 16-byte aligned):
//      lq_decode_generic_kernel, one warp per row, every value decoded on its own. Correct for
//      every configuration, much slower.
//   Bytes read per decode call (what lq_cuda_linear_bytes_read returns, n = 1): codes
//   rows·cols·b0/8 + scale codes rows·cols·b1/(8·B0) + group scales + L2 rank·cols·4 (kernel 1)
//   + L1 rows·rank·4 (kernel 2), each once from HBM. Besides, from L2: each CTA's 1024-column
//   slice of x (4 KiB per token), and slices·n·rows·4 bytes of partials written and read back.
//
// Prefill, n > 8 (prompts, evaluation, wide batched decode): x is converted to fp16 once
// (LQ_CUDA_LINEAR_INPUT), then per tile of at most LQ_TILE_BYTES of rows (LQ_CUDA_LINEAR_TILE) Q
// is dequantized to fp16 (8 values per thread, one 16-byte store) and cublasGemmEx (fp16 inputs,
// fp32 accumulate and output, tensor cores) writes y straight in place (ldc = rows); then
// t = x·L2ᵀ and y += t·L1ᵀ from the fp32 factors on TF32 tensor cores, whose 10-bit mantissas
// are the fp16 product's (LQ_CUDA_LOWRANK_TF32=0: SGEMMs, which at n = 512 took a third of a
// 4096 x 4096 layer's time on the H200). Bytes: the packed matrix once, 2·rows·cols·2 of fp16
// tiles (mostly L2), x and y.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/linear_cuda_kernels.cuh"
#include "kernels/cuda/gemv_cuda.cuh"
#include "kernels/cuda/gemv_rows_cuda.cuh"
#include "kernels/cuda/gemv_mma1_cuda.cuh"
#include "kernels/cuda/gemv_mma1_select_cuda.cuh"

extern "C" {
#include "core/nf.h"
}

// Bytes one decode call at batch 1 reads (packed buffers + L1 + L2; rows·cols·4 when dense).
size_t lq_cuda_linear_bytes_read(const struct lq_linear *w);

// Up to this many tokens the fused decode kernels run (tokens padded to 1, 2, 4 or 8 slots).
// There every decoded value feeds n fp32 FMAs, so their time grows with n; the tile path moves
// ~4 bytes of fp16 tile per weight (write + read) instead of b0/8 but is nearly flat in n on
// tensor cores. The two cross somewhere between 8 and 16 tokens by our estimate for an H100;
// 8 also bounds the decode kernels' R·n accumulators (no spills).
#define LQ_DECODE_MAX_TOKENS 8
// From this many tokens up to LQ_CUDA_MMA_MAX_TOKENS (64), LQ layers the fast path covers take
// the fused dequantize + tensor-core kernel of linear_mma_cuda.cu instead (it runs any n >= 1).
// Measured on an H200 (tests/bench/bench_cuda, rank 64): 4096 x 4096 at 4 tokens 19 us on the
// decode kernel; at 8 tokens 40 us there (it pads 5..8 to 8 slots) against 26 us here; 11008 x
// 4096 at 8 tokens 93 us against 35 us.
#define LQ_MMA_MIN_TOKENS 5
// A fp16 tile of rows at most this large: dequantized, then read by the GEMM while in L2.
#define LQ_TILE_BYTES ((size_t)16 << 20)
// Bytes of zeros after each packed buffer, so that a two-word window at the end stays inside.
#define LQ_PACKED_PADDING 16

// ---------------------------------------------------------------------------------------------
// Host side (struct lq_cuda_linear_data, what prepare leaves in backend_data: cuda_internal.h).

typedef void (*lq_decode_fn)(lq_decode_args);

// One token at b0 = 2 takes the pair-table kernel, everything else the table lookups.
template <int BITS, int BPC> static lq_decode_fn lq_decode_one_token(void) {
    if constexpr (BITS == 2)
        return lq_decode_kernel<2, BPC, 1, true>;
    else
        return lq_decode_kernel<BITS, BPC, 1, false>;
}

template <int BITS, int BPC> static lq_decode_fn lq_decode_kernel_for(int nt) {
    switch (nt) {
    case 1:
        return lq_decode_one_token<BITS, BPC>();
    case 2:
        return lq_decode_kernel<BITS, BPC, 2, false>;
    case 4:
        return lq_decode_kernel<BITS, BPC, 4, false>;
    default:
        return lq_decode_kernel<BITS, BPC, 8, false>;
    }
}

template <int BITS> static lq_decode_fn lq_decode_kernel_for(int bpc, int nt) {
    switch (bpc) {
    case 1:
        return lq_decode_kernel_for<BITS, 1>(nt);
    case 2:
        return lq_decode_kernel_for<BITS, 2>(nt);
    default:
        return lq_decode_kernel_for<BITS, 4>(nt);
    }
}

static lq_decode_fn lq_decode_kernel_for(int bits, int bpc, int nt) {
    switch (bits) {
    case 2:
        return lq_decode_kernel_for<2>(bpc, nt);
    case 3:
        return lq_decode_kernel_for<3>(bpc, nt);
    case 4:
        return lq_decode_kernel_for<4>(bpc, nt);
    default:
        return lq_decode_kernel_for<8>(bpc, nt);
    }
}

static lq_decode_fn lq_decode_generic_for(int nt) {
    switch (nt) {
    case 1:
        return lq_decode_generic_kernel<1>;
    case 2:
        return lq_decode_generic_kernel<2>;
    case 4:
        return lq_decode_generic_kernel<4>;
    default:
        return lq_decode_generic_kernel<8>;
    }
}

static int lq_pad_tokens(int n) {
    return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8;
}

static unsigned lq_grid_for(size_t items, const struct lq_cuda *cuda) {
    size_t blocks = (items + 255) / 256,
           cap = (size_t)(cuda->sm_count > 0 ? cuda->sm_count : 1) * 16;
    return (unsigned)(blocks < 1 ? 1 : blocks < cap ? blocks : cap);
}

static lq_packed lq_packed_of(const struct lq_linear *w, const struct lq_cuda_linear_data *data) {
    const struct lq_nf_config *c = &w->q.config;
    lq_packed q;
    memset(&q, 0, sizeof q);
    q.codes = data->codes;
    q.scale_codes = data->scale_codes;
    q.group_scales = data->group_scales;
    q.table = data->table;
    q.rows = w->rows, q.cols = w->cols;
    q.b0 = c->b0, q.b1 = c->b1, q.b2 = (int)c->b2, q.B0 = c->B0, q.B1 = c->B1;
    q.offset = w->q.scale_offset;
    q.levels = (float)((1u << c->b1) - 1u);
    q.inv_levels = 1.0f / q.levels;
    q.chunk_block = lq_make_divisor(c->B0 % 32 == 0 ? (uint32_t)c->B0 / 32 : 1u);
    q.block = lq_make_divisor((uint32_t)c->B0);
    q.group = lq_make_divisor((uint32_t)c->B1);
    return q;
}

int lq_cuda_blocks_per_chunk(const struct lq_linear *w) {
    const struct lq_nf_config *c = &w->q.config;
    if (w->cols % 32 != 0 || (size_t)w->rows * (size_t)w->cols >= ((size_t)1 << 31)) return 0;
    if (c->B0 % 32 == 0) return 1;
    if (c->B0 == 16 && c->B1 % 2 == 0) return 2;
    if (c->B0 == 8 && c->B1 % 4 == 0) return 4;
    return 0;
}

// cuBLAS is column-major: y[n, rows] row-major is yᵀ [rows × n] with ld rows, so
// yᵀ = W · xᵀ with W read transposed from its row-major [rows, cols] storage.
int lq_cuda_gemm_nt(struct lq_cuda *cuda, bool tf32, const float *w, int rows, int cols,
                    const float *x, int n, float beta, float *y, int ldy) {
    const float one = 1.0f;
    if (tf32) {
        LQ_CUBLAS_TRY(cublasGemmEx(cuda->cublas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one, w,
                                   CUDA_R_32F, cols, x, CUDA_R_32F, cols, &beta, y, CUDA_R_32F, ldy,
                                   CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT),
                      "cublasGemmEx (linear, TF32)");
        return LQ_OK;
    }
    LQ_CUBLAS_TRY(cublasSgemm(cuda->cublas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one, w, cols,
                              x, cols, &beta, y, ldy),
                  "cublasSgemm (linear)");
    return LQ_OK;
}

static int lq_sgemm_nt(struct lq_cuda *cuda, const float *w, int rows, int cols, const float *x,
                       int n, float beta, float *y, int ldy) {
    return lq_cuda_gemm_nt(cuda, false, w, rows, cols, x, n, beta, y, ldy);
}

bool lq_cuda_lowrank_tf32(void) {
    const char *value = getenv("LQ_CUDA_LOWRANK_TF32");
    return !(value && strcmp(value, "0") == 0);
}

// The fast decode kernel's grid: bands of rows x slices of 1024 columns.
struct lq_decode_grid {
    int slices, iters, bands;
};

static lq_decode_grid lq_decode_grid_for(const struct lq_cuda *cuda, const struct lq_linear *w,
                                         int nt) {
    lq_decode_grid g;
    const int chunks_per_row = w->cols / 32, warp_rows = lq_decode_rows(w->q.config.b0, nt);
    g.slices = (chunks_per_row + LQ_SLICE_CHUNKS - 1) / LQ_SLICE_CHUNKS;
    // One row group per warp keeps CTAs small, so the last wave is short (the setup that a
    // second group would amortize already overlaps the first loads). Two only for grids of 8+
    // waves, where the tail no longer matters.
    const long rows_one = LQ_DECODE_WARPS * warp_rows;
    const long ctas_one = (w->rows + rows_one - 1) / rows_one * g.slices;
    g.iters = ctas_one >= 16L * (cuda->sm_count > 0 ? cuda->sm_count : 1) ? 2 : 1;
    const int band_rows = LQ_DECODE_WARPS * warp_rows * g.iters;
    g.bands = (w->rows + band_rows - 1) / band_rows;
    return g;
}

// LQ_CUDA_DECODE picks the kernel for one token: unset or auto takes v6 where it can run, and
// elsewhere lq_gemv_rows_kernel (v5) for matrices with 8192 or more rows or columns and
// lq_decode_kernel (v1) for the others (measured with ncu on an H100, 7B shapes at ~3.1 bits:
// 11008 x 4096 24 vs 31 us, 4096 x 11008 28 vs 31 us, 4096 x 4096 13.6 vs 12.9 us); v1, v5
// (v5r2, v5r4: 2 or 4 rows per warp)
// force one; v2 lq_gemv_kernel (gemv_cuda.cuh), v3 lq_gemv_kernel with the slices of a band as
// one cluster, v4 v3 with a grid that leaves room for the projection kernel's CTAs
// (lq_gemv_grid_for), those three at b0 = 3 and 4 only (else v1); v3 and v4 run without
// clusters where a band has more than 8 slices or at b0 = 4 with B0 = 16. Another value is
// reported once and taken as auto. Read on every call, so that a benchmark can time them all
// in one process. v1 to v4 give the same bits; v5 sums in another order. v6
// (gemv_mma1_kernel.h: tensor cores, fp16 values and x, fp32 sums) at b0 = 2, 3, 4 with B0 a
// multiple of 32 or 16, else v1.
// Whether auto takes v6 for one token (where it can run); linear_fused follows this choice
// (lq_cuda_fuses_linears). On the H100 (2026-11-27, bench_cuda --decode-variants 1
// --decode-kernels v6,auto) the batch-1 step of the 7B-shaped ~3-bit model took 4.08 ms with
// v6 at 2 CTAs per SM against 4.41 ms with v1/v5, the fused ops included.
static bool lq_auto_takes_mma1(void) {
    return true;
}

static int lq_decode_variant(void) {
    const char *value = getenv("LQ_CUDA_DECODE");
    if (!value || !*value || strcmp(value, "auto") == 0) return 0;
    if (strcmp(value, "v1") == 0) return 1;
    if (strcmp(value, "v2") == 0) return 2;
    if (strcmp(value, "v3") == 0) return 3;
    if (strcmp(value, "v4") == 0) return 4;
    if (strcmp(value, "v5") == 0) return 5;
    if (strcmp(value, "v5r2") == 0) return 52;
    if (strcmp(value, "v5r4") == 0) return 54;
    if (strcmp(value, "v6") == 0) return 6;
    static int reported;
    if (!__atomic_exchange_n(&reported, 1, __ATOMIC_RELAXED))
        fprintf(stderr,
                "lqd: LQ_CUDA_DECODE=%s: expected auto, v1, v2, v3, v4, v5, v5r2, v5r4 or v6; "
                "using auto\n",
                value);
    return 0;
}

// lq_gemv_kernel's grid: one wave of LQ_GEMV_CTAS_PER_SM CTAs per SM, each CTA walking `iters`
// groups of LQ_GEMV_GROUP_ROWS rows of its band in one slice. The bands never exceed
// rows / 32 (the tickets' count). beside_projection (v4): the projection kernel that runs
// beside it (PDL) holds one CTA on each of up to `rank` SMs, and with 128 registers a decode CTA
// takes half the register file, so such an SM fits only one decode CTA until the projection
// ends: leave those slots out, so that no CTA waits for a second wave.
static lq_decode_grid lq_gemv_grid_for(const struct lq_cuda *cuda, const struct lq_linear *w,
                                       bool beside_projection) {
    lq_decode_grid g;
    const int chunks_per_row = w->cols / 32;
    g.slices = (chunks_per_row + LQ_SLICE_CHUNKS - 1) / LQ_SLICE_CHUNKS;
    const long groups = (w->rows + LQ_GEMV_GROUP_ROWS - 1) / LQ_GEMV_GROUP_ROWS;
    const long sms = cuda->sm_count > 0 ? cuda->sm_count : 1;
    long ctas = sms * LQ_GEMV_CTAS_PER_SM;
    if (beside_projection) ctas -= w->rank < sms ? w->rank : sms;
    const long bands_wanted = ctas / g.slices > 0 ? ctas / g.slices : 1;
    g.iters = (int)((groups + bands_wanted - 1) / bands_wanted);
    g.bands = (int)((groups + g.iters - 1) / g.iters);
    return g;
}

// lq_gemv_rows_kernel for b0 = 2, 3, 4, BPC blocks per chunk and R rows per warp, its dynamic
// shared-memory limit raised once (x may take up to 96 KiB).
template <int BITS, int BPC, int R> static lq_decode_fn lq_rows_kernel(void) {
    static int raised; // under the op lock
    if (!raised && cudaFuncSetAttribute(lq_gemv_rows_kernel<BITS, BPC, R>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        LQ_ROWS_MAX_CHUNKS * 128) == cudaSuccess)
        raised = 1;
    return raised ? lq_gemv_rows_kernel<BITS, BPC, R> : NULL;
}

template <int BITS, int R> static lq_decode_fn lq_rows_kernel_for(int bpc) {
    return bpc == 1   ? lq_rows_kernel<BITS, 1, R>()
           : bpc == 2 ? lq_rows_kernel<BITS, 2, R>()
                      : lq_rows_kernel<BITS, 4, R>();
}

// R = 4 only with one block per chunk (more block scales per row would spill).
template <int R> static lq_decode_fn lq_rows_kernel_for(int bits, int bpc) {
    if constexpr (R == 4) {
        if (bpc != 1) return NULL;
        return bits == 2   ? lq_rows_kernel<2, 1, 4>()
               : bits == 3 ? lq_rows_kernel<3, 1, 4>()
                           : lq_rows_kernel<4, 1, 4>();
    } else {
        return bits == 2   ? lq_rows_kernel_for<2, R>(bpc)
               : bits == 3 ? lq_rows_kernel_for<3, R>(bpc)
                           : lq_rows_kernel_for<4, R>(bpc);
    }
}

// v5's rows per warp: 2 while that still gives every warp of one wave a row group (more warps
// in flight), else 4 (each x value read from shared memory serves more rows); 2 where a chunk
// has several blocks. v5r2 and v5r4 force one.
static int lq_rows_per_warp(const struct lq_cuda *cuda, const struct lq_linear *w, int bpc,
                            int variant) {
    if (variant == 52 || bpc != 1) return 2;
    if (variant == 54) return 4;
    const long warps = (long)(cuda->sm_count > 0 ? cuda->sm_count : 1) *
                       lq_rows_ctas_per_sm(w->q.config.b0, 1, 2) * LQ_ROWS_WARPS;
    return (w->rows + 1) / 2 <= 2 * warps ? 2 : 4;
}

// v5's kernel and rows per warp, or NULL where it cannot run (x too wide for its shared
// memory, or its shared-memory limit could not be raised).
static lq_decode_fn lq_rows_pick(const struct lq_cuda *cuda, const struct lq_linear *w, int bpc,
                                 int variant, int *r) {
    const int columns = (w->cols / 32 + 31) / 32;
    *r = lq_rows_per_warp(cuda, w, bpc, variant);
    if (columns * 32 > LQ_ROWS_MAX_CHUNKS) return NULL;
    return *r == 2 ? lq_rows_kernel_for<2>(w->q.config.b0, bpc)
                   : lq_rows_kernel_for<4>(w->q.config.b0, bpc);
}

// v5's launch: one wave of CTAs (fewer when the row groups run out).
static cudaError_t lq_launch_rows(const struct lq_cuda *cuda, const struct lq_linear *w, int bpc,
                                  lq_decode_fn kernel, int r, bool overlap,
                                  const lq_decode_args &a) {
    const int columns = (w->cols / 32 + 31) / 32;
    const long groups = (w->rows + r - 1) / r,
               wave = (long)(cuda->sm_count > 0 ? cuda->sm_count : 1) *
                      lq_rows_ctas_per_sm(w->q.config.b0, bpc, r);
    long ctas = (groups + LQ_ROWS_WARPS - 1) / LQ_ROWS_WARPS;
    if (ctas > wave) ctas = wave;
    return lq_launch_pdl(overlap, kernel, dim3((unsigned)ctas), dim3(LQ_ROWS_THREADS),
                         (size_t)columns * 32 * 128, cuda->stream, a);
}

static_assert(LQ_M1_INPUT_PLAIN == LQ_INPUT_PLAIN && LQ_M1_INPUT_RMSNORM == LQ_INPUT_RMSNORM &&
                  LQ_M1_OUTPUT_WRITE == LQ_OUTPUT_WRITE && LQ_M1_OUTPUT_ADD == LQ_OUTPUT_ADD &&
                  LQ_M1_OUTPUT_SWIGLU == LQ_OUTPUT_SWIGLU,
              "gemv_mma1_kernel.h repeats kernels/backend.h's input and output kinds");

// An integer 0 .. most from the environment (read on every call, for benchmarks), or
// `otherwise`.
static long lq_env_upto(const char *name, long most, long otherwise) {
    const char *value = getenv(name);
    char *end;
    const long v = value && *value ? strtol(value, &end, 10) : 0;
    return value && *value && !*end && v >= 0 && v <= most ? v : otherwise;
}
static int lq_env_int(const char *name, int otherwise) {
    return (int)lq_env_upto(name, 64, otherwise);
}

// The projection in the kernel: the polls of the pieces' counter before a warp takes the sums
// it reads itself (gemv_mma1_kernel.h lq_m1_low_rank_here). LQ_CUDA_MMA1_SPIN=N (0 to 2^30;
// 0: every warp takes them at once, which the GPU tests use to run that path). Default 4096:
// a poll is an L2 round trip and a 128 ns sleep, so about a millisecond or more, far past the
// few microseconds a resident grid's CTAs take to publish, and short beside a stall behind a
// compress job's kernels (an estimate, not yet measured on a GPU).
static uint32_t lq_mma1_spin_limit(void) {
    return (uint32_t)lq_env_upto("LQ_CUDA_MMA1_SPIN", 1L << 30, 4096);
}

// An SM's shared memory, for all its CTAs.
static size_t lq_mma1_shared_per_sm(const struct lq_cuda *cuda) {
    return cuda->shared_per_sm > 0 ? cuda->shared_per_sm : 227 * 1024;
}

// Whether v6's lanes share block scales: where two chunks of a quad always share a block
// (LQ_CUDA_MMA1_SHARE_SCALES=0: each rebuilds its own).
static bool lq_mma1_share_scales(const struct lq_linear *w) {
    const struct lq_nf_config *c = &w->q.config;
    return c->B0 % 64 == 0 && w->cols % c->B0 == 0 &&
           lq_env_int("LQ_CUDA_MMA1_SHARE_SCALES", 1) != 0;
}

// v6's kernel, or NULL where it cannot run (b0 = 8, B0 = 8, x too wide, an older GPU).
static lq_m1_fn lq_mma1_pick(const struct lq_cuda *cuda, const struct lq_linear *w,
                             const struct lq_cuda_linear_data *data, int bpc, bool *share_out,
                             int *ctas_out, bool *stage_out) {
    const int b0 = w->q.config.b0;
    if ((bpc != 1 && bpc != 2) || b0 < 2 || b0 > 4 ||
        (w->q.config.b2 != LQ_SCALE_FP32 && !data->group_scales_f32) ||
        lq_m1_shared_bytes(b0, w->cols / 32, cuda->reserved_shared) > LQ_M1_MAX_SHARED)
        return NULL;
    const bool share = lq_mma1_share_scales(w);
    // 2 CTAs per SM (up to 128 registers) where a row group a CTA fills no more than 2 a SM (a
    // 4096-row layer on 132 SMs: 256 CTAs), else 3 (80 registers). Why: where 3 would not make
    // the grid any wider, their register cap only costs (H100, each layer alone: 4096 x 4096
    // 13.7 -> 10.9 us, 4096 x 11008 25.5 -> 19.7 us), and an 11008-row layer at 2 would need
    // 4 row groups a CTA, half the warps (22.5 -> 27.7 us). LQ_CUDA_MMA1_CTAS (2, 3, 4) forces
    // one.
    const long groups = (w->rows + 15) / 16, sms = cuda->sm_count > 0 ? cuda->sm_count : 1;
    const int wanted = lq_env_int("LQ_CUDA_MMA1_CTAS", 0);
    const int ctas = wanted == 2 || wanted == 3 || wanted == 4 ? wanted : groups <= 2 * sms ? 2 : 3;
    // Staged codes (gemv_mma1_kernel.h) with LQ_CUDA_MMA1_STAGE=1, wherever the rows' tiles are
    // 16-byte aligned and the rings leave room for as many CTAs per SM as the registers do.
    // Off by default until it has run on a GPU (written 2026-11-27 without one; the CPU run of
    // the kernel checks it, tests/kernels/gpu_check.sh staged is the GPU's check and timing).
    const int chunks = w->cols / 32;
    const size_t staged = lq_m1_staged_shared_bytes(b0, chunks, cuda->reserved_shared);
    const bool stage =
        lq_env_int("LQ_CUDA_MMA1_STAGE", 0) != 0 && ctas != 4 && lq_m1_can_stage(b0, chunks) &&
        ((uintptr_t)data->codes & 15u) == 0 && staged <= LQ_M1_MAX_SHARED_STAGED &&
        (staged + cuda->reserved_shared) * (size_t)ctas <= lq_mma1_shared_per_sm(cuda);
    *share_out = share, *ctas_out = ctas, *stage_out = stage;
    lq_m1_fn kernel = lq_mma1_select<0>(b0, bpc, share, ctas, stage);
    if (!kernel && stage) { // its limit could not be raised: the codes in registers
        *stage_out = false;
        kernel = lq_mma1_select<0>(b0, bpc, share, ctas, false);
    }
    return kernel;
}

// What the GPU holds of v6's `kernel` with `smem` bytes of dynamic shared memory, as the runtime
// computes it: CTAs per SM (cluster = 1: cudaOccupancyMaxActiveBlocksPerMultiprocessor), or
// clusters of `cluster` CTAs on the whole GPU (cudaOccupancyMaxActiveClusters); 0 where it
// cannot say. Remembered per kernel, bytes and cluster: plans are made at every decode call
// outside a graph. Under the op lock.
static int lq_mma1_occupancy(const struct lq_cuda *cuda, lq_m1_fn kernel, size_t smem,
                             int cluster) {
    static struct {
        lq_m1_fn kernel;
        size_t smem;
        int cluster, count;
    } known[64];
    static int known_count;
    for (int i = 0; i < known_count; i++)
        if (known[i].kernel == kernel && known[i].smem == smem && known[i].cluster == cluster)
            return known[i].count;
    int count = 0;
    if (cluster == 1) {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, kernel, LQ_M1_THREADS, smem) !=
            cudaSuccess)
            count = 0;
    } else {
        cudaLaunchAttribute attribute = {};
        attribute.id = cudaLaunchAttributeClusterDimension;
        attribute.val.clusterDim.x = (unsigned)cluster;
        attribute.val.clusterDim.y = attribute.val.clusterDim.z = 1;
        cudaLaunchConfig_t config = {};
        config.gridDim = dim3((unsigned)((cuda->sm_count > 0 ? cuda->sm_count : 1) * cluster));
        config.blockDim = dim3(LQ_M1_THREADS);
        config.dynamicSmemBytes = smem;
        config.attrs = &attribute;
        config.numAttrs = 1;
        if (cudaOccupancyMaxActiveClusters(&count, kernel, &config) != cudaSuccess) count = 0;
    }
    cudaGetLastError(); // (no clusters here, or none of this size)
    if (known_count < (int)(sizeof known / sizeof known[0]))
        known[known_count].kernel = kernel, known[known_count].smem = smem,
        known[known_count].cluster = cluster, known[known_count++].count = count;
    return count;
}

static_assert(LQ_PROJECT_SLICE == 4 * LQ_M1_SLICE_QUADS,
              "v6's pieces of t are the projection kernel's slices");

// v6's launch shape (lq_mma1_shape_for): CTAs of 2^rg_log row groups of 16 rows, the fewest per
// CTA that still make the grid one wave (each CTA's 8 warps then split the columns into 8 /
// 2^rg_log slices; LQ_CUDA_MMA1_ROW_GROUPS = 1, 2, 4, 8 forces one); clusters of 2^cluster_log
// CTAs (LQ_CUDA_MMA1_CLUSTER=2|4, where the GPU holds them); t_pieces > 0: the projection in the
// kernel (LQ_CUDA_MMA1_INLINE_T=1); smem: the dynamic shared memory of it all.
struct lq_mma1_shape {
    int rg_log, cluster_log, t_pieces;
    size_t smem;
};

// *kernel: lq_mma1_pick's; the instance with the projection in it where that is the shape.
static void lq_mma1_shape_for(const struct lq_cuda *cuda, const struct lq_linear *w,
                              const struct lq_cuda_linear_data *data, int bpc, bool share, int ctas,
                              bool stage, int t_slices, lq_m1_fn *kernel,
                              struct lq_mma1_shape *out) {
    const int bits = w->q.config.b0, chunks = w->cols / 32;
    const size_t smem = stage ? lq_m1_staged_shared_bytes(bits, chunks, cuda->reserved_shared)
                              : lq_m1_shared_bytes(bits, chunks, cuda->reserved_shared);
    const long sms = cuda->sm_count > 0 ? cuda->sm_count : 1;
    // the CTAs an SM holds: what the registers allow (the kernel's CTAS), or fewer where the
    // shared memory runs out first
    const auto per_sm = [&](size_t bytes) {
        const long fit = (long)(lq_mma1_shared_per_sm(cuda) / (bytes + cuda->reserved_shared));
        return fit < ctas ? (fit > 0 ? fit : 1) : (long)ctas;
    };
    // LQ_CUDA_MMA1_ROOM=N (default 0): the grid leaves N CTA slots of each SM free, where the
    // kernel after it (launched early by PDL) can start its loads while this one runs (a
    // measurement: at 2 CTAs a SM of 128 registers, or 3 of 80, an SM has no room for another
    // CTA until one of this kernel's ends)
    const long room = lq_env_int("LQ_CUDA_MMA1_ROOM", 0), held = per_sm(smem);
    const long slots = sms * (held - room > 1 ? held - room : 1);
    const long groups = (w->rows + 15) / 16;
    int rg_log = 0;
    while (rg_log < 3 && (groups + (1L << rg_log) - 1) >> rg_log > slots) rg_log++;
    const int forced = lq_env_int("LQ_CUDA_MMA1_ROW_GROUPS", 0);
    if (forced == 1 || forced == 2 || forced == 4 || forced == 8)
        rg_log = forced == 1 ? 0 : forced == 2 ? 1 : forced == 4 ? 2 : 3;
    const int cluster = lq_env_int("LQ_CUDA_MMA1_CLUSTER", 0);
    int cluster_log = cluster == 2 ? 1 : cluster == 4 ? 2 : 0;
    if (cluster_log > 0 && lq_mma1_occupancy(cuda, *kernel, smem, 1 << cluster_log) < 1)
        cluster_log = 0; // one CTA stages all of x
    out->rg_log = rg_log, out->cluster_log = cluster_log, out->t_pieces = 0, out->smem = smem;
    // The projection in the kernel (gemv_mma1_kernel.h), off by default until it has run on a
    // GPU (written 2026-11-27 without one): its CTAs wait for each other, so only where all of
    // them fit on the GPU at once (one wave of what the registers and the shared memory, its
    // pieces' area included, let an SM hold), at most LQ_M1_MAX_T_PIECES pieces a CTA.
    const long grid = lq_m1_grid(w->rows, rg_log, 0);
    const long pieces = ((long)w->rank * t_slices + grid - 1) / grid;
    if (lq_env_int("LQ_CUDA_MMA1_INLINE_T", 0) == 0 || w->rank <= 0 || cluster_log > 0 ||
        t_slices <= 0 || pieces > LQ_M1_MAX_T_PIECES || !data->lora_A || !data->tickets ||
        ((uintptr_t)data->lora_A & 15u) != 0)
        return;
    const size_t with_pieces = smem + lq_m1_t_area_bytes((int)pieces);
    if (with_pieces > (stage ? LQ_M1_MAX_SHARED_STAGED : LQ_M1_MAX_SHARED) ||
        grid > sms * per_sm(with_pieces))
        return;
    const lq_m1_fn projecting = lq_mma1_projecting_kernel(bits, bpc, share, ctas, stage);
    if (!projecting || grid > sms * lq_mma1_occupancy(cuda, projecting, with_pieces, 1))
        return; // (4 CTAs a SM: no such instance; or the runtime says the SMs hold fewer)
    *kernel = projecting;
    out->t_pieces = (int)pieces, out->smem = with_pieces;
}

// v6's launch in its shape. The L2 prefetch runs LQ_CUDA_MMA1_PREFETCH tiles ahead (default 2,
// 0 off). wait_before_x: x is the kernel before's output (the projection in the kernel only:
// else the projection kernel comes between them).
static cudaError_t lq_launch_mma1(const struct lq_cuda *cuda, const struct lq_linear *w,
                                  const struct lq_cuda_linear_data *data, lq_m1_fn kernel,
                                  bool share, bool stage, const struct lq_mma1_shape &shape,
                                  bool wait_before_x, bool overlap,
                                  const struct lq_linear_input &input, enum lq_linear_output output,
                                  const lq_decode_args &d) {
    const lq_packed &q = d.q;
    lq_m1_args a;
    memset(&a, 0, sizeof a);
    a.codes = q.codes, a.scale_codes = q.scale_codes;
    a.group_scales = data->group_scales_f32 ? data->group_scales_f32
                                            : (const float *)data->group_scales; // fp32 already
    memcpy(a.nf_table, lq_nf_code_table(w->q.config.b0), sizeof(float) << w->q.config.b0);
    a.x = d.x, a.lora_B = d.lora_B, a.t = d.t, a.y = d.y;
    a.rows = q.rows, a.cols = q.cols, a.b1 = q.b1, a.rank = d.rank;
    a.t_slices = d.t_slices;
    a.offset = q.offset, a.inv_levels = q.inv_levels;
    a.chunk_block = q.chunk_block, a.group = q.group;
    a.chunks_per_row = d.chunks_per_row;
    a.table_offset = lq_m1_table_offset(w->q.config.b0, a.chunks_per_row, cuda->reserved_shared);
    a.rg_log = shape.rg_log, a.cluster_log = shape.cluster_log;
    // (staged codes are copied LQ_M1_RING tiles ahead: no L2 prefetch)
    a.prefetch_tiles = stage ? 0 : lq_env_int("LQ_CUDA_MMA1_PREFETCH", 2);
    a.share_scales = share, a.stage = stage; // as lq_mma1_pick chose the kernel
    a.input = input.kind, a.norm_weight = input.weight, a.eps = input.eps;
    a.output = output;
    if (shape.t_pieces > 0) { // t is the workspace the projection kernel would have written
        a.t_pieces = shape.t_pieces, a.wait_before_x = wait_before_x;
        a.lora_A = data->lora_A, a.t_out = (float *)d.t, a.barrier = data->tickets;
        a.spin_limit = lq_mma1_spin_limit();
    }
    const dim3 grid((unsigned)lq_m1_grid(a.rows, a.rg_log, a.cluster_log));
    if (a.cluster_log == 0)
        return lq_launch_pdl(overlap, kernel, grid, dim3(LQ_M1_THREADS), shape.smem, cuda->stream,
                             a);
    cudaLaunchAttribute attributes[2] = {};
    attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[0].val.programmaticStreamSerializationAllowed = 1;
    attributes[1].id = cudaLaunchAttributeClusterDimension;
    attributes[1].val.clusterDim.x = 1u << a.cluster_log;
    attributes[1].val.clusterDim.y = attributes[1].val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(LQ_M1_THREADS);
    config.dynamicSmemBytes = shape.smem;
    config.stream = cuda->stream;
    config.attrs = overlap ? attributes : attributes + 1;
    config.numAttrs = overlap ? 2 : 1;
    return cudaLaunchKernelEx(&config, kernel, a);
}

// b0 = 3 or 4 with 1 or 2 blocks per chunk (4, i.e. B0 = 8, would spill: lq_decode_kernel);
// NULL for clusters at b0 = 4 with B0 = 16 (that kernel spills).
template <bool CLUSTER> static lq_decode_fn lq_gemv_kernel_for(int bits, int bpc) {
    if (bits == 3) return bpc == 1 ? lq_gemv_kernel<3, 1, CLUSTER> : lq_gemv_kernel<3, 2, CLUSTER>;
    if constexpr (CLUSTER)
        return bpc == 1 ? lq_gemv_kernel<4, 1, true> : NULL;
    else
        return bpc == 1 ? lq_gemv_kernel<4, 1, false> : lq_gemv_kernel<4, 2, false>;
}

// lq_gemv_kernel<..., true>: clusters of the band's slices, the band's sums in dynamic shared
// memory; PDL as lq_launch_pdl.
static cudaError_t lq_launch_gemv_cluster(lq_decode_fn kernel, const lq_decode_grid &grid,
                                          cudaStream_t stream, bool after_prologue,
                                          const lq_decode_args &a) {
    cudaLaunchAttribute attributes[2] = {};
    attributes[0].id = cudaLaunchAttributeClusterDimension;
    attributes[0].val.clusterDim.x = 1;
    attributes[0].val.clusterDim.y = (unsigned)grid.slices;
    attributes[0].val.clusterDim.z = 1;
    attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[1].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3((unsigned)grid.bands, (unsigned)grid.slices);
    config.blockDim = dim3(LQ_DECODE_THREADS);
    config.dynamicSmemBytes = (size_t)LQ_GEMV_GROUP_ROWS * grid.iters * sizeof(float);
    config.stream = stream;
    config.attrs = attributes;
    config.numAttrs = after_prologue ? 2 : 1;
    return cudaLaunchKernelEx(&config, kernel, a);
}

// t = x · L2ᵀ into workspace t (kernel 1 of decode).
static_assert(LQ_CUDA_GROUP_MAX <= LQ_PROJECT_GROUP_MAX, "a group's projections in one launch");

// t = x · L2ᵀ for every layer of g (one CTA per rank row; nt tokens, n of them real).
static int lq_launch_projection(struct lq_cuda *cuda, const lq_project_group &g, const float *x,
                                int n, int nt, int cols) {
    const int vector = cols % 4 == 0 && ((uintptr_t)x & 15u) == 0;
    void (*project)(const float *, int, int, lq_project_group, int) =
        nt == 1   ? lq_lowrank_project_kernel<1>
        : nt == 2 ? lq_lowrank_project_kernel<2>
        : nt == 4 ? lq_lowrank_project_kernel<4>
                  : lq_lowrank_project_kernel<8>;
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, project, dim3((unsigned)g.first[g.count]), dim3(256), 0,
                              cuda->stream, x, n, cols, g, vector),
                "lq_lowrank_project_kernel");
    return LQ_OK;
}

int lq_cuda_lowrank_project_group(struct lq_cuda *cuda, int count, const float *const *lora_A,
                                  const int *rank, int cols, const float *x, int n,
                                  float *const *t) {
    if (count < 1 || count > LQ_PROJECT_GROUP_MAX) return LQ_EINVAL;
    const int vector = cols % 4 == 0 && ((uintptr_t)x & 15u) == 0;
    if (n <= 0) return LQ_OK;
    lq_project_group g;
    memset(&g, 0, sizeof g);
    g.count = count;
    for (int i = 0; i < count; i++) {
        if (rank[i] < 1) return LQ_EINVAL;
        g.lora_A[i] = lora_A[i], g.rank[i] = rank[i], g.t[i] = t[i];
        g.first[i + 1] = g.first[i] + rank[i];
    }
    // one launch, a CTA per (rank row of a layer, 8 tokens); with PDL it waits for the kernel
    // before it, and the next may launch meanwhile
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, lq_lowrank_project_kernel<8>,
                              dim3((unsigned)g.first[count], (unsigned)((n + 7) / 8)), dim3(256), 0,
                              cuda->stream, x, n, cols, g, vector),
                "lq_lowrank_project_kernel");
    return LQ_OK;
}

// See struct lq_prefetch and lq_cuda::last_decoded. A link is learned from the order layers
// run in (a decode step runs them in the same order every time) and is dropped whenever any
// layer is released, so it never names freed memory.
void lq_cuda_prefetch_plan(struct lq_cuda *cuda, struct lq_cuda_linear_data *data,
                           struct lq_prefetch *out) {
    memset(out, 0, sizeof *out);
    struct lq_cuda_linear_data *before = cuda->last_decoded;
    if (before && before != data)
        before->next = data, before->next_generation = cuda->link_generation;
    cuda->last_decoded = data;
    const struct lq_cuda_linear_data *next = data->next;
    if (!cuda->prefetch_enabled || !next || next == data ||
        data->next_generation != cuda->link_generation)
        return;
    const size_t rank = next->rank > 0 ? (size_t)next->rank : 0;
    const struct {
        const void *base;
        size_t bytes;
    } regions[LQ_PREFETCH_REGIONS] = {
        {next->codes, next->codes_bytes},
        {next->scale_codes, next->scale_codes_bytes},
        {next->group_scales, next->group_scales_bytes},
        {next->lora_A, rank * (size_t)next->cols * sizeof(float)},
        {next->lora_B, (size_t)next->rows * rank * sizeof(float)},
    };
    uint32_t pieces = 0;
    for (int i = 0; i < LQ_PREFETCH_REGIONS; i++) {
        const size_t bytes = regions[i].bytes / 16 * 16;
        if (!regions[i].base || bytes == 0 || bytes > UINT32_MAX / 2) continue;
        pieces += (uint32_t)((bytes + LQ_PREFETCH_PIECE - 1) / LQ_PREFETCH_PIECE);
        out->base[out->count] = (const char *)regions[i].base;
        out->bytes[out->count] = (uint32_t)bytes;
        out->end_piece[out->count] = pieces;
        out->count++;
    }
}

// What decoding one layer launches: its projection (rank > 0) and decode kernel, their
// arguments and the workspaces they need (lq_decode_plan_for; the caller provides the
// workspaces, then launches).
struct lq_decode_plan {
    const struct lq_linear *w;
    const struct lq_cuda_linear_data *data;
    int nt, bpc, b0, variant, rows_per_warp;
    lq_decode_fn rows_fn;
    lq_m1_fn mma1_kernel;
    bool mma1_share; // its lanes share block scales (the kernel's template argument)
    int mma1_ctas;   // CTAs per SM its registers allow (the kernel's template argument)
    bool mma1_stage; // its codes go through shared memory (the kernel's template argument)
    struct lq_mma1_shape mma1_shape; // its grid, clusters, projection and shared memory
    bool wait_before_x; // x is the kernel before's output (mma1_shape.t_pieces > 0 only)
    // A fused input and output (lq_cuda_linear_fused: v6 plans only; else plain and written,
    // with input.x = a.x)
    struct lq_linear_input input;
    enum lq_linear_output output;
    bool split_projection, gemv, overlap;
    lq_decode_grid grid;
    lq_decode_args a;      // a.t and a.partials are the caller's workspaces
    size_t t_bytes;        // x · L2ᵀ (rank > 0)
    size_t partials_bytes; // the column slices' sums (0: none)
};

static void lq_decode_plan_for(struct lq_cuda *cuda, const struct lq_linear *w,
                               const struct lq_cuda_linear_data *data, const float *x, int n,
                               float *y, const struct lq_prefetch *prefetch,
                               struct lq_decode_plan *p) {
    memset(p, 0, sizeof *p);
    p->w = w, p->data = data;
    p->nt = lq_pad_tokens(n);
    p->bpc = ((uintptr_t)x & 15u) == 0 ? lq_cuda_blocks_per_chunk(w) : 0;
    p->b0 = w->q.config.b0;
    int variant = p->bpc && p->nt == 1 && p->b0 <= 4 ? lq_decode_variant() : 1;
    const bool automatic = variant == 0;
    if (automatic && lq_auto_takes_mma1()) variant = 6;
    p->mma1_kernel = variant == 6 ? lq_mma1_pick(cuda, w, data, p->bpc, &p->mma1_share,
                                                 &p->mma1_ctas, &p->mma1_stage)
                                  : NULL;
    if (variant == 6 && !p->mma1_kernel) variant = automatic ? 0 : 1;
    if (variant == 0) variant = w->rows >= 8192 || w->cols >= 8192 ? 5 : 1;
    p->rows_fn = variant == 5 || variant == 52 || variant == 54
                     ? lq_rows_pick(cuda, w, p->bpc, variant, &p->rows_per_warp)
                     : NULL;
    p->variant = variant;
    p->split_projection = p->rows_fn != NULL || p->mma1_kernel != NULL;
    p->gemv = variant >= 2 && variant <= 4 && (p->bpc == 1 || p->bpc == 2) && p->b0 >= 3;
    const bool beside_projection = variant == 4 && w->rank > 0 && data->overlap;
    p->grid =
        p->gemv ? lq_gemv_grid_for(cuda, w, beside_projection) : lq_decode_grid_for(cuda, w, p->nt);
    p->overlap = w->rank > 0 && data->overlap;
    p->input.kind = LQ_INPUT_PLAIN, p->input.x = x;
    lq_decode_args &a = p->a;
    memset(&a, 0, sizeof a);
    a.q = lq_packed_of(w, data);
    a.x = x, a.n = n, a.y = y;
    a.lora_B = data->lora_B, a.rank = w->rank;
    a.tickets = data->tickets;
    a.chunks_per_row = w->cols / 32;
    a.iters = p->grid.iters;
    a.prefetch = *prefetch;
    a.t_slices = p->split_projection ? (w->cols + LQ_PROJECT_SLICE - 1) / LQ_PROJECT_SLICE : 0;
    p->t_bytes =
        w->rank > 0 ? (size_t)(p->split_projection ? a.t_slices : n) * w->rank * sizeof(float) : 0;
    if (p->mma1_kernel)
        lq_mma1_shape_for(cuda, w, data, p->bpc, p->mma1_share, p->mma1_ctas, p->mma1_stage,
                          a.t_slices, &p->mma1_kernel, &p->mma1_shape);
    p->partials_bytes = p->bpc ? (size_t)p->grid.slices * p->nt * w->rows * sizeof(float) : 0;
}

// t = x · L2ᵀ into each plan's a.t (kernel 1 of decode), for every plan with rank > 0 (of one x
// and one width): one launch for those that take column-slice sums (v5, v6), one for the others.
static int lq_decode_project(struct lq_cuda *cuda, const struct lq_decode_plan *plans, int count) {
    lq_project_group split, whole;
    memset(&split, 0, sizeof split);
    memset(&whole, 0, sizeof whole);
    const struct lq_decode_plan *split_plan = NULL, *whole_plan = NULL;
    for (int i = 0; i < count; i++) {
        const struct lq_decode_plan *p = &plans[i];
        if (p->w->rank <= 0 || p->mma1_shape.t_pieces > 0) continue; // (projected in the kernel)
        lq_project_group &g = p->split_projection ? split : whole;
        (p->split_projection ? split_plan : whole_plan) = p;
        const int at = g.count++;
        g.lora_A[at] = p->data->lora_A, g.rank[at] = p->w->rank, g.t[at] = (float *)p->a.t;
        g.first[at + 1] = g.first[at] + p->w->rank;
        // one input per group (lq_cuda_linear_fused): only the split kernel takes a fused one
        g.input = p->input.kind;
        g.second = p->input.weight;
    }
    if (whole.count && whole.input != LQ_INPUT_PLAIN) return LQ_EINVAL;
    if (split.count)
        LQ_CUDA_TRY(lq_launch_pdl(
                        cuda->pdl, lq_lowrank_project_split_kernel,
                        dim3((unsigned)split.first[split.count], (unsigned)split_plan->a.t_slices),
                        dim3(256), 0, cuda->stream, split_plan->a.x, split_plan->w->cols, split),
                    "lq_lowrank_project_split_kernel");
    if (whole.count)
        return lq_launch_projection(cuda, whole, whole_plan->a.x, whole_plan->a.n, whole_plan->nt,
                                    whole_plan->w->cols);
    return LQ_OK;
}

// The decode kernel (kernel 2: it waits for the projection only before it reads t).
static int lq_decode_main(struct lq_cuda *cuda, const struct lq_decode_plan *p) {
    const struct lq_linear *w = p->w;
    const lq_decode_args &a = p->a;
    const bool overlap = p->overlap;
    if (!p->bpc) {
        LQ_CUDA_TRY(lq_launch_pdl(overlap, lq_decode_generic_for(p->nt),
                                  dim3((unsigned)((w->rows + 7) / 8)), dim3(256), 0, cuda->stream,
                                  a),
                    "lq_decode_generic_kernel");
        return LQ_OK;
    }
    if (p->mma1_kernel) {
        LQ_CUDA_TRY(lq_launch_mma1(cuda, w, p->data, p->mma1_kernel, p->mma1_share, p->mma1_stage,
                                   p->mma1_shape, p->wait_before_x, overlap, p->input, p->output,
                                   a),
                    "lq_gemv_mma1_kernel");
        return LQ_OK;
    }
    if (p->rows_fn) {
        LQ_CUDA_TRY(lq_launch_rows(cuda, w, p->bpc, p->rows_fn, p->rows_per_warp, overlap, a),
                    "lq_gemv_rows_kernel");
        return LQ_OK;
    }
    const lq_decode_grid &grid = p->grid;
    if (p->gemv) {
        const lq_decode_fn cluster_kernel =
            p->variant >= 3 && grid.slices <= LQ_GEMV_MAX_CLUSTER &&
                    (long)LQ_GEMV_GROUP_ROWS * grid.iters <= LQ_GEMV_MAX_BAND_ROWS
                ? lq_gemv_kernel_for<true>(p->b0, p->bpc)
                : NULL;
        if (cluster_kernel) {
            LQ_CUDA_TRY(lq_launch_gemv_cluster(cluster_kernel, grid, cuda->stream, overlap, a),
                        "lq_gemv_kernel (clusters)");
            return LQ_OK;
        }
        LQ_CUDA_TRY(lq_launch_pdl(overlap, lq_gemv_kernel_for<false>(p->b0, p->bpc),
                                  dim3((unsigned)grid.bands, (unsigned)grid.slices),
                                  dim3(LQ_DECODE_THREADS), 0, cuda->stream, a),
                    "lq_gemv_kernel");
        return LQ_OK;
    }
    LQ_CUDA_TRY(lq_launch_pdl(overlap, lq_decode_kernel_for(p->b0, p->bpc, p->nt),
                              dim3((unsigned)grid.bands, (unsigned)grid.slices),
                              dim3(LQ_DECODE_THREADS), 0, cuda->stream, a),
                "lq_decode_kernel");
    return LQ_OK;
}

// Workspace pieces start 256-byte aligned.
static size_t lq_workspace_round(size_t bytes) {
    return (bytes + 255) / 256 * 256;
}

// Decodes count layers of one input x (a step's Q, K, V, or gate and up): their workspaces are
// carved from one slot each, every projection is queued first, then every decode kernel. A
// decode kernel reads x and decodes before it waits (griddepcontrol.wait) for the kernel before
// it, and lets the next one launch at once, so with the projections out of the way each decode
// kernel's CTAs start on the SMs the one before frees while its last wave runs, instead of
// after it has ended and a projection has run. What each kernel computes is unchanged: the
// same bits as lq_decode one layer at a time.
static int lq_decode_layers(struct lq_cuda *cuda, struct lq_decode_plan *plans, int count) {
    size_t t_bytes = 0, partials_bytes = 0;
    for (int i = 0; i < count; i++)
        t_bytes += lq_workspace_round(plans[i].t_bytes),
            partials_bytes += lq_workspace_round(plans[i].partials_bytes);
    // Workspaces first: nothing is queued when one cannot be had.
    void *t = NULL, *partials = NULL;
    int rc;
    if (t_bytes && (rc = lq_cuda_slot(cuda, LQ_CUDA_LOWRANK, t_bytes, &t))) return rc;
    if (partials_bytes && (rc = lq_cuda_slot(cuda, LQ_CUDA_LINEAR_TILE, partials_bytes, &partials)))
        return rc;
    for (int i = 0; i < count; i++) {
        // x is the kernel before's output for the first layer only: the others' kernels follow
        // it (or the projection kernel), written two or more kernels back
        plans[i].wait_before_x = i == 0;
        plans[i].a.t = plans[i].t_bytes ? (const float *)t : NULL;
        plans[i].a.partials = plans[i].partials_bytes ? (float *)partials : NULL;
        t = (char *)t + lq_workspace_round(plans[i].t_bytes);
        partials = (char *)partials + lq_workspace_round(plans[i].partials_bytes);
    }
    if ((rc = lq_decode_project(cuda, plans, count))) return rc;
    for (int i = 0; i < count; i++)
        if ((rc = lq_decode_main(cuda, &plans[i]))) return rc;
    return LQ_OK;
}

static int lq_decode(struct lq_cuda *cuda, const struct lq_linear *w,
                     const struct lq_cuda_linear_data *data, const float *x, int n, float *y,
                     const struct lq_prefetch *prefetch) {
    struct lq_decode_plan plan;
    lq_decode_plan_for(cuda, w, data, x, n, y, prefetch, &plan);
    return lq_decode_layers(cuda, &plan, 1);
}

// Dequantizes rows [r0, r0 + count) of Q into a tile of fp16 (prefill) or fp32 (training).
template <typename T>
static int lq_launch_dequant(struct lq_cuda *cuda, const struct lq_linear *w, const lq_packed &q,
                             size_t r0, size_t count, T *tile) {
    const struct lq_nf_config *c = &w->q.config;
    const size_t cols = (size_t)w->cols, values = count * cols, first = r0 * cols;
    const bool octets =
        cols % 8 == 0 && c->B0 % 8 == 0 && (size_t)w->rows * cols < ((size_t)1 << 31);
    if (!octets) {
        lq_dequant_tile_generic_kernel<T><<<lq_grid_for(values, cuda), 256, 0, cuda->stream>>>(
            q, (uint64_t)first, (uint64_t)values, tile);
        LQ_CUDA_LAUNCHED("lq_dequant_tile_generic_kernel");
        return LQ_OK;
    }
    void (*dequant)(lq_packed, uint32_t, uint32_t, T *) =
        c->b0 == 2   ? lq_dequant_tile_kernel<2, T>
        : c->b0 == 3 ? lq_dequant_tile_kernel<3, T>
        : c->b0 == 4 ? lq_dequant_tile_kernel<4, T>
                     : lq_dequant_tile_kernel<8, T>;
    dequant<<<lq_grid_for(values / 8, cuda), 256, 0, cuda->stream>>>(q, (uint32_t)(first / 8),
                                                                     (uint32_t)(values / 8), tile);
    LQ_CUDA_LAUNCHED("lq_dequant_tile_kernel");
    return LQ_OK;
}

template <typename T>
static int lq_dequant_rows(struct lq_cuda *cuda, const struct lq_linear *w,
                           const struct lq_cuda_linear_data *data, size_t r0, size_t count,
                           T *tile) {
    if (!w->is_lq || !data->codes || r0 + count > (size_t)w->rows) return LQ_EINVAL;
    if (count == 0) return LQ_OK;
    return lq_launch_dequant(cuda, w, lq_packed_of(w, data), r0, count, tile);
}

int lq_cuda_dequant_rows_f32(struct lq_cuda *cuda, const struct lq_linear *w,
                             const struct lq_cuda_linear_data *data, size_t r0, size_t count,
                             float *tile) {
    return lq_dequant_rows(cuda, w, data, r0, count, tile);
}

int lq_cuda_dequant_rows_bf16(struct lq_cuda *cuda, const struct lq_linear *w,
                              const struct lq_cuda_linear_data *data, size_t r0, size_t count,
                              __nv_bfloat16 *tile) {
    return lq_dequant_rows(cuda, w, data, r0, count, tile);
}

static int lq_prefill(struct lq_cuda *cuda, const struct lq_linear *w,
                      const struct lq_cuda_linear_data *data, const float *x, int n, float *y) {
    const int rows = w->rows, cols = w->cols, rank = w->rank;
    const size_t x_count = (size_t)n * cols;
    size_t step = LQ_TILE_BYTES / ((size_t)cols * sizeof(__half)); // rows per tile
    if (step < 1) step = 1;
    if (step >= (size_t)rows)
        step = (size_t)rows;
    else if (step >= 128)
        step -= step % 128; // whole GEMM tiles

    void *input = NULL, *tile = NULL, *t = NULL;
    int rc;
    if ((rc = lq_cuda_slot(cuda, LQ_CUDA_LINEAR_INPUT, x_count * sizeof(__half), &input)) ||
        (rc = lq_cuda_slot(cuda, LQ_CUDA_LINEAR_TILE, step * cols * sizeof(__half), &tile)) ||
        (rank > 0 &&
         (rc = lq_cuda_slot(cuda, LQ_CUDA_LOWRANK, (size_t)n * rank * sizeof(float), &t))))
        return rc;

    lq_to_half_kernel<<<lq_grid_for(x_count, cuda), 256, 0, cuda->stream>>>(x, x_count,
                                                                            (__half *)input);
    LQ_CUDA_LAUNCHED("lq_to_half_kernel");
    const lq_packed q = lq_packed_of(w, data);
    const float one = 1.0f, zero = 0.0f;
    for (size_t r0 = 0; r0 < (size_t)rows; r0 += step) {
        const size_t count = (size_t)rows - r0 < step ? (size_t)rows - r0 : step;
        if ((rc = lq_launch_dequant(cuda, w, q, r0, count, (__half *)tile))) return rc;
        // y[:, r0 : r0 + count] = x16 · tileᵀ, written in place (ldc = rows)
        LQ_CUBLAS_TRY(cublasGemmEx(cuda->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)count, n, cols,
                                   &one, tile, CUDA_R_16F, cols, input, CUDA_R_16F, cols, &zero,
                                   y + r0, CUDA_R_32F, rows, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT),
                      "cublasGemmEx (LQ tile)");
    }
    if (rank > 0) { // y += (x · L2ᵀ) · L1ᵀ, fp32 values, TF32 products (lq_cuda_lowrank_tf32)
        const bool tf32 = lq_cuda_lowrank_tf32();
        if ((rc = lq_cuda_gemm_nt(cuda, tf32, data->lora_A, rank, cols, x, n, 0.0f, (float *)t,
                                  rank)))
            return rc;
        return lq_cuda_gemm_nt(cuda, tf32, data->lora_B, rows, rank, (const float *)t, n, 1.0f, y,
                               rows);
    }
    return LQ_OK;
}

int lq_cuda_linear(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                   float *y) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    // the backend's own state: only the prefetch links change, under the op lock
    struct lq_cuda_linear_data *data = (struct lq_cuda_linear_data *)w->backend_data;
    if (!data || n < 0) return LQ_EINVAL;
    if (n == 0) return LQ_OK;
    if (!w->is_lq) return lq_sgemm_nt(cuda, data->dense, w->rows, w->cols, x, n, 0.0f, y, w->rows);
    struct lq_prefetch prefetch;
    lq_cuda_prefetch_plan(cuda, data, &prefetch);
    if (n >= LQ_MMA_MIN_TOKENS && n <= LQ_CUDA_MMA_MAX_TOKENS &&
        lq_cuda_linear_mma_supported(cuda, w, n)) { // fused dequantize + mma.sync
        const struct lq_cuda_lq_buffers buffers = {
            data->codes,  data->scale_codes, data->group_scales, data->table,
            data->lora_A, data->lora_B,      data->overlap,      prefetch};
        return lq_cuda_linear_mma(cuda, w, &buffers, x, n, y);
    }
    if (n <= LQ_DECODE_MAX_TOKENS) return lq_decode(cuda, w, data, x, n, y, &prefetch);
    return lq_prefill(cuda, w, data, x, n, y);
}

int lq_cuda_linear_group(struct lq_backend *backend, const struct lq_linear *const *w, int count,
                         const float *x, int n, float *const *y) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (count < 0 || n < 0) return LQ_EINVAL;
    // Together only where every layer takes the one-to-four-token decode kernels, or every one
    // the 5-to-64-token tensor-core GEMM, and nothing that a layer writes is read by another.
    const bool mma = n >= LQ_MMA_MIN_TOKENS && n <= LQ_CUDA_MMA_MAX_TOKENS;
    bool together = count > 1 && count <= LQ_CUDA_GROUP_MAX && n >= 1 &&
                    (n < LQ_MMA_MIN_TOKENS || mma) &&
                    lq_env_int("LQ_CUDA_GROUP", 1) != 0; // 0: apart (for benchmarks)
    for (int i = 0; i < count && together; i++) {
        together = w[i]->backend_data && w[i]->is_lq && w[i]->cols == w[0]->cols && y[i] != x &&
                   (!mma || lq_cuda_linear_mma_supported(cuda, w[i], n));
        for (int j = 0; j < i && together; j++) together = y[j] != y[i];
    }
    if (together && mma) {
        struct lq_cuda_lq_buffers buffers[LQ_CUDA_GROUP_MAX];
        const struct lq_cuda_lq_buffers *of[LQ_CUDA_GROUP_MAX];
        for (int i = 0; i < count; i++) {
            struct lq_cuda_linear_data *data = (struct lq_cuda_linear_data *)w[i]->backend_data;
            struct lq_prefetch prefetch;
            lq_cuda_prefetch_plan(cuda, data, &prefetch);
            buffers[i] = {data->codes,  data->scale_codes, data->group_scales, data->table,
                          data->lora_A, data->lora_B,      data->overlap,      prefetch};
            of[i] = &buffers[i];
        }
        return lq_cuda_linear_mma_group(cuda, w, of, count, x, n, y);
    }
    if (!together) {
        for (int i = 0; i < count; i++) {
            const int rc = lq_cuda_linear(backend, w[i], x, n, y[i]);
            if (rc) return rc;
        }
        return LQ_OK;
    }
    struct lq_decode_plan plans[LQ_CUDA_GROUP_MAX];
    for (int i = 0; i < count; i++) {
        struct lq_cuda_linear_data *data = (struct lq_cuda_linear_data *)w[i]->backend_data;
        struct lq_prefetch prefetch;
        lq_cuda_prefetch_plan(cuda, data, &prefetch);
        lq_decode_plan_for(cuda, w[i], data, x, n, y[i], &prefetch, &plans[i]);
    }
    return lq_decode_layers(cuda, plans, count);
}

int lq_cuda_fuses_linears(struct lq_backend *backend, int n) {
    (void)backend;
    const int variant = lq_decode_variant();
    return n == 1 && (variant == 6 || (variant == 0 && lq_auto_takes_mma1())) &&
           lq_env_int("LQ_CUDA_FUSE", 1) != 0;
}

// linear_fused where its kernels cannot take the norm or the output: the unfused ops, the
// normed input in a workspace of its own, the result to add in another (then add), or SwiGLU
// on the two results (as the unfused pass runs it).
static int lq_linear_fused_apart(struct lq_backend *backend, const struct lq_linear *const *w,
                                 int count, const struct lq_linear_input *in, int n,
                                 float *const *y, enum lq_linear_output output) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    const int cols = w[0]->cols;
    const float *x = in->x;
    int rc;
    if (in->kind == LQ_INPUT_RMSNORM) {
        void *normed = NULL;
        if ((rc = lq_cuda_slot(cuda, LQ_CUDA_FUSED_INPUT, (size_t)n * cols * sizeof(float),
                               &normed)) ||
            (rc = lq_cuda_rmsnorm(backend, in->x, in->weight, n, cols, in->eps, (float *)normed)))
            return rc;
        x = (const float *)normed;
    }
    if (output != LQ_OUTPUT_ADD) {
        rc = lq_cuda_linear_group(backend, w, count, x, n, y);
        if (rc || output == LQ_OUTPUT_WRITE) return rc;
        return lq_cuda_swiglu(backend, y[0], y[1], (size_t)n * w[0]->rows);
    }
    void *out = NULL;
    if ((rc = lq_cuda_slot(cuda, LQ_CUDA_FUSED_OUTPUT, (size_t)n * w[0]->rows * sizeof(float),
                           &out)) ||
        (rc = lq_cuda_linear(backend, w[0], x, n, (float *)out)))
        return rc;
    return lq_cuda_add(backend, y[0], (const float *)out, (size_t)n * w[0]->rows);
}

int lq_cuda_linear_fused(struct lq_backend *backend, const struct lq_linear *const *w, int count,
                         const struct lq_linear_input *in, int n, float *const *y,
                         enum lq_linear_output output) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (count < 1 || count > LQ_CUDA_GROUP_MAX || n < 0 || !in || !in->x ||
        (in->kind != LQ_INPUT_PLAIN && in->kind != LQ_INPUT_RMSNORM) ||
        (in->kind == LQ_INPUT_RMSNORM && !in->weight) ||
        (output != LQ_OUTPUT_WRITE && output != LQ_OUTPUT_ADD && output != LQ_OUTPUT_SWIGLU) ||
        (output == LQ_OUTPUT_ADD && count != 1) ||
        (output == LQ_OUTPUT_SWIGLU && (count != 2 || w[0]->rows != w[1]->rows || y[0] == y[1])))
        return LQ_EINVAL;
    for (int i = 0; i < count; i++)
        if (!w[i]->backend_data || w[i]->cols != w[0]->cols) return LQ_EINVAL;
    if (n == 0) return LQ_OK;
    // In the kernels only where every layer takes v6 at one token, and its inputs are aligned
    // as its float4 loads need; LQ_CUDA_FUSE=0 runs the ops apart (for benchmarks).
    bool fused = lq_cuda_fuses_linears(backend, n) && ((uintptr_t)in->x & 15u) == 0 &&
                 (in->kind != LQ_INPUT_RMSNORM || ((uintptr_t)in->weight & 15u) == 0);
    struct lq_decode_plan plans[LQ_CUDA_GROUP_MAX];
    for (int i = 0; i < count && fused; i++) {
        struct lq_cuda_linear_data *data = (struct lq_cuda_linear_data *)w[i]->backend_data;
        fused = w[i]->is_lq && y[i] != in->x;
        for (int j = 0; j < i && fused; j++) fused = y[j] != y[i];
        if (!fused) break;
        // SwiGLU: up's kernel (after gate's) writes silu(gate)·up over gate's result in y[0]
        const bool up_of_swiglu = output == LQ_OUTPUT_SWIGLU && i == 1;
        struct lq_prefetch prefetch;
        lq_cuda_prefetch_plan(cuda, data, &prefetch);
        lq_decode_plan_for(cuda, w[i], data, in->x, n, up_of_swiglu ? y[0] : y[i], &prefetch,
                           &plans[i]);
        fused = plans[i].mma1_kernel != NULL;
        plans[i].input = *in;
        plans[i].output = output == LQ_OUTPUT_SWIGLU
                              ? (up_of_swiglu ? LQ_OUTPUT_SWIGLU : LQ_OUTPUT_WRITE)
                              : output;
    }
    if (!fused) return lq_linear_fused_apart(backend, w, count, in, n, y, output);
    return lq_decode_layers(cuda, plans, count);
}

int lq_cuda_matmul(struct lq_backend *backend, const float *w, int rows, int cols, const float *x,
                   int n, float *y) {
    if (n < 0 || rows < 0 || cols < 0) return LQ_EINVAL;
    if (n == 0 || rows == 0) return LQ_OK;
    return lq_sgemm_nt(lq_cuda_of(backend), w, rows, cols, x, n, 0.0f, y, rows);
}

size_t lq_cuda_linear_bytes_read(const struct lq_linear *w) {
    if (!w->is_lq) return (size_t)w->rows * (size_t)w->cols * sizeof(float);
    const size_t factors = (size_t)(w->rank > 0 ? w->rank : 0) * ((size_t)w->rows + w->cols);
    return lq_nf_codes_bytes(&w->q) + lq_nf_scale_codes_bytes(&w->q) +
           lq_nf_group_scales_bytes(&w->q) + factors * sizeof(float);
}

// ---------------------------------------------------------------------------------------------
// Prepare / release.

static void lq_linear_data_free(struct lq_cuda *cuda, struct lq_cuda_linear_data *data) {
    void *pointers[] = {data->dense,        data->codes,  data->scale_codes,
                        data->group_scales, data->table,  data->group_scales_f32,
                        data->lora_A,       data->lora_B, data->tickets};
    for (size_t i = 0; i < sizeof pointers / sizeof pointers[0]; i++)
        if (pointers[i]) lq_cuda_free(cuda, pointers[i]);
    free(data);
}

// A device copy of host bytes; `padding` zero bytes after the data rounded up to 4 bytes.
static int lq_upload(struct lq_cuda *cuda, const void *host, size_t bytes, size_t padding,
                     void **out, struct lq_error *err) {
    const size_t total = (bytes + 3) / 4 * 4 + padding;
    int rc = lq_cuda_malloc(cuda, total > 0 ? total : 4, LQ_CUDA_WEIGHTS, out, err);
    if (rc) return rc;
    cudaError_t status =
        bytes ? cudaMemcpyAsync(*out, host, bytes, cudaMemcpyHostToDevice, cuda->stream)
              : cudaSuccess;
    if (status == cudaSuccess && total > bytes)
        status = cudaMemsetAsync((char *)*out + bytes, 0, total - bytes, cuda->stream);
    return status == cudaSuccess ? LQ_OK : lq_cuda_fail(status, "uploading a linear layer", err);
}

static int lq_upload_lq(struct lq_cuda *cuda, const struct lq_linear *w,
                        struct lq_cuda_linear_data *data, struct lq_error *err) {
    const struct lq_nf_matrix *q = &w->q;
    int rc = lq_nf_config_validate(&q->config, err);
    if (rc) return rc;
    if (q->rows != (size_t)w->rows || q->cols != (size_t)w->cols || !q->codes || !q->scale_codes ||
        !q->group_scales)
        return lq_error_set(err, LQ_EINVAL, "packed matrix is %zu x %zu or missing buffers",
                            q->rows, q->cols);
    if (w->rank < 0 || (w->rank > 0 && (!w->lora_A || !w->lora_B)))
        return lq_error_set(err, LQ_EINVAL, "rank %d without both low-rank factors", w->rank);
    // v6 reads past the buffers' ends into zeros (lq_m1_padding: 15 rows' worth, ~0.4% of a
    // 4096-row layer); the other kernels need 16 bytes
    const bool mma1 = q->config.b0 >= 2 && q->config.b0 <= LQ_M1_MAX_BITS && w->cols % 32 == 0 &&
                      q->config.B0 >= 16;
    uint64_t padding[3] = {LQ_PACKED_PADDING, LQ_PACKED_PADDING, LQ_PACKED_PADDING};
    if (mma1)
        lq_m1_padding(w->cols / 32, q->config.b0, q->config.b1, q->config.B0, q->config.B1,
                      padding);
    const bool wide_scales = mma1 && q->config.b2 != LQ_SCALE_FP32; // else v6 reads these
    if ((rc = lq_upload(cuda, q->codes, lq_nf_codes_bytes(q), padding[0], (void **)&data->codes,
                        err)) ||
        (rc = lq_upload(cuda, q->scale_codes, lq_nf_scale_codes_bytes(q), padding[1],
                        (void **)&data->scale_codes, err)) ||
        (rc = lq_upload(cuda, q->group_scales, lq_nf_group_scales_bytes(q),
                        wide_scales ? LQ_PACKED_PADDING : padding[2], (void **)&data->group_scales,
                        err)) ||
        (rc =
             lq_upload(cuda, lq_nf_code_table(q->config.b0),
                       ((size_t)1 << q->config.b0) * sizeof(float), 0, (void **)&data->table, err)))
        return rc;
    if (wide_scales) { // v6 reads fp32 group scales (exact widening)
        const size_t groups = lq_nf_group_scales_bytes(q) / 2;
        float *wide = (float *)malloc(groups * sizeof *wide);
        if (!wide) return lq_error_set(err, LQ_ENOMEM, "out of memory");
        for (size_t g = 0; g < groups; g++) wide[g] = lq_nf_group_scale(q, g);
        // pageable memory: cudaMemcpyAsync has taken the bytes when it returns
        rc = lq_upload(cuda, wide, groups * sizeof *wide, padding[2],
                       (void **)&data->group_scales_f32, err);
        free(wide);
        if (rc) return rc;
    }
    if (w->rank > 0 && ((rc = lq_upload(cuda, w->lora_A, (size_t)w->rank * w->cols * sizeof(float),
                                        0, (void **)&data->lora_A, err)) ||
                        (rc = lq_upload(cuda, w->lora_B, (size_t)w->rows * w->rank * sizeof(float),
                                        0, (void **)&data->lora_B, err))))
        return rc;
    // One ticket per band of the smallest band height (8 warps x 4 rows), all zero; v6 with the
    // projection in the kernel takes the first two as its counter (gemv_mma1_kernel.h).
    const size_t bands = ((size_t)w->rows + 31) / 32, tickets = bands > 2 ? bands : 2;
    return lq_upload(cuda, NULL, 0, tickets * sizeof(unsigned), (void **)&data->tickets, err);
}

// PDL needs a Hopper device and kernels compiled for it (the wait is compiled out below sm_90,
// also when sm_90 JIT-compiles older PTX).
int lq_cuda_pdl_supported(struct lq_cuda *cuda) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cuda->device) !=
        cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    cudaFuncAttributes attributes;
    if (major < 9 ||
        cudaFuncGetAttributes(&attributes, lq_decode_kernel<4, 1, 1, false>) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return attributes.ptxVersion >= 90;
}

int lq_cuda_linear_prepare(struct lq_backend *backend, struct lq_linear *linear,
                           struct lq_error *err) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    linear->backend_data = NULL;
    if (linear->rows <= 0 || linear->cols <= 0)
        return lq_error_set(err, LQ_EINVAL, "linear layer %d x %d: bad shape", linear->rows,
                            linear->cols);
    struct lq_cuda_linear_data *data =
        (struct lq_cuda_linear_data *)calloc(1, sizeof(struct lq_cuda_linear_data));
    if (!data)
        return lq_error_set(err, LQ_ENOMEM, "linear layer %d x %d: out of host memory",
                            linear->rows, linear->cols);
    int rc;
    if (!linear->is_lq)
        rc = linear->dense ? lq_upload(cuda, linear->dense,
                                       (size_t)linear->rows * linear->cols * sizeof(float), 0,
                                       (void **)&data->dense, err)
                           : lq_error_set(err, LQ_EINVAL, "dense layer without weights");
    else
        rc = lq_upload_lq(cuda, linear, data, err);
    if (!rc) {
        cudaError_t status = cudaStreamSynchronize(cuda->stream);
        if (status != cudaSuccess) rc = lq_cuda_fail(status, "uploading a linear layer", err);
    }
    if (rc) {
        lq_linear_data_free(cuda, data);
        lq_error_prefix(err, "linear layer %d x %d", linear->rows, linear->cols);
        return rc;
    }
    data->overlap = linear->is_lq ? lq_cuda_pdl_supported(cuda) : 0;
    if (linear->is_lq) {
        data->codes_bytes = lq_nf_codes_bytes(&linear->q);
        data->scale_codes_bytes = lq_nf_scale_codes_bytes(&linear->q);
        data->group_scales_bytes = lq_nf_group_scales_bytes(&linear->q);
        data->rows = linear->rows, data->cols = linear->cols, data->rank = linear->rank;
    }
    linear->backend_data = data;
    return LQ_OK;
}

void lq_cuda_linear_release(struct lq_backend *backend, struct lq_linear *linear) {
    if (!linear->backend_data) return;
    struct lq_cuda *cuda = lq_cuda_of(backend);
    cuda->link_generation++; // every learned prefetch link may name this layer: forget them
    if (cuda->last_decoded == linear->backend_data) cuda->last_decoded = NULL;
    lq_linear_data_free(cuda, (struct lq_cuda_linear_data *)linear->backend_data);
    linear->backend_data = NULL;
}
