// NF quantize-dequantize on the device: out = dequantize(quantize(a)), bit for bit what core's
// lq_nf_quantize_dequantize (core/nf.c) writes, for the LQ decomposition's inner step.
//
// The pipeline, three kernels on one stream:
//   1. lq_nf_absmax_kernel: the absmax of each block of B0 values, their minimum (the per-matrix
//      offset, by an atomic minimum on the float's bits: every absmax is >= +0, where unsigned
//      order is float order) and the index of the first non-finite value. (The decomposition
//      fuses this into its half-step pass when B0 divides 256; maxima and minima are exact in
//      any order, so both give the same bits.)
//   2. lq_nf_group_kernel: per group of B1 blocks (one warp each), the range max(absmax - offset)
//      rounded to b2, the b1-bit code of each block scale and the reconstructed scale
//      ŝ = offset + code·range/(2^b1 − 1) that codes and values use.
//   3. lq_nf_values_kernel: the nearest NF code of value/ŝ (ties to the lower code, saturating)
//      and the value table[code]·ŝ; optionally also the squared (Fisher-weighted) distance
//      of the result to W − lowrank, summed per thread block in double, and the next LQ
//      step's residual (W − result, weighted).
//   3'. lq_nf_values_vec4_kernel: the same values, 4 consecutive values a thread with 16-byte
//      loads and stores (where lq_nf_vec4_ok allows), the error summed in another fixed order.
// The input is either a stored matrix or W − lowrank formed on the fly (one float
// subtraction, the value the decomposition would otherwise have stored), which saves a pass
// over memory.
//
// Why equal bit for bit: maxima and minima are exact in any order; every other operation is
// one IEEE float operation done in the CPU's order, and written with the _rn intrinsics so
// that nvcc can neither contract a product and a sum into an FMA nor (under fast-math flags)
// approximate a division. The b2 roundings reuse core/half.h's integer algorithms. The only
// requirement on the build: no -ftz=true (a subnormal fp16 scale would flush; lqd's build
// does not set it).
//
// The arithmetic lives in __host__ __device__ helpers so that it can be checked against
// core on a machine without a GPU.
#ifndef LQ_NF_CUDA_CUH
#define LQ_NF_CUDA_CUH

#include <cuda_runtime.h>
#include <float.h>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "core/nf.h"
}

#define LQ_NF_THREADS 256   // threads per thread block of every NF kernel
#define LQ_NF_MAX_GRID 4096 // thread blocks at most (the partial sums array has this many)
#define LQ_NF_FULL_MASK 0xffffffffu

// ---------- arithmetic shared by host checks and device kernels ----------

// One rounded IEEE operation each, never fused with a neighbour.
__host__ __device__ static inline float lq_nf_sub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

__host__ __device__ static inline float lq_nf_add(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

__host__ __device__ static inline float lq_nf_mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

__host__ __device__ static inline float lq_nf_div(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

__host__ __device__ static inline uint32_t lq_nf_float_bits(float value) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(value);
#else
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
#endif
}

__host__ __device__ static inline float lq_nf_bits_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(bits);
#else
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
#endif
}

// core/half.h's conversions, the same integer steps (round to nearest even).
__host__ __device__ static inline float lq_nf_round_bf16(float value) {
    uint32_t bits = lq_nf_float_bits(value);
    uint16_t half;
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        half = (uint16_t)((bits >> 16) | 0x40);
    else
        half = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    return lq_nf_bits_float((uint32_t)half << 16);
}

