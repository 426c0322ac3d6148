/* The one-token tensor-core decode kernel's source itself (kernels/cuda/gemv_mma1_kernel.h,
 * LQ_CUDA_DECODE=v6), run on the CPU: one pthread per CUDA thread of a CTA (256), CTAs one
 * after another, __syncthreads as a barrier of the CTA, shuffles and mma.sync m16n8k16 through
 * a buffer between two barriers of the warp (both are warp-collective: every lane of a warp
 * calls them together). The mma's fragments are taken apart and put together by the PTX ISA's
 * layout, written out here independently of the kernel. Shared memory and y are poisoned
 * before each launch.
 *
 * Checks, on shapes with partial row groups, partial k-tiles, one to many k-tiles per warp
 * slice, every b0 the kernel takes, B0 = 16 (two blocks per chunk), 32, 64 and 128, every scale
 * type, ranks 0, 8 and 80 (past the L1 values held in registers) and each CTA shape (1, 2, 4,
 * 8 row groups): y against the float64 sum of the same fp16-rounded table values and x times
 * the exact block scales (lq_nf_block_scale) plus the low-rank term, to within fp32 rounding
 * of the sum of |terms| (a value in a wrong k slot or block is off by far more), and against
 * the float64 product of the dequantized matrix to within fp16's rounding; where the rows'
 * tiles are 16-byte aligned, with the codes staged through the warps' rings too (cp.async held
 * back to its wait, and in some cases made at once). This is the kernel's indexing,
 * fragments, block separation and reductions as a GPU would run them, short of the GPU's
 * memory model and timing; tests/kernels/test_cuda_ops.c runs it on a GPU. */
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/cta_emulation.h"
#include "tests/unit/lq_test.h"

#include "core/bitpack.h"
#include "core/nf.h"
#include "core/rng.h"
#include "kernels/backend.h"

/* ---------- the CUDA words the kernel uses, for a CPU thread per CUDA thread ---------- */

/* A warp's mma exchange: every lane writes its fragments, all wait, each reads what it needs,
 * all wait again (so the buffer may be written anew). */
static struct { uint32_t a[32][4], b[32][2]; } exchange[CTA_MAX_CLUSTER][CTA_MAX_WARPS];

static float fp16_to_float(uint32_t bits) {
    const uint16_t h = (uint16_t)bits;
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}

static uint32_t float_to_fp16(float f) {
    const _Float16 v = (_Float16)f; /* round to nearest even */
    uint16_t h;
    memcpy(&h, &v, 2);
    return h;
}

#define LQ_M1_FN static inline
#define LQ_M1_HD static inline
#define LQ_M1_UNROLL

static inline uint32_t lq_m1_ldg_u32(const uint32_t *p) {
    return *p;
}
static inline float lq_m1_ldg_f32(const float *p) {
    return *p;
}
static inline float lq_m1_ldcg_f32(const float *p) {
    return *p;
}
static inline void lq_m1_ldg_f32x4(const float *p, float v[4]) {
    if ((uintptr_t)p % 16 != 0) abort(); /* a float4 load on the GPU */
    memcpy(v, p, 16);
}
/* The shared window: the emulated CTA's shared memory starts at window address window_base
 * (on the GPU, after the driver's reserved bytes); each case picks one. */
static uint32_t window_base = 0x400;
static _Thread_local const char *shared_start; /* the calling thread's CTA's shared memory */
static inline uint32_t lq_m1_window(const void *p) {
    return window_base + (uint32_t)((const char *)p - shared_start);
}
static inline uint32_t lq_m1_lds_pair(uint32_t address) {
    uint32_t v;
    memcpy(&v, shared_start + (address - window_base), 4);
    return v;
}
static inline void lq_m1_lds_u32x8(uint32_t address, uint32_t v[8]) {
    memcpy(v, shared_start + (address - window_base), 32);
}
/* cp.async: a thread's copies are held back until a wait says they must have landed (lazy: a
 * read before its wait, or before the barrier after another lane's wait, finds the poison), or
 * made at once (eager: a copy into a slot that a lane has yet to read overwrites it first).
 * Sources must lie in the codes (their padding included) or L2, 16-byte aligned, and so must the
 * shared-window addresses: the GPU faults otherwise. */
