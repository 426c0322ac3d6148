// The element-wise and row-wise ops of the CUDA backend: embed, rmsnorm, rope, swiglu, add.
//
// Design. Each op is one launch on cuda->stream and matches kernels/cpu/backend_cpu.c to
// within a float rounding or two, since the daemon's tests compare the two backends:
//   - embed: one block per output row copies table[ids[i]] (ids staged to LQ_CUDA_STAGE_0).
//   - rmsnorm: one block per row; the sum of squares is taken in double as on the CPU (each
//     square of a float is exact in double, so only the summation order differs), and the
//     scale is formed in double and rounded once, like the CPU's.
//   - rope: one block per token and group of heads (positions staged to LQ_CUDA_STAGE_0, or
//     already on the device). The block first gets the token's head_dim/2 cos/sin pairs into
//     shared memory, with the angle, pow and sincos in double exactly as the CPU writes them
//     (float angles lose the phase at long positions) — from a table computed once per
//     (theta, head_dim) for positions below LQ_CUDA_ROPE_POSITIONS — then rotates its heads. The
//     rotation is rounded step by step (no fused multiply-add) to give the CPU's bits.
//   - swiglu, add: grid-stride loops over float4 when both arrays are 16-byte aligned, with a
//     scalar tail; plain float loops otherwise.
// Row kernels also use float4 when the row length is a multiple of 4 and the arrays are
// aligned. Every output element is written by exactly one thread. Each kernel begins with
// lq_pdl_enter and launches with programmatic dependent launch where cuda->pdl (pdl_cuda.cuh).
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/pdl_cuda.cuh"
#include "kernels/cuda/rope_angle_cuda.cuh"
#include "kernels/cuda/silu_cuda.cuh"

namespace {

constexpr int MAX_THREADS = 256; // a row kernel's block; element-wise kernels use it too

bool aligned16(const void *pointer) {
    return ((uintptr_t)pointer & 15) == 0;
}

// Threads for a block walking `units` items of one row: whole warps, 32..MAX_THREADS, so
// short rows do not launch idle warps.
int row_threads(int units) {
    int threads = (units + 31) / 32 * 32;
    return threads < 32 ? 32 : threads > MAX_THREADS ? MAX_THREADS : threads;
}

// The same for the norms' rows, up to 1024 threads: a decode step has one row per sequence,
// and a 4096-wide row then takes one float4 per thread instead of four dependent rounds.
constexpr int NORM_THREADS = 1024;
int norm_threads(int units) {
    int threads = (units + 31) / 32 * 32;
    return threads < 32 ? 32 : threads > NORM_THREADS ? NORM_THREADS : threads;
}

// Blocks for a grid-stride loop over `units` items: enough for every item up to a few waves
// per SM; the loop takes what is beyond.
unsigned stride_blocks(const struct lq_cuda *cuda, size_t units) {
    size_t blocks = (units + MAX_THREADS - 1) / MAX_THREADS;
    size_t cap = (size_t)(cuda->sm_count > 0 ? cuda->sm_count : 1) * 16;
    if (blocks > cap) blocks = cap;
    return blocks < 1 ? 1u : (unsigned)blocks;
}

// ---------- embed ----------

__global__ void embed_rows(const float *table, const int *ids, int dim, int vec, float *out) {
    lq_pdl_enter();
    const size_t row = blockIdx.x;
    const float *src = table + (size_t)ids[row] * dim;
    float *dst = out + row * dim;
    if (vec) {
        const float4 *src4 = (const float4 *)src;
        float4 *dst4 = (float4 *)dst;
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) dst4[i] = src4[i];
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
    }
}

// ---------- rmsnorm ----------

// The sum of every thread's `value` in the block, returned to all threads. `shared` holds one
// double per warp.
__device__ double block_sum(double value, double *shared) {
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < warps; i++) total += shared[i];
    return total;
}

__global__ void rmsnorm_rows(const float *x, const float *weight, int dim, float eps, int vec,
                             float *out) {
    lq_pdl_enter();
    __shared__ double warp_sums[NORM_THREADS / 32];
    const float *row = x + (size_t)blockIdx.x * dim;
    float *y = out + (size_t)blockIdx.x * dim;

    double sum = 0.0;
    if (vec) {
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            float4 v = ((const float4 *)row)[i];
            sum += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += (double)row[i] * row[i];
    }
    sum = block_sum(sum, warp_sums);
    // the CPU's formula: double mean plus eps, one rounding to float
    const float scale = (float)(1.0 / sqrt(sum / dim + eps));

    // (x * scale) * weight, in the CPU's order; two products, so nothing is fused
    if (vec) {
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            float4 v = ((const float4 *)row)[i], w = ((const float4 *)weight)[i];
            ((float4 *)y)[i] = make_float4(v.x * scale * w.x, v.y * scale * w.y, v.z * scale * w.z,
                                           v.w * scale * w.w);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) y[i] = row[i] * scale * weight[i];
    }
}