__host__ __device__ static inline float lq_nf_fp16_to_float(uint16_t half) {
    uint32_t sign = (uint32_t)(half & 0x8000u) << 16;
    uint32_t exponent = (half >> 10) & 0x1fu;
    uint32_t mantissa = half & 0x3ffu;
    if (exponent == 0x1f) return lq_nf_bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        float magnitude = lq_nf_mul((float)mantissa, 5.9604644775390625e-8f);
        return sign ? -magnitude : magnitude;
    }
    return lq_nf_bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__host__ __device__ static inline uint16_t lq_nf_float_to_fp16(float value) {
    uint32_t bits = lq_nf_float_bits(value);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (magnitude >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
    if (magnitude < 0x38800000u) {
        float shifted = lq_nf_add(lq_nf_bits_float(magnitude), 0.5f);
        return (uint16_t)(sign | (uint16_t)(lq_nf_float_bits(shifted) - lq_nf_float_bits(0.5f)));
    }
    uint32_t odd = (magnitude >> 13) & 1u;
    magnitude += 0xc8000fffu + odd;
    return (uint16_t)(sign | (uint16_t)(magnitude >> 13));
}

// A group's range as stored in b2 and read back (round_to_scale_dtype of core/nf.c).
__host__ __device__ static inline float lq_nf_round_scale(float value, int dtype) {
    if (dtype == LQ_SCALE_BF16) return lq_nf_round_bf16(value);
    if (dtype == LQ_SCALE_FP16) return lq_nf_fp16_to_float(lq_nf_float_to_fp16(value));
    return value;
}

// The b1-bit code of a block's absmax in a group with stored range `stored` > 0:
// nearbyint((absmax − offset)·levels / stored), clamped (core: plan_scales).
__host__ __device__ static inline unsigned lq_nf_scale_code(float absmax, float offset,
                                                            float stored, unsigned levels) {
    float q = rintf(lq_nf_div(lq_nf_mul(lq_nf_sub(absmax, offset), (float)levels), stored));
    return q <= 0.0f ? 0u : q >= (float)levels ? levels : (unsigned)q;
}

// ŝ = offset + code·range/(2^b1 − 1), the scale quantization and dequantization share.
__host__ __device__ static inline float lq_nf_block_scale(float offset, unsigned code,
                                                          float group_scale, int b1) {
    float levels = (float)((1u << b1) - 1u);
    return lq_nf_add(offset, lq_nf_div(lq_nf_mul((float)code, group_scale), levels));
}

// The number of midpoints strictly below v: the nearest code, the lower one on a tie, and
// the end codes past ±1 (core: nearest_code). midpoints holds 2^bits − 1 values.
__host__ __device__ static inline unsigned lq_nf_nearest_code(float v, const float *midpoints,
                                                              int bits) {
    unsigned index = 0;
    for (unsigned step = 1u << (bits - 1); step > 0; step >>= 1)
        index += (v > midpoints[index + step - 1]) ? step : 0u;
    return index;
}

// The dequantized value of x in a block of scale ŝ (core: block_codes, codes_body).
__host__ __device__ static inline float lq_nf_value(float x, float scale, const float *table,
                                                    const float *midpoints, int bits) {
    // A zero scale dequantizes the whole block to 0: core stores the exact zero code.
    unsigned code = scale == 0.0f ? (1u << (bits - 1)) - 1u
                                  : lq_nf_nearest_code(lq_nf_div(x, scale), midpoints, bits);
    return lq_nf_mul(table[code], scale);
}

// ---------- the configuration as the kernels see it ----------

struct lq_nf_device_config {
    int b0, b1, b2, B0, B1;
    int team; // lanes that share one block: B0 rounded up to a power of two, at most 32
    unsigned long long numel, n_blocks, n_groups;
    float table[256];     // the NF-b0 code table (2^b0 values)
    float midpoints[256]; // (table[i] + table[i+1]) / 2, computed on the host as core does
};

// Fills the device view of configuration c for numel values (host side).
static inline void lq_nf_device_config_init(struct lq_nf_device_config *d,
                                            const struct lq_nf_config *c, size_t numel) {
    memset(d, 0, sizeof *d);
    d->b0 = c->b0, d->b1 = c->b1, d->b2 = (int)c->b2, d->B0 = c->B0, d->B1 = c->B1;
    d->team = 1;
    while (d->team < c->B0 && d->team < 32) d->team <<= 1;
    d->numel = numel;
    d->n_blocks = lq_nf_block_count(numel, c);
    d->n_groups = lq_nf_group_count(numel, c);
    const float *table = lq_nf_code_table(c->b0);
    int n = 1 << c->b0;
    for (int i = 0; i < n; i++) d->table[i] = table[i];
    for (int i = 0; i + 1 < n; i++) d->midpoints[i] = (table[i] + table[i + 1]) * 0.5f;
}

// Thread blocks for `items` work items handled `per_block` at a time, capped.
static inline unsigned lq_nf_grid(unsigned long long items, unsigned long long per_block) {
    unsigned long long blocks = (items + per_block - 1) / per_block;
    if (blocks < 1) blocks = 1;
    return (unsigned)(blocks < LQ_NF_MAX_GRID ? blocks : LQ_NF_MAX_GRID);
}

// ---------- reductions ----------

// Sum of one double per thread over the thread block; the result is valid in thread 0.
// The order is fixed by the launch shape, so equal launches give equal sums.
__device__ static inline double lq_nf_block_sum(double value) {
    __shared__ double warp_sums[LQ_NF_THREADS / 32];
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_down_sync(LQ_NF_FULL_MASK, value, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = value;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0)
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) total += warp_sums[i];
    return total;
}