static int copy_eager;
static const char *copy_begin, *copy_end;       /* the codes, their padding included */
static const char *copy_l2_begin, *copy_l2_end; /* L2 (the projection in the kernel) */
enum { MAX_PENDING = 64 };
static _Thread_local struct {
    char *to;
    const char *from;
    int group;
} pending[MAX_PENDING];
static _Thread_local int pending_count, open_group;
static void copy_now(int i) {
    memcpy(pending[i].to, pending[i].from, 16);
}
static void copy_issue(char *to, const char *from) {
    const int in_codes = from >= copy_begin && from + 16 <= copy_end;
    const int in_l2 = from >= copy_l2_begin && from + 16 <= copy_l2_end;
    if ((!in_codes && !in_l2) || (uintptr_t)from % 16 != 0 || (to - shared_start) % 16 != 0 ||
        pending_count == MAX_PENDING)
        abort();
    pending[pending_count].to = to, pending[pending_count].from = from;
    pending[pending_count].group = open_group;
    if (copy_eager)
        copy_now(pending_count);
    else
        pending_count++;
}
/* Every pending copy of a group older than `newest` groups back lands. */
static void copy_land(int newest) {
    int kept = 0;
    for (int i = 0; i < pending_count; i++) {
        if (pending[i].group < open_group - newest)
            copy_now(i);
        else
            pending[kept++] = pending[i];
    }
    pending_count = kept;
}
static inline void lq_m1_copy16_window(uint32_t address, const uint32_t *global) {
    copy_issue((char *)shared_start + (address - window_base), (const char *)global);
}
static inline void lq_m1_copy_commit(void) {
    open_group++;
}
static inline void lq_m1_copy_wait_groups(int n) {
    copy_land(n);
}
static inline void lq_m1_sts_u32x4(uint32_t *shared, uint32_t v) {
    if ((uintptr_t)((char *)shared - shared_start) % 16 != 0) abort();
    for (int i = 0; i < 4; i++) shared[i] = v;
}
/* Clusters: the emulation's (cta_emulation.h), a cluster's CTAs run together. */
static inline int lq_m1_cluster_rank(void) {
    return cta_rank;
}
static inline void lq_m1_cluster_sync(void) {
    cta_cluster_sync();
}
static inline char *cluster_shared(uint32_t address, int rank, uint32_t align) {
    if ((address - window_base) % align != 0 || rank < 0 || rank >= CTA_MAX_CLUSTER ||
        !cta_shared[rank])
        abort();
    return (char *)cta_shared[rank] + (address - window_base);
}
static inline void lq_m1_st_cluster_u32x2(uint32_t address, int rank, uint32_t lo, uint32_t hi) {
    const uint32_t v[2] = {lo, hi};
    memcpy(cluster_shared(address, rank, 8), v, 8);
}
static inline double lq_m1_ld_cluster_f64(uint32_t address, int rank) {
    double v;
    memcpy(&v, cluster_shared(address, rank, 8), 8);
    return v;
}
static inline void lq_m1_lds_words(uint32_t address, int bits, uint32_t w[4]) {
    const uint32_t align = bits == 2 ? 8u : bits == 4 ? 16u : 4u;
    if ((address - window_base) % align != 0) abort();
    w[0] = w[1] = w[2] = w[3] = 0u;
    memcpy(w, shared_start + (address - window_base), 4u * (uint32_t)bits);
}
static int misaligned; /* lq_m1_misaligned calls of the launch */
static void lq_m1_misaligned(void) {
    __atomic_add_fetch(&misaligned, 1, __ATOMIC_RELAXED);
}
static inline uint32_t lq_m1_funnel(uint32_t lo, uint32_t hi, uint32_t shift) {
    return (uint32_t)((((uint64_t)hi << 32) | lo) >> (shift & 31u));
}
static inline uint32_t lq_m1_half2_bits(float lo, float hi) {
    return float_to_fp16(lo) | float_to_fp16(hi) << 16;
}
static inline float lq_m1_u2f(uint32_t v) {
    return (float)v;
}
static inline float lq_m1_fmul(float x, float y) {
    return x * y;
}
static inline float lq_m1_fadd(float x, float y) {
    return x + y;
}
static inline float lq_m1_fma(float x, float y, float z) {
    return fmaf(x, y, z);
}

/* A[m][k], B[k][n] and D[m][n] of m16n8k16 from the lanes' registers (PTX ISA, "Matrix
 * Fragments for mma.m16n8k16 with floating point type"): groupID = lane / 4, threadID_in_group
 * = lane % 4; A: a0..a7 over four registers, rows groupID (+8), columns 2·tig (+1) (+8); B:
 * b0..b3 over two registers, rows 2·tig (+1) (+8), column groupID; C/D: rows groupID (+8),
 * columns 2·tig (+1). */