// x += y, then out = rmsnorm(x) for row blockIdx.x: add_elements then rmsnorm_rows in one pass
// (the same float sums, the same order of the squares' double sum, so the same bits).
__global__ void add_rmsnorm_rows(float *x, const float *y, const float *weight, int dim, float eps,
                                 int vec, float *out) {
    lq_pdl_enter();
    __shared__ double warp_sums[NORM_THREADS / 32];
    float *row = x + (size_t)blockIdx.x * dim;
    const float *add = y + (size_t)blockIdx.x * dim;
    float *z = out + (size_t)blockIdx.x * dim;

    double sum = 0.0;
    if (vec) {
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            float4 v = ((float4 *)row)[i];
            const float4 a = ((const float4 *)add)[i];
            v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
            ((float4 *)row)[i] = v;
            sum += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float v = row[i] + add[i];
            row[i] = v;
            sum += (double)v * v;
        }
    }
    sum = block_sum(sum, warp_sums);
    const float scale = (float)(1.0 / sqrt(sum / dim + eps));
    // each thread reads back only what it wrote itself
    if (vec) {
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            float4 v = ((const float4 *)row)[i], w = ((const float4 *)weight)[i];
            ((float4 *)z)[i] = make_float4(v.x * scale * w.x, v.y * scale * w.y, v.z * scale * w.z,
                                           v.w * scale * w.w);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) z[i] = row[i] * scale * weight[i];
    }
}

// ---------- rope ----------

// cos and sin of angle k of a position: rope_angle_cuda.cuh (the CPU's arithmetic).
__device__ void rope_angle(int position, int k, int head_dim, float theta, float *c, float *s) {
    lq_rope_angle(position, k, head_dim, theta, c, s);
}

// The cached table of positions [0, positions): row p holds cos[half] then sin[half].
__global__ void rope_table_fill(float *table, int positions, int head_dim, float theta) {
    const int half = head_dim / 2;
    const size_t count = (size_t)positions * half;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        const int p = (int)(i / half), k = (int)(i % half);
        float *row = table + (size_t)p * 2 * half;
        rope_angle(p, k, head_dim, theta, &row[k], &row[half + k]);
    }
}

// Token blockIdx.x, heads blockIdx.y * heads_per_block onwards (counting the `heads` of x, then
// the `heads2` of x2: the keys beside the queries, one launch for both): cos/sin of the token's
// head_dim/2 angles into shared memory (from the cached table below cached_positions, else
// computed), then each of those heads' pairs (k, k + half) rotated with them. Dynamic shared
// memory: 2 * half floats.
__global__ void rope_rows(float *x, int heads, float *x2, int heads2, const int *positions,
                          int head_dim, float theta, const float *cached, int cached_positions,
                          int heads_per_block) {
    lq_pdl_enter();
    extern __shared__ float table[]; // cos[half], then sin[half]
    const int half = head_dim / 2;
    const int position = positions[blockIdx.x];
    if (position >= 0 && position < cached_positions) {
        const float *row = cached + (size_t)position * 2 * half;
        for (int k = threadIdx.x; k < 2 * half; k += blockDim.x) table[k] = row[k];
    } else {
        for (int k = threadIdx.x; k < half; k += blockDim.x)
            rope_angle(position, k, head_dim, theta, &table[k], &table[half + k]);
    }
    __syncthreads();

    // this block's heads: [first, first + heads_per_block) of the heads + heads2
    const int first = blockIdx.y * heads_per_block;
    const int count = min(heads_per_block, heads + heads2 - first);
    for (int i = threadIdx.x; i < count * half; i += blockDim.x) {
        const int h = first + i / half, k = i % half;
        float *v = h < heads ? x + ((size_t)blockIdx.x * heads + h) * head_dim
                             : x2 + ((size_t)blockIdx.x * heads2 + (h - heads)) * head_dim;
        const float c = table[k], s = table[half + k];
        const float x0 = v[k], x1 = v[k + half];
        // each product rounded on its own like the CPU's; a fused form differs in the last bit
        v[k] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        v[k + half] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    }
}

// ---------- swiglu, add ----------

// gate = silu(gate) * up. vec: both arrays 16-byte aligned, so the first count/4*4 elements
// go as float4 and the rest one by one.
__global__ void swiglu_elements(float *gate, const float *up, size_t count, int vec) {
    lq_pdl_enter();
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t quads = vec ? count / 4 : 0;
    for (size_t i = first; i < quads; i += stride) {
        float4 g = ((float4 *)gate)[i];
        const float4 u = ((const float4 *)up)[i];
        g.x = lq_silu_times(g.x, u.x);
        g.y = lq_silu_times(g.y, u.y);
        g.z = lq_silu_times(g.z, u.z);
        g.w = lq_silu_times(g.w, u.w);
        ((float4 *)gate)[i] = g;
    }
    for (size_t i = quads * 4 + first; i < count; i += stride)
        gate[i] = lq_silu_times(gate[i], up[i]);
}