// ---------- kernels ----------

// Teams of `team` lanes (a power of two <= 32) each take one block; a warp holds 32/team
// teams and walks the blocks in warp-uniform strides, so every lane reaches the shuffles.
struct lq_nf_teams {
    unsigned member;                // lane within the team
    unsigned long long first, step; // this thread's first block and the stride
};

__device__ static inline struct lq_nf_teams lq_nf_teams_of(int team) {
    struct lq_nf_teams t;
    const unsigned lane = threadIdx.x & 31u, per_warp = 32u / (unsigned)team;
    const unsigned long long warp =
        (unsigned long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    t.member = lane & (unsigned)(team - 1);
    t.first = warp * per_warp + lane / (unsigned)team;
    t.step = (unsigned long long)gridDim.x * (blockDim.x >> 5) * per_warp;
    return t;
}

// The teams of a warp share one stride and their first blocks differ by less than 32/team,
// so looping while the warp's first team has a block keeps the loop warp-uniform.
__device__ static inline int lq_nf_warp_has_block(unsigned long long block, int team,
                                                  unsigned long long n_blocks) {
    return block - (threadIdx.x & 31u) / (unsigned)team < n_blocks;
}

// The quantizer's input at i: a[i], or a[i] − lowrank[i] when lowrank is given (a is W then).
__device__ static inline float lq_nf_input(const float *a, const float *lowrank,
                                           unsigned long long i) {
    return lowrank ? lq_nf_sub(a[i], lowrank[i]) : a[i];
}

// One value of a block's absmax: the larger of m and |x|; a non-finite x records its index in
// *first_bad (an atomic minimum: the first, as core reports).
__device__ static inline float lq_nf_absmax_add(float m, float x, unsigned long long index,
                                                unsigned long long *first_bad) {
    const float v = fabsf(x);
    if (!(v <= FLT_MAX)) atomicMin(first_bad, index);
    return v > m ? v : m;
}

// The smaller of `smallest` and the bits of the block absmax m (every absmax is >= +0, where
// unsigned order is float order).
__device__ static inline unsigned lq_nf_min_bits(unsigned smallest, float m) {
    const unsigned bits = __float_as_uint(m);
    return bits < smallest ? bits : smallest;
}

// The minimum of `smallest` over the thread block into *offset_bits (unless nothing was seen).
// Every thread of the block must call it.
__device__ static inline void lq_nf_offset_min(unsigned smallest, unsigned *offset_bits) {
    for (int s = 16; s > 0; s >>= 1) {
        unsigned other = __shfl_xor_sync(LQ_NF_FULL_MASK, smallest, s);
        smallest = other < smallest ? other : smallest;
    }
    __shared__ unsigned warp_min[LQ_NF_THREADS / 32];
    if ((threadIdx.x & 31) == 0) warp_min[threadIdx.x >> 5] = smallest;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < (int)(blockDim.x >> 5); i++)
            smallest = warp_min[i] < smallest ? warp_min[i] : smallest;
        if (smallest != 0xffffffffu) atomicMin(offset_bits, smallest);
    }
}

// 1. Block absmax of the input (a, or a − lowrank), the minimum of them into *offset_bits
// (preset to 0xffffffff by the caller) and the first non-finite index into *first_bad (an
// atomic minimum).
__global__ static void lq_nf_absmax_kernel(const float *a, const float *lowrank,
                                           unsigned long long numel, int B0, int team,
                                           unsigned long long n_blocks, float *absmax,
                                           unsigned *offset_bits, unsigned long long *first_bad) {
    unsigned smallest = 0xffffffffu;
    const struct lq_nf_teams t = lq_nf_teams_of(team);
    for (unsigned long long block = t.first; lq_nf_warp_has_block(block, team, n_blocks);
         block += t.step) {
        float m = 0.0f;
        if (block < n_blocks) {
            unsigned long long begin = block * (unsigned long long)B0;
            unsigned long long end = begin + (unsigned long long)B0;
            if (end > numel) end = numel;
            for (unsigned long long i = begin + t.member; i < end; i += (unsigned)team)
                m = lq_nf_absmax_add(m, lq_nf_input(a, lowrank, i), i, first_bad);
        }
        for (int s = team >> 1; s > 0; s >>= 1) {
            float other = __shfl_xor_sync(LQ_NF_FULL_MASK, m, s);
            m = other > m ? other : m;
        }
        if (block < n_blocks) {
            if (t.member == 0) absmax[block] = m;
            smallest = lq_nf_min_bits(smallest, m);
        }
    }
    lq_nf_offset_min(smallest, offset_bits);
}