static float fragment_a(int m, int k) {
    const int lane = (m % 8) * 4 + (k % 8) / 2, reg = (m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return fp16_to_float(exchange[cta_rank][cta_thread / 32].a[lane][reg] >> (16 * (k % 2)));
}
static float fragment_b(int k, int n) {
    const int lane = n * 4 + (k % 8) / 2, reg = k >= 8 ? 1 : 0;
    return fp16_to_float(exchange[cta_rank][cta_thread / 32].b[lane][reg] >> (16 * (k % 2)));
}

/* d += A·B: products exact, the sum of 16 in double, rounded once (the tensor core's internal
 * order and precision are its own: the test's bound covers fp32 rounding, not a wrong term). */
static void lq_m1_mma(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    const int warp = cta_thread / 32, lane = cta_thread % 32;
    memcpy(exchange[cta_rank][warp].a[lane], a, 16);
    exchange[cta_rank][warp].b[lane][0] = b0, exchange[cta_rank][warp].b[lane][1] = b1;
    cta_warp_wait();
    const int g = lane / 4, tig = lane % 4;
    float out[4];
    for (int i = 0; i < 4; i++) {
        const int m = g + 8 * (i / 2), n = 2 * tig + i % 2;
        double sum = d[i];
        for (int k = 0; k < 16; k++) sum += (double)fragment_a(m, k) * fragment_b(k, n);
        out[i] = (float)sum;
    }
    cta_warp_wait();
    memcpy(d, out, sizeof out);
}

static float lq_m1_shfl_xor(float v, int offset) {
    return cta_shfl_xor(v, offset);
}

static double lq_m1_shfl_xor_f64(double v, int offset) {
    return cta_shfl_xor_f64(v, offset);
}

/* the CPU backend's swiglu of one value (kernels/cpu/backend_cpu.c) */
static float lq_m1_silu_times(float gate, float up) {
    return gate / (1.0f + expf(-gate)) * up;
}

static void lq_m1_sync(void) {
    cta_sync();
}

/* __syncwarp: with staged codes, the barrier between lanes' copies and reads of a slot */
static void lq_m1_tile_fence(void) {
    cta_warp_wait();
}

static int waits; /* griddepcontrol.wait calls of the launch */
static void lq_m1_wait_prerequisite(void) {
    __atomic_add_fetch(&waits, 1, __ATOMIC_RELAXED);
}

/* The projection in the kernel: the layer's counter, polled; a poll yields the CPU (the CTAs'
 * threads outnumber its cores). */
static inline uint32_t lq_m1_ld_acquire_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint32_t lq_m1_add_release_u32(uint32_t *p, uint32_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELEASE);
}
static inline uint32_t lq_m1_add_acq_rel_u32(uint32_t *p, uint32_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
}
static inline void lq_m1_st_relaxed_u32(uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
static void lq_m1_backoff(void) {
    sched_yield();
}

/* A prefetch must name a word of the codes (a wild address would fault on the GPU). */
static const void *codes_begin, *codes_end;
static int prefetches;
static void lq_m1_prefetch_l2(const void *p) {
    if ((const char *)p < (const char *)codes_begin || (const char *)p >= (const char *)codes_end)
        abort();
    __atomic_add_fetch(&prefetches, 1, __ATOMIC_RELAXED);
}

#include "kernels/cuda/gemv_mma1_kernel.h"

/* ---------- launching it ---------- */

struct launch {
    const struct lq_m1_args *args;
    int bits, bpc;
};

static int copies_left;             /* threads that ended with copies never waited for */
static int prefetches_in_registers; /* the last case's prefetches with the codes in registers */

static void run_thread(const void *arg, int block, int thread, void *shared) {
    const struct launch *l = arg;
    shared_start = (const char *)shared;
    pending_count = 0, open_group = 0;
    lq_m1_body(l->args, l->bits, l->bpc, l->args->share_scales, l->args->stage,
               l->args->t_pieces > 0, block, thread, shared);
    if (pending_count) __atomic_add_fetch(&copies_left, 1, __ATOMIC_RELAXED);
}

/* With the projection in the kernel: its CTAs one after another, as a GPU runs a grid that does
 * not fit (every CTA but the last finds its poll run out and takes the sums itself). */
static int serial_projection;

/* Every CTA of the grid, one after another (a cluster's together); with the projection in the
 * kernel, all of them together, the first starting late (or one after another:
 * serial_projection). */
static void launch_kernel(const struct lq_m1_args *args, int bits, int bpc) {
    const struct launch l = {args, bits, bpc};
    waits = 0, prefetches = 0, misaligned = 0, copies_left = 0;
    const size_t shared =
        (args->stage ? lq_m1_staged_shared_bytes(bits, args->chunks_per_row, window_base)
                     : lq_m1_shared_bytes(bits, args->chunks_per_row, window_base)) +
        lq_m1_t_area_bytes(args->t_pieces);
    const int ctas = lq_m1_grid(args->rows, args->rg_log, args->cluster_log);
    if (args->t_pieces > 0 && !serial_projection) {
        cta_late_us = 20000;
        cta_run_together(run_thread, &l, ctas, LQ_M1_THREADS, shared);
        cta_late_us = 0;
        return;
    }
    cta_run_clusters(run_thread, &l, ctas, LQ_M1_THREADS, shared, 1 << args->cluster_log);
}

/* ---------- the cases ---------- */

static struct lq_rng rng;

static float *random_floats(size_t count, double scale) {
    float *out = aligned_alloc(16, (count * sizeof(float) + 15) / 16 * 16);
    if (!out) abort();
    for (size_t i = 0; i < count; i++) out[i] = (float)(scale * lq_rng_normal(&rng));
    return out;
}

/* A copy of `bytes` bytes with `padding` bytes of zeros after them (the GPU upload's: the
 * kernel's reads past the end, lq_m1_padding), as 32-bit words. Nothing more: a read past the
 * padding is a heap overflow that the sanitizer build of CI reports. */
static void *padded_copy(const void *src, size_t bytes, uint64_t padding) {
    uint32_t *out = calloc((bytes + (size_t)padding + 3) / 4, 4);
    if (!out) abort();
    memcpy(out, src, bytes);
    return out;
}

static int blocks_per_chunk(const struct lq_nf_config *c) {
    return c->B0 % 32 == 0 ? 1 : c->B0 == 16 && c->B1 % 2 == 0 ? 2 : 0;
}

static void check_case_shared(int rows, int cols, struct lq_nf_config c, int rank, int rg_log,
                              int share_scales, int input, int output);

/* Each case as the host launches it, and where it shares scales between lanes also without. */
static void check_case(int rows, int cols, struct lq_nf_config c, int rank, int rg_log) {
    const int share = c.B0 % 64 == 0 && cols % c.B0 == 0; /* linear_cuda.cu's rule */
    check_case_shared(rows, cols, c, rank, rg_log, share, LQ_M1_INPUT_PLAIN, LQ_M1_OUTPUT_WRITE);
    if (share)
        check_case_shared(rows, cols, c, rank, rg_log, 0, LQ_M1_INPUT_PLAIN, LQ_M1_OUTPUT_WRITE);
}

/* The CPU backend, for the unfused ops that a fused input stands for. */
static struct lq_backend *cpu;

static const char *input_names[] = {"x", "rmsnorm(x)"};
static const char *output_names[] = {"", ", y +=", ", y = silu(y)·"};

/* silu(g) as the CPU backend's swiglu has it, in double */
static double silu(double g) {
    return g / (1.0 + exp(-g));
}

static void check_case_shared(int rows, int cols, struct lq_nf_config c, int rank, int rg_log,
                              int share_scales, int input, int output) {
    char label[240], text[64];
    snprintf(label, sizeof label,
             "%s %d x %d rank %d, %d row groups per CTA, prefetch %d, %s scales, input %s%s",
             lq_nf_config_format(&c, text, sizeof text), rows, cols, rank, 1 << rg_log,
             (rows + rank) % 3, share_scales ? "shared" : "own", input_names[input],
             output_names[output]);
    const int bpc = blocks_per_chunk(&c);
    CHECK_MSG(bpc > 0 && cols % 32 == 0, "%s: not a shape of the kernel", label);
    float *dense = random_floats((size_t)rows * cols, 0.05);
    struct lq_nf_matrix q;
    struct lq_error err = {0};
    if (lq_nf_quantize(dense, (size_t)rows, (size_t)cols, &c, &q, &err) != 0) {
        CHECK_MSG(0, "%s: %s", label, err.message);
        free(dense);
        return;
    }
    /* What the kernel reads (raw: x, or the norm's input) and the token it multiplies (x: raw,
     * or what the CPU backend's rmsnorm makes of it). */
    float *raw = random_floats((size_t)cols, input == LQ_M1_INPUT_RMSNORM ? 7.0 : 1.0);
    float *second = random_floats((size_t)cols, 1.0); /* the norm's weight */
    float *x = aligned_alloc(16, (size_t)cols * sizeof(float) + 16);
    if (!x) abort();
    memcpy(x, raw, (size_t)cols * sizeof(float));
    const float eps = 1e-5f;
    if (input == LQ_M1_INPUT_RMSNORM)
        CHECK(cpu->ops->rmsnorm(cpu, raw, second, 1, cols, eps, x) == 0);
    float *l1 = rank > 0 ? random_floats((size_t)rows * rank, 0.05) : NULL;
    float *l2 = rank > 0 ? random_floats((size_t)rank * cols, 0.05) : NULL;
    const int slices = (cols + 1023) / 1024;
    float *t = calloc((size_t)slices * (rank > 0 ? rank : 1), sizeof(float));
    if (!t) abort();
    /* the projection kernel's slice sums (any order will do), of what it reads: for a normed
     * input w·raw, which the kernel scales by the norm's s */
    for (int s = 0; s < slices; s++)
        for (int k = 0; k < rank; k++) {
            float sum = 0.0f;
            for (int j = s * 1024; j < cols && j < (s + 1) * 1024; j++)
                sum = fmaf(l2[(size_t)k * cols + j],
                           input == LQ_M1_INPUT_RMSNORM ? second[j] * raw[j] : x[j], sum);
            t[(size_t)s * rank + k] = sum;
        }
    /* the exact low-rank term's t (for a normed input, of the normed x) */
    double *t_exact = calloc(rank > 0 ? (size_t)rank : 1, sizeof(double));
    if (!t_exact) abort();
    for (int k = 0; k < rank; k++)
        for (int j = 0; j < cols; j++) t_exact[k] += (double)l2[(size_t)k * cols + j] * x[j];

    uint64_t padding[3];
    lq_m1_padding(cols / 32, c.b0, c.b1, c.B0, c.B1, padding);
    uint32_t *codes = padded_copy(q.codes, lq_nf_codes_bytes(&q), padding[0]);
    uint32_t *scale_codes = padded_copy(q.scale_codes, lq_nf_scale_codes_bytes(&q), padding[1]);
    /* the group scales widened to fp32, as linear_cuda.cu uploads them for this kernel */
    const size_t groups = lq_nf_group_scales_bytes(&q) / (c.b2 == LQ_SCALE_FP32 ? 4 : 2);
    float *group_scales = calloc(groups * sizeof(float) + (size_t)padding[2], 1);
    if (!group_scales) abort();
    for (size_t g = 0; g < groups; g++) group_scales[g] = lq_nf_group_scale(&q, g);
    /* y: poison, or what the output reads: the residual, or gate's values for SwiGLU */
    float *y = malloc((size_t)rows * sizeof(float)), *prior = random_floats((size_t)rows, 2.0);
    if (!y) abort();
    for (int r = 0; r < rows; r++) y[r] = output == LQ_M1_OUTPUT_WRITE ? NAN : prior[r];

    struct lq_m1_args a;
    memset(&a, 0, sizeof a);
    a.codes = codes, a.scale_codes = scale_codes, a.group_scales = group_scales;
    memcpy(a.nf_table, lq_nf_code_table(c.b0), sizeof(float) << c.b0);
    a.x = input == LQ_M1_INPUT_PLAIN ? x : raw, a.lora_B = l1, a.t = t, a.y = y;
    a.input = input, a.eps = eps, a.output = output;
    a.norm_weight = input == LQ_M1_INPUT_RMSNORM ? second : NULL;
    a.rows = rows, a.cols = cols, a.b1 = c.b1, a.rank = rank;
    a.t_slices = slices;
    a.offset = q.scale_offset;
    a.inv_levels = 1.0f / (float)((1u << c.b1) - 1u);
    a.chunk_block = lq_make_divisor(c.B0 % 32 == 0 ? (uint32_t)c.B0 / 32 : 1u);
    a.group = lq_make_divisor((uint32_t)c.B1);
    a.chunks_per_row = cols / 32;
    a.rg_log = rg_log;
    a.prefetch_tiles = (rows + rank) % 3; /* 0 (off), 1 or 2 tiles ahead */
    a.share_scales = share_scales;
    window_base = (rows + cols) % 2 ? 0x400u : 0x90u; /* sm_90's reserved 1 KB, and another */
    a.table_offset = lq_m1_table_offset(c.b0, a.chunks_per_row, window_base);
    codes_begin = codes, codes_end = (const char *)codes + lq_nf_codes_bytes(&q);
    copy_begin = (const char *)codes;
    copy_end = (const char *)codes + lq_nf_codes_bytes(&q) + padding[0];
    float *deq = malloc((size_t)rows * cols * sizeof(float));
    if (!deq) abort();
    lq_nf_dequantize(&q, deq);
    /* The codes in registers; where they can be staged, through the rings with the copies
     * held back to their waits, and in some cases also with the copies made at once; and x
     * staged by clusters of 2 CTAs (codes in registers) and, in the other cases, of 4 (staged
     * where they can be). */
    const int can_stage = lq_m1_can_stage(c.b0, cols / 32);
    /* The projection in the kernel, where a CTA takes at most LQ_M1_MAX_T_PIECES pieces: t
     * poisoned, written by the kernel. */
    const int grid = lq_m1_grid(rows, rg_log, 0);
    const int pieces = (rank * slices + grid - 1) / grid;
    const int can_project = rank > 0 && pieces <= LQ_M1_MAX_T_PIECES;
    const int together = grid <= CTA_MAX_CLUSTER; /* every CTA can run at once here */
    float *t_inline = malloc((size_t)slices * (rank > 0 ? rank : 1) * sizeof(float));
    float *y_first = malloc((size_t)rows * sizeof(float)); /* the first projecting run's y */
    uint32_t barrier[2] = {0u, 0u};
    if (!t_inline || !y_first) abort();
    copy_l2_begin = (const char *)l2;
    copy_l2_end = (const char *)l2 + (rank > 0 ? (size_t)rank * cols * sizeof(float) : 0);
    /* The projection's runs: polling (LQ_M1_POLL, with room to wait out the late CTA; where
     * every CTA can run at once), every warp taking its sums itself at once (LQ_M1_AT_ONCE), and
     * the CTAs one after another with a short poll (LQ_M1_SERIAL: every CTA but the last runs
     * out): each one's y equals the first's bit for bit. A grid too large to run at once here
     * runs its CTAs one after another in all of them, at once in LQ_M1_AT_ONCE's sense (no
     * polls) and then serially, so that the last CTA reads the pieces the others published. */
    enum { LQ_M1_POLL = 1, LQ_M1_AT_ONCE, LQ_M1_SERIAL };
    struct {
        int stage, eager, cluster_log, project;
    } runs[10] = {{0, 0, 0, 0}};
    int run_count = 1;
    if (can_stage) runs[run_count].stage = 1, run_count++;
    if (can_stage && (rows + rank) % 2)
        runs[run_count].stage = runs[run_count].eager = 1, run_count++;
    runs[run_count].cluster_log = 1, run_count++;
    if ((rows + rank) % 2 == 0)
        runs[run_count].stage = can_stage, runs[run_count].cluster_log = 2, run_count++;
    if (can_project && together) runs[run_count].project = LQ_M1_POLL, run_count++;
    if (can_project && together && can_stage)
        runs[run_count].project = LQ_M1_POLL, runs[run_count].stage = 1,
        runs[run_count].eager = (rows / 8 + rank) % 2, run_count++;
    if (can_project && !together)
        runs[run_count].project = LQ_M1_AT_ONCE, runs[run_count].stage = can_stage, run_count++;
    /* (staged where the polling run before them was; at once in half the cases, for time) */
    else if (can_project && (rows / 8 + rank) % 2 == 0)
        runs[run_count] = runs[run_count - 1], runs[run_count].project = LQ_M1_AT_ONCE, run_count++;
    if (can_project)
        runs[run_count] = runs[run_count - 1], runs[run_count].project = LQ_M1_SERIAL, run_count++;
    const size_t base_length = strlen(label);
    for (int run = 0; run < run_count; run++) {
        a.stage = runs[run].stage, copy_eager = runs[run].eager;
        a.cluster_log = runs[run].cluster_log;
        /* (x the kernel before's in half the cases: the staging waits for it) */
        a.t_pieces = runs[run].project ? pieces : 0;
        a.wait_before_x = runs[run].project && (rows + cols / 32 + run) % 2;
        a.lora_A = runs[run].project ? l2 : NULL;
        a.t = runs[run].project ? t_inline : t;
        a.t_out = runs[run].project ? t_inline : NULL;
        a.barrier = runs[run].project ? barrier : NULL;
        a.spin_limit = runs[run].project == LQ_M1_POLL     ? 1u << 30
                       : runs[run].project == LQ_M1_SERIAL ? 16u
                                                           : 0u;
        serial_projection = runs[run].project == LQ_M1_SERIAL || !together;
        for (int i = 0; i < slices * rank; i++) t_inline[i] = NAN;
        snprintf(label + base_length, sizeof label - base_length, "%s%s%s%s%s",
                 a.stage ? ", staged" : "", copy_eager ? " (eager copies)" : "",
                 a.cluster_log == 1   ? ", clusters of 2"
                 : a.cluster_log == 2 ? ", clusters of 4"
                                      : "",
                 a.t_pieces
                     ? (a.wait_before_x ? ", projected here after the wait" : ", projected here")
                     : "",
                 runs[run].project == LQ_M1_AT_ONCE  ? " (t taken by every warp)"
                 : runs[run].project == LQ_M1_SERIAL ? " (CTAs one after another)"
                                                     : "");
        for (int r = 0; r < rows; r++) y[r] = output == LQ_M1_OUTPUT_WRITE ? NAN : prior[r];
        launch_kernel(&a, c.b0, bpc);
        if (a.t_pieces) {
            CHECK_MSG(barrier[0] == 0 && barrier[1] == 0, "%s: the counter ended at %u, %u", label,
                      barrier[0], barrier[1]);
            /* every slice sum, against float64 (what the projection kernel would have written,
             * to within fp32 rounding of its terms) */
            int wrong = 0;
            for (int sl = 0; sl < slices; sl++)
                for (int k = 0; k < rank; k++) {
                    double sum = 0.0, magnitude = 0.0;
                    for (int j = sl * 1024; j < cols && j < (sl + 1) * 1024; j++) {
                        const double u = input == LQ_M1_INPUT_RMSNORM ? (double)(second[j] * raw[j])
                                                                      : (double)x[j];
                        sum += (double)l2[(size_t)k * cols + j] * u;
                        magnitude += fabs((double)l2[(size_t)k * cols + j] * u);
                    }
                    const float got = t_inline[(size_t)sl * rank + k];
                    if (!(fabs(got - sum) <= 2e-6 * magnitude + 1e-30) && wrong++ < 3)
                        fprintf(stderr, "%s: t slice %d row %d: %.9g, expected %.9g\n", label, sl,
                                k, got, sum);
                }
            CHECK_MSG(wrong == 0, "%s: %d of t's slice sums wrong", label, wrong);
            const int first = !runs[run - 1].project;
            if (first) memcpy(y_first, y, (size_t)rows * sizeof(float));
            int differ = 0;
            for (int r = 0; r < rows && !first; r++)
                if (memcmp(&y[r], &y_first[r], sizeof(float)) != 0 && differ++ < 3)
                    fprintf(stderr, "%s: row %d: %.9g, first projecting run %.9g\n", label, r, y[r],
                            y_first[r]);
            CHECK_MSG(differ == 0, "%s: %d rows not the first projecting run's bits", label,
                      differ);
        }
        CHECK_MSG(misaligned == 0, "%s: the pair table was found misaligned", label);
        CHECK_MSG(copies_left == 0, "%s: %d threads ended with copies never waited for", label,
                  copies_left);
        if (run == 0)
            prefetches_in_registers = prefetches;
        else if (!a.stage) /* (the clusters' extra CTAs have no rows) */
            CHECK_MSG(prefetches == prefetches_in_registers, "%s: %d L2 prefetches, %d unclustered",
                      label, prefetches, prefetches_in_registers);
        else /* the rings are the prefetch */
            CHECK_MSG(prefetches == 0, "%s: %d L2 prefetches", label, prefetches);
        const int ctas = lq_m1_grid(rows, rg_log, a.cluster_log);
        const int expected_waits =
            ((rank == 0 && output != LQ_M1_OUTPUT_SWIGLU) ? 0 : ctas * LQ_M1_THREADS) +
            (a.wait_before_x ? ctas * LQ_M1_THREADS : 0);
        CHECK_MSG((rank == 0 && output != LQ_M1_OUTPUT_SWIGLU && !a.wait_before_x) ||
                      waits == expected_waits,
                  "%s: %d waits for the kernel before, expected %d", label, waits, expected_waits);

        /* The references: fp16-rounded table values and x with the exact block scales, and the
         * dequantized matrix with x as it is. */
        const float *table = lq_nf_code_table(c.b0);
        double worst = 0.0, worst_exact = 0.0;
        int bad = 0;
        for (int r = 0; r < rows; r++) {
            double sum = 0.0, magnitude = 0.0, exact = 0.0;
            if (output == LQ_M1_OUTPUT_ADD) sum = exact = prior[r], magnitude = fabs(prior[r]);
            for (int j = 0; j < cols; j++) {
                const size_t flat = (size_t)r * cols + j;
                const uint32_t code = lq_bitpack_get(q.codes, flat, c.b0);
                const double term = (double)fp16_to_float(float_to_fp16(table[code])) *
                                    fp16_to_float(float_to_fp16(x[j])) *
                                    lq_nf_block_scale(&q, flat / (size_t)c.B0);
                sum += term, magnitude += fabs(term);
                exact += (double)deq[flat] * x[j];
            }
            for (int k = 0; k < rank; k++) {
                const double term = (double)l1[(size_t)r * rank + k] * t_exact[k];
                sum += term, exact += term, magnitude += fabs(term);
            }
            if (output == LQ_M1_OUTPUT_SWIGLU) { /* silu(gate)·this layer's result */
                const double gate = silu(prior[r]);
                sum *= gate, exact *= gate, magnitude *= fabs(gate);
            }
            const double error = fabs(y[r] - sum) / (magnitude + 1e-30);
            const double error_exact = fabs(y[r] - exact) / (magnitude + 1e-30);
            if (!(error <= 4e-6) || !(error_exact <= 1e-3)) {
                if (bad++ < 5)
                    fprintf(stderr, "%s: row %d: y %.9g, fp16 reference %.9g, exact %.9g\n", label,
                            r, y[r], sum, exact);
            }
            if (!(error <= worst)) worst = error;
            if (!(error_exact <= worst_exact)) worst_exact = error_exact;
        }
        printf("%s: worst %.2g (fp16 reference), %.2g (exact)\n", label, worst, worst_exact);
        CHECK_MSG(bad == 0,
                  "%s: %d rows off; worst error %.3g of the terms' magnitude against the fp16 "
                  "reference, %.3g against the exact product",
                  label, bad, worst, worst_exact);
    }
    free(t_inline), free(y_first);
    free(deq), free(y), free(codes), free(scale_codes), free(group_scales);
    free(t), free(t_exact), free(l1), free(l2), free(x), free(raw), free(second), free(prior);
    free(dense);
    lq_nf_matrix_free(&q);
}

static void test_configs(void) {
    struct lq_error err = {0};
    CHECK_MSG(lq_backend_cpu_create(&cpu, &err) == 0, "%s", err.message);
    lq_rng_seed(&rng, 61);
    const struct lq_nf_config configs[] = {
        {3, 8, LQ_SCALE_FP32, 64, 256}, /* the 7B benchmark's */
        {2, 8, LQ_SCALE_FP16, 32, 16},  {4, 4, LQ_SCALE_BF16, 128, 3},
        {3, 3, LQ_SCALE_FP16, 16, 8}, /* two blocks per chunk */
        {2, 2, LQ_SCALE_BF16, 16, 2},   {4, 8, LQ_SCALE_FP32, 16, 4},
    };
    for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++) {
        check_case(40, 640, configs[i], 8, 0);  /* a partial row group, 5 k-tiles over 8 warps */
        check_case(16, 1056, configs[i], 0, 1); /* a k-tile of one chunk at the end */
    }
}