// x += y, laid out like swiglu_elements.
__global__ void add_elements(float *x, const float *y, size_t count, int vec) {
    lq_pdl_enter();
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t quads = vec ? count / 4 : 0;
    for (size_t i = first; i < quads; i += stride) {
        float4 a = ((float4 *)x)[i];
        const float4 b = ((const float4 *)y)[i];
        a.x += b.x;
        a.y += b.y;
        a.z += b.z;
        a.w += b.w;
        ((float4 *)x)[i] = a;
    }
    for (size_t i = quads * 4 + first; i < count; i += stride) x[i] += y[i];
}

} // namespace

// ---------- the ops ----------

int lq_cuda_embed_device(struct lq_backend *backend, const float *table, int dim, const int *ids,
                         int n, float *out) {
    if (n <= 0 || dim <= 0) return n < 0 || dim < 0 ? LQ_EINVAL : LQ_OK;
    struct lq_cuda *cuda = lq_cuda_of(backend);
    const int vec = dim % 4 == 0 && aligned16(table) && aligned16(out);
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, embed_rows, dim3((unsigned)n),
                              dim3(row_threads(vec ? dim / 4 : dim)), 0, cuda->stream, table, ids,
                              dim, vec, out),
                "embed");
    return LQ_OK;
}

int lq_cuda_embed(struct lq_backend *backend, const float *table, int dim, const int *ids, int n,
                  float *out) {
    if (n <= 0 || dim <= 0) return n < 0 || dim < 0 ? LQ_EINVAL : LQ_OK;
    void *device_ids = NULL;
    int rc = lq_cuda_stage(lq_cuda_of(backend), LQ_CUDA_STAGE_0, ids, (size_t)n * sizeof(int),
                           &device_ids);
    if (rc) return rc;
    return lq_cuda_embed_device(backend, table, dim, (const int *)device_ids, n, out);
}

int lq_cuda_rmsnorm(struct lq_backend *backend, const float *x, const float *weight, int n, int dim,
                    float eps, float *out) {
    if (n <= 0 || dim <= 0) return n < 0 || dim < 0 ? LQ_EINVAL : LQ_OK;
    struct lq_cuda *cuda = lq_cuda_of(backend);
    const int vec = dim % 4 == 0 && aligned16(x) && aligned16(weight) && aligned16(out);
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, rmsnorm_rows, dim3((unsigned)n),
                              dim3(norm_threads(vec ? dim / 4 : dim)), 0, cuda->stream, x, weight,
                              dim, eps, vec, out),
                "rmsnorm");
    return LQ_OK;
}

int lq_cuda_add_rmsnorm(struct lq_backend *backend, float *x, const float *y, const float *weight,
                        int n, int dim, float eps, float *out) {
    if (n <= 0 || dim <= 0) return n < 0 || dim < 0 ? LQ_EINVAL : LQ_OK;
    struct lq_cuda *cuda = lq_cuda_of(backend);
    const int vec =
        dim % 4 == 0 && aligned16(x) && aligned16(y) && aligned16(weight) && aligned16(out);
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, add_rmsnorm_rows, dim3((unsigned)n),
                              dim3(norm_threads(vec ? dim / 4 : dim)), 0, cuda->stream, x, y,
                              weight, dim, eps, vec, out),
                "add_rmsnorm");
    return LQ_OK;
}

// The cached cos/sin table for (theta, head_dim) (struct lq_cuda_rope_table), made on first use:
// NULL when it cannot be had (the kernel then computes every angle).
static const struct lq_cuda_rope_table *rope_table(struct lq_cuda *cuda, float theta,
                                                   int head_dim) {
    struct lq_cuda_rope_table *free_entry = NULL;
    for (int i = 0; i < LQ_CUDA_ROPE_TABLES; i++) {
        struct lq_cuda_rope_table *t = &cuda->rope_tables[i];
        if (t->table && t->theta == theta && t->head_dim == head_dim) return t;
        if (!t->table && !free_entry) free_entry = t;
    }
    // made while a step is recorded it would be filled at every replay: the eager first
    // step of a key makes it (graph_cuda.cu), and a recording without it computes the angles
    if (!free_entry || cuda->recording >= 0) return NULL;
    const int half = head_dim / 2;
    void *table = NULL;
    const size_t floats = (size_t)LQ_CUDA_ROPE_POSITIONS * 2 * half;
    if (lq_cuda_malloc(cuda, floats * sizeof(float), LQ_CUDA_SCRATCH, &table, NULL)) return NULL;
    const size_t count = (size_t)LQ_CUDA_ROPE_POSITIONS * half;
    rope_table_fill<<<stride_blocks(cuda, count), MAX_THREADS, 0, cuda->stream>>>(
        (float *)table, LQ_CUDA_ROPE_POSITIONS, head_dim, theta);
    if (cudaGetLastError() != cudaSuccess) {
        lq_cuda_free(cuda, table);
        return NULL;
    }
    free_entry->table = (float *)table;
    free_entry->theta = theta;
    free_entry->head_dim = head_dim;
    return free_entry;
}