// 2. One warp per group: the stored range, then each block's reconstructed scale. A range
// that overflows b2 records the group in *bad_group (atomic minimum: the first, as core
// reports) and keeps the unrounded range in group_scale for the message.
__global__ static void lq_nf_group_kernel(const float *absmax, unsigned long long n_blocks,
                                          unsigned long long n_groups, int B1, int b1, int b2,
                                          const unsigned *offset_bits, float *group_scale,
                                          float *block_scale, unsigned long long *bad_group) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned long long warp =
        (unsigned long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const unsigned long long warps = (unsigned long long)gridDim.x * (blockDim.x >> 5);
    const float offset = __uint_as_float(*offset_bits);
    const unsigned levels = (1u << b1) - 1u;
    for (unsigned long long group = warp; group < n_groups; group += warps) {
        unsigned long long begin = group * (unsigned long long)B1;
        unsigned long long end = begin + (unsigned long long)B1;
        if (end > n_blocks) end = n_blocks;
        float range = 0.0f;
        for (unsigned long long b = begin + lane; b < end; b += 32) {
            float d = lq_nf_sub(absmax[b], offset);
            range = d > range ? d : range;
        }
        for (int s = 16; s > 0; s >>= 1) {
            float other = __shfl_xor_sync(LQ_NF_FULL_MASK, range, s);
            range = other > range ? other : range;
        }
        float stored = lq_nf_round_scale(range, b2);
        if (!isfinite(stored)) {
            if (lane == 0) {
                atomicMin(bad_group, group);
                group_scale[group] = range;
            }
            continue;
        }
        if (lane == 0) group_scale[group] = stored;
        for (unsigned long long b = begin + lane; b < end; b += 32) {
            // A group whose blocks all equal the minimum has range 0: code 0 is exact there.
            unsigned code =
                stored > 0.0f ? lq_nf_scale_code(absmax[b], offset, stored, levels) : 0u;
            block_scale[b] = lq_nf_block_scale(offset, code, stored, b1);
        }
    }
}

// Where the values kernel also writes the next LQ step's residual:
// residual[i] = (w[i] − out[i]), times row_weight[i / cols]·col_weight[i % cols] when
// weighted (the decomposition's residual kernel, the same float operations).
struct lq_nf_residual {
    float *residual;                      // NULL: none
    const float *row_weight, *col_weight; // NULL: unweighted
    unsigned long long cols;
};

// The code table and midpoints into shared memory; every thread calls it (it ends with the
// barrier after which they may be read).
__device__ static inline void lq_nf_load_tables(const lq_nf_device_config &cfg, float *table,
                                                float *midpoints) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        table[i] = cfg.table[i], midpoints[i] = cfg.midpoints[i];
    __syncthreads();
}

// r times element i's weight row_weight[i / cols]·col_weight[i % cols] (next.row_weight set);
// a 32-bit division where every index of numel fits (several times cheaper).
__device__ static inline float lq_nf_weigh(float r, unsigned long long i, const lq_nf_residual next,
                                           unsigned long long numel) {
    unsigned long long row;
    if (numel <= 0xffffffffull)
        row = (unsigned)i / (unsigned)next.cols;
    else
        row = i / next.cols;
    return lq_nf_mul(r, lq_nf_mul(next.row_weight[row], next.col_weight[i - row * next.cols]));
}

// 3. out = table[code]·ŝ for every value of the input (a, or w − lowrank when a is NULL).
// With WITH_ERROR, also the sum over this thread block of F·(w − out − lowrank)² in double
// (F = 1 without fisher, lowrank = 0 without lowrank), core's error_pass for the new Q, into
// partials[blockIdx.x]; with next.residual, the next step's residual as above.
template <bool WITH_ERROR>
__global__ static void
lq_nf_values_kernel(const float *a, const __grid_constant__ lq_nf_device_config cfg,
                    const float *block_scale, float *out, const float *w, const float *lowrank,
                    const float *fisher, double *partials, const lq_nf_residual next) {
    __shared__ float table[256], midpoints[256];
    lq_nf_load_tables(cfg, table, midpoints);
    double sum = 0.0;
    const struct lq_nf_teams t = lq_nf_teams_of(cfg.team);
    // No shuffles here: each thread simply walks its own blocks.
    for (unsigned long long block = t.first; block < cfg.n_blocks; block += t.step) {
        const float scale = block_scale[block];
        unsigned long long begin = block * (unsigned long long)cfg.B0;
        unsigned long long end = begin + (unsigned long long)cfg.B0;
        if (end > cfg.numel) end = cfg.numel;
        for (unsigned long long i = begin + t.member; i < end; i += (unsigned)cfg.team) {
            const float x = a ? a[i] : lq_nf_sub(w[i], lowrank[i]);
            float v = lq_nf_value(x, scale, table, midpoints, cfg.b0);
            out[i] = v;
            if (WITH_ERROR) {
                double d = (double)w[i] - (double)v;
                if (lowrank) d -= (double)lowrank[i];
                sum += (fisher ? (double)fisher[i] : 1.0) * d * d;
            }
            if (next.residual) {
                float r = lq_nf_sub(w[i], v);
                if (next.row_weight) r = lq_nf_weigh(r, i, next, cfg.numel);
                next.residual[i] = r;
            }
        }
    }
    if (WITH_ERROR) {
        double total = lq_nf_block_sum(sum);
        if (threadIdx.x == 0) partials[blockIdx.x] = total;
    }
}