static void test_cta_shapes(void) {
    lq_rng_seed(&rng, 62);
    const struct lq_nf_config c = {3, 8, LQ_SCALE_FP32, 64, 256};
    for (int rg_log = 0; rg_log <= 3; rg_log++) check_case(72, 2112, c, 80, rg_log);
    /* staged (66 chunks a row of 3 words are not 16-byte aligned rows; 64 are): 2 to 16 tiles
     * a warp, the rings wrapping around */
    for (int rg_log = 0; rg_log <= 3; rg_log++) check_case(72, 2048, c, 80, rg_log);
}

static void test_long_rows(void) {
    lq_rng_seed(&rng, 63);
    /* many k-tiles per warp slice (the double buffering), a rank whose share wraps twice */
    check_case(16, 4096, (struct lq_nf_config){3, 8, LQ_SCALE_FP32, 64, 256}, 64, 0);
    /* prefetch 2: each of a warp's four tiles asks for one two ahead (the last two for the
     * next slice's), and before the staging for tiles 1 and 2; one prefetch a lane (a quad
     * covers both rows) */
    CHECK_MSG(prefetches_in_registers == 8 * 32 * 6, "%d prefetches, expected 1536",
              prefetches_in_registers);
    check_case(32, 3072, (struct lq_nf_config){2, 8, LQ_SCALE_FP32, 64, 256}, 80, 3);
}