const float *lq_cuda_rope_cos_sin(struct lq_cuda *cuda, float theta, int head_dim, int *positions) {
    const struct lq_cuda_rope_table *t = rope_table(cuda, theta, head_dim);
    *positions = t ? LQ_CUDA_ROPE_POSITIONS : 0;
    return t ? (const float *)t->table : (const float *)NULL;
}

static int rope_launch(struct lq_cuda *cuda, float *x, int heads, float *x2, int heads2, int n,
                       int head_dim, const int *positions, float theta) {
    const int half = head_dim / 2;
    const struct lq_cuda_rope_table *t = rope_table(cuda, theta, head_dim);
    // a block per token and group of heads, about one pair per thread: a decode step's one
    // token then spreads over many SMs instead of one block's dependent rounds
    const int per_block = half >= MAX_THREADS ? 1 : MAX_THREADS / half;
    const int groups = (heads + heads2 + per_block - 1) / per_block;
    if (groups > 65535) return LQ_EUNSUPPORTED; // grid.y
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, rope_rows, dim3((unsigned)n, (unsigned)groups),
                              dim3(row_threads(per_block * half)), 2 * (size_t)half * sizeof(float),
                              cuda->stream, x, heads, x2, heads2, positions, head_dim, theta,
                              t ? (const float *)t->table : (const float *)NULL,
                              t ? LQ_CUDA_ROPE_POSITIONS : 0, per_block),
                "rope");
    return LQ_OK;
}

int lq_cuda_rope_device(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                        const int *positions, float theta) {
    if (n < 0 || heads < 0 || head_dim < 0) return LQ_EINVAL;
    if (n == 0 || heads == 0 || head_dim / 2 == 0) return LQ_OK; // nothing rotates
    return rope_launch(lq_cuda_of(backend), x, heads, NULL, 0, n, head_dim, positions, theta);
}

int lq_cuda_rope_qk_device(struct lq_backend *backend, float *q, int q_heads, float *k, int k_heads,
                           int n, int head_dim, const int *positions, float theta) {
    if (n < 0 || q_heads < 0 || k_heads < 0 || head_dim < 0) return LQ_EINVAL;
    if (n == 0 || q_heads + k_heads == 0 || head_dim / 2 == 0) return LQ_OK; // nothing rotates
    return rope_launch(lq_cuda_of(backend), q, q_heads, k, k_heads, n, head_dim, positions, theta);
}

int lq_cuda_rope(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                 const int *positions, float theta) {
    if (n < 0 || heads < 0 || head_dim < 0) return LQ_EINVAL;
    if (n == 0 || heads == 0 || head_dim / 2 == 0) return LQ_OK; // nothing rotates
    void *device_positions = NULL;
    int rc = lq_cuda_stage(lq_cuda_of(backend), LQ_CUDA_STAGE_0, positions, (size_t)n * sizeof(int),
                           &device_positions);
    if (rc) return rc;
    return lq_cuda_rope_device(backend, x, n, heads, head_dim, (const int *)device_positions,
                               theta);
}

int lq_cuda_swiglu(struct lq_backend *backend, float *gate, const float *up, size_t count) {
    if (count == 0) return LQ_OK;
    struct lq_cuda *cuda = lq_cuda_of(backend);
    const int vec = aligned16(gate) && aligned16(up);
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, swiglu_elements,
                              dim3(stride_blocks(cuda, vec ? count / 4 + 4 : count)),
                              dim3(MAX_THREADS), 0, cuda->stream, gate, up, count, vec),
                "swiglu");
    return LQ_OK;
}

int lq_cuda_add(struct lq_backend *backend, float *x, const float *y, size_t count) {
    if (count == 0) return LQ_OK;
    struct lq_cuda *cuda = lq_cuda_of(backend);
    const int vec = aligned16(x) && aligned16(y);
    LQ_CUDA_TRY(lq_launch_pdl(cuda->pdl, add_elements,
                              dim3(stride_blocks(cuda, vec ? count / 4 + 4 : count)),
                              dim3(MAX_THREADS), 0, cuda->stream, x, y, count, vec),
                "add");
    return LQ_OK;
}