// 3 with 16-byte accesses (the decomposition's default): each thread takes 4 consecutive
// values at a time, all in one NF block (B0 % 4 == 0), in a grid-stride loop, where
// lq_nf_values_kernel has one value per lane and iteration: 4 times the bytes in flight for
// the same loads and stores. Each value's operations are those of lq_nf_values_kernel, so
// out and the residual are equal bit for bit; the error sum runs in another order (fixed by
// the launch shape). Needs lq_nf_vec4_ok.
template <bool WITH_ERROR>
__global__ static void
lq_nf_values_vec4_kernel(const float *a, const __grid_constant__ lq_nf_device_config cfg,
                         const float *block_scale, float *out, const float *w, const float *lowrank,
                         const float *fisher, double *partials, const lq_nf_residual next) {
    __shared__ float table[256], midpoints[256];
    lq_nf_load_tables(cfg, table, midpoints);
    double sum = 0.0;
    const unsigned long long quads = cfg.numel / 4, B0 = (unsigned long long)cfg.B0;
    for (unsigned long long quad = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         quad < quads; quad += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long first = quad * 4;
        const float scale = block_scale[first / B0];
        const float4 w4 = ((const float4 *)w)[quad];
        const float4 l4 = lowrank ? ((const float4 *)lowrank)[quad] : make_float4(0, 0, 0, 0);
        const float4 a4 = !a ? make_float4(0, 0, 0, 0) : a == w ? w4 : ((const float4 *)a)[quad];
        const float4 f4 = fisher ? ((const float4 *)fisher)[quad] : make_float4(1, 1, 1, 1);
        const float wv[4] = {w4.x, w4.y, w4.z, w4.w}, lv[4] = {l4.x, l4.y, l4.z, l4.w};
        const float av[4] = {a4.x, a4.y, a4.z, a4.w}, fv[4] = {f4.x, f4.y, f4.z, f4.w};
        float ov[4], rv[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float x = a ? av[k] : lq_nf_sub(wv[k], lv[k]);
            const float v = lq_nf_value(x, scale, table, midpoints, cfg.b0);
            ov[k] = v;
            if (WITH_ERROR) {
                double d = (double)wv[k] - (double)v;
                if (lowrank) d -= (double)lv[k];
                sum += (fisher ? (double)fv[k] : 1.0) * d * d;
            }
            float r = lq_nf_sub(wv[k], v);
            if (next.row_weight) r = lq_nf_weigh(r, first + (unsigned long long)k, next, cfg.numel);
            rv[k] = r;
        }
        ((float4 *)out)[quad] = make_float4(ov[0], ov[1], ov[2], ov[3]);
        if (next.residual)
            ((float4 *)next.residual)[quad] = make_float4(rv[0], rv[1], rv[2], rv[3]);
    }
    if (WITH_ERROR) {
        double total = lq_nf_block_sum(sum);
        if (threadIdx.x == 0) partials[blockIdx.x] = total;
    }
}

// Whether lq_nf_values_vec4_kernel can take cfg with these arrays (NULLs allowed): whole
// quads of values, blocks of whole quads, 16-byte-aligned arrays.
static inline bool lq_nf_vec4_ok(const struct lq_nf_device_config *cfg, const void *const *arrays,
                                 int count) {
    if (cfg->numel % 4 != 0 || cfg->B0 % 4 != 0) return false;
    for (int i = 0; i < count; i++)
        if ((uintptr_t)arrays[i] % 16 != 0) return false;
    return true;
}

#endif