static void test_small(void) {
    lq_rng_seed(&rng, 64);
    /* stories260K's shapes: one k-tile of two chunks, one of one chunk, most warps idle */
    check_case(20, 64, (struct lq_nf_config){3, 8, LQ_SCALE_FP32, 64, 256}, 4, 0);
    check_case(8, 32, (struct lq_nf_config){4, 8, LQ_SCALE_FP16, 32, 2}, 2, 2);
    check_case(172, 64, (struct lq_nf_config){2, 4, LQ_SCALE_BF16, 16, 4}, 0, 3);
}

/* The pair table's place: after x, the zeros and the sums, at the first window address aligned
 * for an OR of the pair's bits, with no more padding than that takes. */
static void test_layout(void) {
    for (int bits = 2; bits <= 4; bits++)
        for (int chunks = 1; chunks <= 700; chunks += 7)
            for (uint32_t base = 0; base <= 0x1000; base += 0x70) {
                const uint32_t offset = lq_m1_table_offset(bits, chunks, base);
                const uint32_t front = 4u * (lq_m1_x_words(chunks) + 20u + 128u);
                const uint32_t align = lq_m1_table_align(bits);
                CHECK_MSG(offset >= front && offset - front < align && (base + offset) % align == 0,
                          "b0 %d, %d chunks, window base 0x%x: table at %u (front %u)", bits,
                          chunks, base, offset, front);
                CHECK(lq_m1_shared_bytes(bits, chunks, base) ==
                      offset + 4u * 32u * (1u << 2 * bits));
            }
}

/* A table offset that does not match the window base (the host assumed the wrong reserved
 * size) stops every thread before it reads or writes anything. */
static void test_misaligned(void) {
    struct lq_m1_args a;
    memset(&a, 0, sizeof a);
    float y[16];
    for (int r = 0; r < 16; r++) y[r] = NAN;
    a.y = y, a.rows = 16, a.cols = 256, a.chunks_per_row = 8, a.b1 = 8;
    window_base = 0x400;
    a.table_offset = lq_m1_table_offset(3, a.chunks_per_row, 0x410);
    launch_kernel(&a, 3, 1);
    CHECK_MSG(misaligned == LQ_M1_THREADS, "%d of %d threads stopped", misaligned, LQ_M1_THREADS);
    for (int r = 0; r < 16; r++) CHECK_MSG(isnan(y[r]), "y[%d] written", r);
}

/* Fused ops (kernels/backend.h linear_fused): the rmsnorm that the kernel takes into its
 * staging, the residual add and SwiGLU with the gate values in y, against the CPU backend's
 * rmsnorm before an unfused product. A wrong s (or none) on x or on t is off by a factor of ~7
 * here (x at scale 7); a missing add or gate is off by a whole term. */
static void test_fused_ops(void) {
    lq_rng_seed(&rng, 65);
    const struct lq_nf_config c = {3, 8, LQ_SCALE_FP32, 64, 256};
    for (int input = LQ_M1_INPUT_PLAIN; input <= LQ_M1_INPUT_RMSNORM; input++)
        for (int output = LQ_M1_OUTPUT_WRITE; output <= LQ_M1_OUTPUT_SWIGLU; output++) {
            check_case_shared(40, 640, c, 8, 0, 1, input, output);
            check_case_shared(24, 2112, (struct lq_nf_config){2, 8, LQ_SCALE_FP16, 16, 4}, 80, 1, 0,
                              input, output);
        }
    /* one k-tile, most warps idle; and SwiGLU without a low-rank term (it still waits) */
    check_case_shared(20, 64, c, 4, 0, 0, LQ_M1_INPUT_RMSNORM, LQ_M1_OUTPUT_ADD);
    check_case_shared(40, 640, c, 0, 0, 1, LQ_M1_INPUT_RMSNORM, LQ_M1_OUTPUT_SWIGLU);
    /* wider than the quads a thread holds through the staging (LQ_M1_HELD_QUADS · 4 · 256 =
     * 4096 columns): the rest is read again, for the norm and for the staging */
    check_case_shared(16, 4352, c, 8, 0, 1, LQ_M1_INPUT_RMSNORM, LQ_M1_OUTPUT_ADD);
    if (cpu) {
        cpu->ops->destroy(cpu);
        cpu = NULL;
    }
}

/* The projection in the kernel (t_pieces > 0) on grids of 6 and 8 CTAs, all of them running at
 * once and the first starting late (cta_run_together), then one after another (the warps' sums
 * taken by themselves): 3 pieces a CTA over 3 slices; fewer
 * pieces than CTAs (the last 4 have none); 2 row groups a CTA; and rows wider than the quads a
 * thread holds through the staging (5 slices, the last partial) with a normed input and a
 * residual add. Most cases above run it too (40 x 640 at rank 8: 3 CTAs of 3 pieces). */
static void test_projection_here(void) {
    struct lq_error err = {0};
    CHECK_MSG(lq_backend_cpu_create(&cpu, &err) == 0, "%s", err.message);
    lq_rng_seed(&rng, 66);
    const struct lq_nf_config c = {3, 8, LQ_SCALE_FP32, 64, 256};
    check_case(128, 2112, c, 8, 0);
    check_case(128, 64, (struct lq_nf_config){4, 8, LQ_SCALE_FP16, 32, 2}, 4, 0);
    check_case(256, 1056, (struct lq_nf_config){2, 8, LQ_SCALE_BF16, 16, 4}, 8, 1);
    check_case_shared(96, 4352, c, 4, 0, 1, LQ_M1_INPUT_RMSNORM, LQ_M1_OUTPUT_ADD);
    /* grids too large to run at once here, as a 7B layer's are (128 to 688 CTAs): their CTAs
     * one after another (20 CTAs of which the last 4 have no piece; 9 CTAs of 2 row groups
     * and 4 pieces each but the last, a normed input into SwiGLU) */
    check_case(320, 1056, c, 8, 0);
    check_case_shared(288, 2048, c, 16, 1, 1, LQ_M1_INPUT_RMSNORM, LQ_M1_OUTPUT_SWIGLU);
    cpu->ops->destroy(cpu);
    cpu = NULL;
}

LQ_TEST_MAIN(LQ_TEST(test_configs), LQ_TEST(test_cta_shapes), LQ_TEST(test_long_rows),
             LQ_TEST(test_small), LQ_TEST(test_layout), LQ_TEST(test_misaligned),
             LQ_TEST(test_fused_ops), LQ_TEST(test_projection_here))
