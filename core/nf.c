#include "nf.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitpack.h"
#include "parallel.h"
#include "half.h"

/* ---------- configurations ---------- */

int lq_scale_dtype_bits(enum lq_scale_dtype dtype) {
    return dtype == LQ_SCALE_FP32 ? 32 : 16;
}

const char *lq_scale_dtype_name(enum lq_scale_dtype dtype) {
    switch (dtype) {
    case LQ_SCALE_BF16:
        return "bf16";
    case LQ_SCALE_FP16:
        return "fp16";
    case LQ_SCALE_FP32:
        return "fp32";
    }
    return "?";
}

int lq_nf_config_validate(const struct lq_nf_config *c, struct lq_error *err) {
    if (c->b0 != 2 && c->b0 != 3 && c->b0 != 4 && c->b0 != 8)
        return lq_error_set(err, LQ_EINVAL, "b0 = %d: code bits must be 2, 3, 4 or 8", c->b0);
    if (c->b1 < 1 || c->b1 > 8)
        return lq_error_set(err, LQ_EINVAL, "b1 = %d: scale bits must be 1..8", c->b1);
    if (c->b2 != LQ_SCALE_BF16 && c->b2 != LQ_SCALE_FP16 && c->b2 != LQ_SCALE_FP32)
        return lq_error_set(err, LQ_EINVAL, "b2 = %d: must be bf16, fp16 or fp32", (int)c->b2);
    if (c->B0 < 1 || c->B0 > 65536)
        return lq_error_set(err, LQ_EINVAL, "B0 = %d: block size must be 1..65536", c->B0);
    if (c->B1 < 1 || c->B1 > 65536)
        return lq_error_set(err, LQ_EINVAL, "B1 = %d: group size must be 1..65536", c->B1);
    return LQ_OK;
}

static int parse_int_field(const char *text, size_t length, int *out) {
    if (length == 0 || length > 9) return -1;
    int value = 0;
    for (size_t i = 0; i < length; i++) {
        if (text[i] < '0' || text[i] > '9') return -1;
        value = value * 10 + (text[i] - '0');
    }
    *out = value;
    return 0;
}

int lq_nf_config_parse(const char *text, struct lq_nf_config *out, struct lq_error *err) {
    const char *fields[5];
    size_t lengths[5];
    const char *cursor = text;
    if (*cursor == '(') cursor++;
    for (int i = 0; i < 5; i++) {
        while (*cursor == ' ') cursor++;
        fields[i] = cursor;
        while (*cursor && *cursor != ',' && *cursor != ')' && *cursor != ' ') cursor++;
        lengths[i] = (size_t)(cursor - fields[i]);
        while (*cursor == ' ') cursor++;
        if (i < 4) {
            if (*cursor != ',')
                return lq_error_set(err, LQ_EINVAL,
                                    "configuration '%s': expected 5 comma-separated fields "
                                    "b0,b1,b2,B0,B1 (e.g. 3,8,fp32,64,256)",
                                    text);
            cursor++;
        }
    }
    if (*cursor == ')') cursor++;
    if (*cursor != '\0')
        return lq_error_set(err, LQ_EINVAL, "configuration '%s': trailing characters", text);

    struct lq_nf_config c;
    int b2_bits = -1;
    if (parse_int_field(fields[0], lengths[0], &c.b0) ||
        parse_int_field(fields[1], lengths[1], &c.b1) ||
        parse_int_field(fields[3], lengths[3], &c.B0) ||
        parse_int_field(fields[4], lengths[4], &c.B1))
        return lq_error_set(err, LQ_EINVAL,
                            "configuration '%s': b0, b1, B0 and B1 must be integers", text);
    if (lengths[2] == 4 && strncmp(fields[2], "bf16", 4) == 0)
        c.b2 = LQ_SCALE_BF16;
    else if (lengths[2] == 4 && strncmp(fields[2], "fp16", 4) == 0)
        c.b2 = LQ_SCALE_FP16;
    else if (lengths[2] == 4 && strncmp(fields[2], "fp32", 4) == 0)
        c.b2 = LQ_SCALE_FP32;
    else if (parse_int_field(fields[2], lengths[2], &b2_bits) == 0 &&
             (b2_bits == 16 || b2_bits == 32))
        c.b2 = b2_bits == 16 ? LQ_SCALE_FP16 : LQ_SCALE_FP32;
    else
        return lq_error_set(err, LQ_EINVAL, "configuration '%s': b2 must be bf16, fp16 or fp32",
                            text);
    int rc = lq_nf_config_validate(&c, err);
    if (rc) return lq_error_prefix(err, "configuration '%s'", text);
    *out = c;
    return LQ_OK;
}

char *lq_nf_config_format(const struct lq_nf_config *c, char *buffer, size_t size) {
    snprintf(buffer, size, "(%d, %d, %s, %d, %d)", c->b0, c->b1, lq_scale_dtype_name(c->b2), c->B0,
             c->B1);
    return buffer;
}

void lq_nf_grid_table1(struct lq_nf_config out[LQ_NF_TABLE1_SIZE]) {
    static const int bits[3] = {2, 3, 4};
    static const enum lq_scale_dtype dtypes[3] = {LQ_SCALE_BF16, LQ_SCALE_FP16, LQ_SCALE_FP32};
    static const int block_sizes[3] = {16, 32, 64};
    static const int group_sizes[3] = {16, 64, 256};
    size_t n = 0;
    for (int i0 = 0; i0 < 3; i0++)
        for (int i1 = 0; i1 < 3; i1++)
            for (int i2 = 0; i2 < 3; i2++)
                for (int i3 = 0; i3 < 3; i3++)
                    for (int i4 = 0; i4 < 3; i4++)
                        out[n++] = (struct lq_nf_config){bits[i0], bits[i1], dtypes[i2],
                                                         block_sizes[i3], group_sizes[i4]};
}

double lq_nf_bits_per_param(const struct lq_nf_config *c) {
    return (double)c->b0 + (double)c->b1 / c->B0 +
           (double)lq_scale_dtype_bits(c->b2) / ((double)c->B0 * c->B1);
}

double lq_nf_storage_bits(size_t numel, const struct lq_nf_config *c) {
    return (double)numel * lq_nf_bits_per_param(c);
}

/* ---------- code tables ---------- */

static double normal_cdf(double x) {
    return 0.5 * erfc(-x / sqrt(2.0));
}

double lq_normal_quantile(double p) {
    if (!(p > 0.0 && p < 1.0)) return p == 0.0 ? -INFINITY : p == 1.0 ? INFINITY : NAN;
    /* Abramowitz & Stegun 26.2.23 (error < 4.5e-4) as the start, then Halley steps on the
     * exact CDF: each step roughly triples the correct digits. */
    double tail = p < 0.5 ? p : 1.0 - p;
    double t = sqrt(-2.0 * log(tail));
    double x = t - (2.515517 + t * (0.802853 + t * 0.010328)) /
                       (1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308)));
    if (p < 0.5) x = -x;
    for (int step = 0; step < 4; step++) {
        double e = normal_cdf(x) - p;
        double u = e * sqrt(2.0 * M_PI) * exp(0.5 * x * x);
        x -= u / (1.0 + 0.5 * x * u);
    }
    return x;
}

#define LQ_NF_MAX_BITS 8
static float code_tables[LQ_NF_MAX_BITS + 1][1 << LQ_NF_MAX_BITS];
static pthread_once_t code_tables_once = PTHREAD_ONCE_INIT;

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void build_code_tables(void) {
    /* δ = ½(1/30 + 1/32): the outermost quantile, so that ±1 are finite codes (§2.2). */
    const double outer = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0);
    for (int bits = 2; bits <= LQ_NF_MAX_BITS; bits++) {
        int half = 1 << (bits - 1);
        double values[1 << LQ_NF_MAX_BITS];
        int n = 0;
        /* 2^(k-1) positive codes: probabilities linspace(outer, 0.5, 2^(k-1)+1), 0.5 dropped. */
        for (int i = 0; i < half; i++)
            values[n++] = lq_normal_quantile(outer + (0.5 - outer) * i / half);
        /* 2^(k-1)-1 negative codes: linspace(outer, 0.5, 2^(k-1)), 0.5 dropped. */
        for (int i = 0; i < half - 1; i++)
            values[n++] = -lq_normal_quantile(outer + (0.5 - outer) * i / (half - 1));
        values[n++] = 0.0;
        double top = values[0];
        for (int i = 0; i < n; i++) values[i] /= top;
        qsort(values, (size_t)n, sizeof values[0], compare_double);
        for (int i = 0; i < n; i++) code_tables[bits][i] = (float)values[i];
    }
}

const float *lq_nf_code_table(int bits) {
    if (bits < 2 || bits > LQ_NF_MAX_BITS) return NULL;
    pthread_once(&code_tables_once, build_code_tables);
    return code_tables[bits];
}

/* ---------- blocks and double quantization of their scales ---------- */

size_t lq_nf_block_count(size_t numel, const struct lq_nf_config *c) {
    return (numel + (size_t)c->B0 - 1) / (size_t)c->B0;
}

size_t lq_nf_group_count(size_t numel, const struct lq_nf_config *c) {
    return (lq_nf_block_count(numel, c) + (size_t)c->B1 - 1) / (size_t)c->B1;
}

static float round_to_scale_dtype(float value, enum lq_scale_dtype dtype) {
    switch (dtype) {
    case LQ_SCALE_BF16:
        return lq_bf16_to_float(lq_float_to_bf16(value));
    case LQ_SCALE_FP16:
        return lq_fp16_to_float(lq_float_to_fp16(value));
    case LQ_SCALE_FP32:
        return value;
    }
    return value;
}

/* What quantization of the block scales produces; all arrays owned by the caller. */
struct scale_plan {
    float offset;        /* minimum block absmax (per matrix) */
    float *group_scale;  /* per group: max(s - offset), rounded to b2 */
    uint8_t *scale_code; /* per block: b1-bit code */
    float *block_scale;  /* per block: the reconstructed scale ŝ used to pick and decode codes */
};

/* ŝ = offset + code·a/(2^b1 − 1); shared by quantization and dequantization so both use
 * bit-identical scales. */
static inline float reconstruct_scale(float offset, unsigned code, float group_scale, int b1) {
    float levels = (float)((1u << b1) - 1u);
    return offset + (float)code * group_scale / levels;
}

struct absmax_job {
    const float *a;
    size_t numel, block_size;
    float *absmax;
    size_t first_bad; /* per range: index of the first non-finite value, or SIZE_MAX */
};

static void absmax_body(void *context, size_t first_block, size_t end_block) {
    struct absmax_job *job = context;
    size_t bad = SIZE_MAX;
    for (size_t block = first_block; block < end_block; block++) {
        size_t begin = block * job->block_size;
        size_t end = begin + job->block_size < job->numel ? begin + job->block_size : job->numel;
        float m = 0.0f;
        int finite = 1;
        for (size_t i = begin; i < end; i++) {
            float v = fabsf(job->a[i]);
            finite &= v <= 3.4028234663852886e38f; /* false for Inf and NaN */
            m = v > m ? v : m;
        }
        if (!finite && bad == SIZE_MAX)
            for (size_t i = begin; i < end && bad == SIZE_MAX; i++)
                if (!isfinite(job->a[i])) bad = i;
        job->absmax[block] = m;
    }
    /* Ranges are disjoint and bad only shrinks toward the first index: a racy read-compare is
     * avoided by an atomic minimum. */
    if (bad != SIZE_MAX) {
        size_t seen = __atomic_load_n(&job->first_bad, __ATOMIC_RELAXED);
        while (bad < seen && !__atomic_compare_exchange_n(&job->first_bad, &seen, bad, 0,
                                                          __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        }
    }
}

static int plan_scales(const float *a, size_t numel, const struct lq_nf_config *c,
                       struct scale_plan *plan, struct lq_error *err) {
    size_t n_blocks = lq_nf_block_count(numel, c);
    size_t n_groups = lq_nf_group_count(numel, c);
    float *absmax = plan->block_scale; /* reused: absmax first, ŝ after */
    struct absmax_job job = {a, numel, (size_t)c->B0, absmax, SIZE_MAX};
    lq_parallel_for(n_blocks, (1u << 16) / (unsigned)c->B0 + 1, absmax_body, &job);
    if (job.first_bad != SIZE_MAX)
        return lq_error_set(err, LQ_ENUMERIC, "value %zu is %g: cannot quantize", job.first_bad,
                            (double)a[job.first_bad]);
    float offset = INFINITY;
    for (size_t block = 0; block < n_blocks; block++)
        offset = absmax[block] < offset ? absmax[block] : offset;
    plan->offset = offset;
    const unsigned levels = (1u << c->b1) - 1u;
    for (size_t group = 0; group < n_groups; group++) {
        size_t begin = group * (size_t)c->B1;
        size_t end = begin + (size_t)c->B1 < n_blocks ? begin + (size_t)c->B1 : n_blocks;
        float range = 0.0f;
        for (size_t b = begin; b < end; b++) {
            float d = absmax[b] - offset;
            range = d > range ? d : range;
        }
        float stored = round_to_scale_dtype(range, c->b2);
        if (!isfinite(stored))
            return lq_error_set(err, LQ_ENUMERIC,
                                "group %zu: scale %g overflows %s; choose a wider b2", group,
                                (double)range, lq_scale_dtype_name(c->b2));
        plan->group_scale[group] = stored;
        for (size_t b = begin; b < end; b++) {
            unsigned code = 0;
            /* A group whose blocks all equal the minimum has range 0: code 0 is exact there. */
            if (stored > 0.0f) {
                float q = nearbyintf((absmax[b] - offset) * (float)levels / stored);
                code = q <= 0.0f ? 0u : q >= (float)levels ? levels : (unsigned)q;
            }
            plan->scale_code[b] = (uint8_t)code;
            plan->block_scale[b] = reconstruct_scale(offset, code, stored, c->b1);
        }
    }
    return LQ_OK;
}

/* Midpoints between neighbouring codes, padded so the branchless search below can always
 * probe 2^bits - 1 entries. */
static void code_midpoints(int bits, float *midpoints) {
    const float *table = lq_nf_code_table(bits);
    int n = 1 << bits;
    for (int i = 0; i + 1 < n; i++) midpoints[i] = (table[i] + table[i + 1]) * 0.5f;
}

/* Index of the nearest code to v: the number of midpoints strictly below v, so a value on a
 * midpoint takes the lower code and values past ±1 saturate. Branchless binary search. */
static inline unsigned nearest_code(float v, const float *midpoints, int bits) {
    unsigned index = 0;
    for (unsigned step = 1u << (bits - 1); step > 0; step >>= 1)
        index += (v > midpoints[index + step - 1]) ? step : 0u;
    return index;
}

static void block_codes(const float *x, size_t count, float scale, const float *midpoints, int bits,
                        uint8_t *codes) {
    if (scale == 0.0f) {
        /* The block dequantizes to 0 whatever its codes: use the exact zero code. */
        memset(codes, (1 << (bits - 1)) - 1, count);
        return;
    }
    for (size_t i = 0; i < count; i++)
        codes[i] = (uint8_t)nearest_code(x[i] / scale, midpoints, bits);
}

/* Codes (into codes) or dequantized values (into values) of a range of blocks. */
struct codes_job {
    const float *a;
    size_t numel;
    const struct lq_nf_config *config;
    const float *block_scale;
    uint8_t *codes; /* numel unpacked codes, or NULL */
    float *values;  /* numel dequantized values, or NULL */
    float midpoints[1 << LQ_NF_MAX_BITS];
};

static void codes_body(void *context, size_t first_block, size_t end_block) {
    const struct codes_job *job = context;
    const size_t block_size = (size_t)job->config->B0;
    const float *table = lq_nf_code_table(job->config->b0);
    uint8_t scratch[65536];
    for (size_t block = first_block; block < end_block; block++) {
        size_t begin = block * block_size;
        size_t count = job->numel - begin < block_size ? job->numel - begin : block_size;
        float scale = job->block_scale[block];
        uint8_t *codes = job->codes ? job->codes + begin : scratch;
        block_codes(job->a + begin, count, scale, job->midpoints, job->config->b0, codes);
        if (job->values)
            for (size_t i = 0; i < count; i++) job->values[begin + i] = table[codes[i]] * scale;
    }
}

static int alloc_plan(size_t numel, const struct lq_nf_config *c, struct scale_plan *plan,
                      struct lq_error *err) {
    size_t n_blocks = lq_nf_block_count(numel, c), n_groups = lq_nf_group_count(numel, c);
    plan->group_scale = malloc(n_groups * sizeof(float));
    plan->scale_code = malloc(n_blocks);
    plan->block_scale = malloc(n_blocks * sizeof(float));
    if (!plan->group_scale || !plan->scale_code || !plan->block_scale) {
        free(plan->group_scale), free(plan->scale_code), free(plan->block_scale);
        return lq_error_set(err, LQ_ENOMEM, "out of memory for %zu block scales", n_blocks);
    }
    return LQ_OK;
}

static void free_plan(struct scale_plan *plan) {
    free(plan->group_scale);
    free(plan->scale_code);
    free(plan->block_scale);
}

/* ---------- quantize / dequantize ---------- */

size_t lq_nf_codes_bytes(const struct lq_nf_matrix *m) {
    return lq_bitpack_bytes(m->rows * m->cols, m->config.b0);
}

size_t lq_nf_scale_codes_bytes(const struct lq_nf_matrix *m) {
    return lq_bitpack_bytes(lq_nf_block_count(m->rows * m->cols, &m->config), m->config.b1);
}

size_t lq_nf_group_scales_bytes(const struct lq_nf_matrix *m) {
    return lq_nf_group_count(m->rows * m->cols, &m->config) *
           (size_t)(lq_scale_dtype_bits(m->config.b2) / 8);
}

size_t lq_nf_matrix_bytes(const struct lq_nf_matrix *m) {
    return lq_nf_codes_bytes(m) + lq_nf_scale_codes_bytes(m) + lq_nf_group_scales_bytes(m) +
           sizeof(float);
}

static void store_group_scale(uint8_t *out, size_t group, float value, enum lq_scale_dtype dtype) {
    if (dtype == LQ_SCALE_FP32) {
        memcpy(out + 4 * group, &value, 4);
        return;
    }
    uint16_t half = dtype == LQ_SCALE_BF16 ? lq_float_to_bf16(value) : lq_float_to_fp16(value);
    out[2 * group] = (uint8_t)half;
    out[2 * group + 1] = (uint8_t)(half >> 8);
}

static float load_group_scale(const uint8_t *in, size_t group, enum lq_scale_dtype dtype) {
    if (dtype == LQ_SCALE_FP32) {
        float value;
        memcpy(&value, in + 4 * group, 4);
        return value;
    }
    uint16_t half = (uint16_t)(in[2 * group] | (in[2 * group + 1] << 8));
    return dtype == LQ_SCALE_BF16 ? lq_bf16_to_float(half) : lq_fp16_to_float(half);
}

int lq_nf_quantize(const float *a, size_t rows, size_t cols, const struct lq_nf_config *c,
                   struct lq_nf_matrix *out, struct lq_error *err) {
    memset(out, 0, sizeof *out);
    int rc = lq_nf_config_validate(c, err);
    if (rc) return rc;
    size_t numel = rows * cols;
    if (rows == 0 || cols == 0 || numel / rows != cols)
        return lq_error_set(err, LQ_EINVAL, "cannot quantize a %zu x %zu matrix", rows, cols);
    out->config = *c;
    out->rows = rows;
    out->cols = cols;
    size_t n_blocks = lq_nf_block_count(numel, c), n_groups = lq_nf_group_count(numel, c);

    struct scale_plan plan;
    if ((rc = alloc_plan(numel, c, &plan, err))) return rc;
    uint8_t *codes = malloc(numel);
    out->codes = malloc(lq_nf_codes_bytes(out));
    out->scale_codes = malloc(lq_nf_scale_codes_bytes(out));
    out->group_scales = malloc(lq_nf_group_scales_bytes(out));
    if (!codes || !out->codes || !out->scale_codes || !out->group_scales) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory quantizing %zu x %zu", rows, cols);
        goto done;
    }
    if ((rc = plan_scales(a, numel, c, &plan, err))) goto done;

    struct codes_job job = {a, numel, c, plan.block_scale, codes, NULL, {0}};
    code_midpoints(c->b0, job.midpoints);
    lq_parallel_for(n_blocks, (1u << 16) / (unsigned)c->B0 + 1, codes_body, &job);
    lq_bitpack_pack(codes, numel, c->b0, out->codes);
    lq_bitpack_pack(plan.scale_code, n_blocks, c->b1, out->scale_codes);
    for (size_t g = 0; g < n_groups; g++)
        store_group_scale(out->group_scales, g, plan.group_scale[g], c->b2);
    out->scale_offset = plan.offset;

done:
    free(codes);
    free_plan(&plan);
    if (rc) lq_nf_matrix_free(out);
    return rc;
}

float lq_nf_block_scale(const struct lq_nf_matrix *m, size_t block) {
    const struct lq_nf_config *c = &m->config;
    float group_scale = load_group_scale(m->group_scales, block / (size_t)c->B1, c->b2);
    unsigned scale_code = lq_bitpack_get(m->scale_codes, block, c->b1);
    return reconstruct_scale(m->scale_offset, scale_code, group_scale, c->b1);
}

float lq_nf_group_scale(const struct lq_nf_matrix *m, size_t group) {
    return load_group_scale(m->group_scales, group, m->config.b2);
}

/* Whether a memcpy'ed word holds the packed codes in lq_bitpack's order (least significant bit
 * first). */
#define LITTLE_ENDIAN_HOST (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)

void lq_nf_block_scales(const struct lq_nf_matrix *m, size_t first, size_t count, float *scales) {
    const struct lq_nf_config *c = &m->config;
    const int b1 = c->b1;
    const size_t group_blocks = (size_t)c->B1, codes_bytes = lq_nf_scale_codes_bytes(m);
    const uint64_t mask = ((uint64_t)1 << b1) - 1u;
    size_t group = first / group_blocks, in_group = first % group_blocks;
    float group_scale = load_group_scale(m->group_scales, group, c->b2);
    for (size_t k = 0; k < count;) {
        if (in_group == group_blocks) { /* the next group's scale, decoded once per group */
            in_group = 0;
            group_scale = load_group_scale(m->group_scales, ++group, c->b2);
        }
        if (LITTLE_ENDIAN_HOST && b1 <= 8 && k + 8 <= count && in_group + 8 <= group_blocks) {
            /* eight codes of one group from one 64-bit word (b1 <= 8: at most 7 + 8 b1 <= 64
             * bits from the first one's byte), as lq_bitpack_get reads them one by one: the
             * call per block was 14% of the exact AVX2 decode's instructions */
            const size_t bit = (first + k) * (size_t)b1, byte = bit >> 3;
            uint64_t word = 0;
            if (byte + 8 <= codes_bytes) /* a fixed size: an inlined load, not a call */
                memcpy(&word, m->scale_codes + byte, 8);
            else
                memcpy(&word, m->scale_codes + byte, codes_bytes - byte);
            const unsigned shift = (unsigned)(bit & 7);
            for (int i = 0; i < 8; i++) {
                unsigned code = (unsigned)((word >> (shift + (unsigned)(i * b1))) & mask);
                scales[k + (size_t)i] = reconstruct_scale(m->scale_offset, code, group_scale, b1);
            }
            k += 8, in_group += 8;
            continue;
        }
        unsigned code = lq_bitpack_get(m->scale_codes, first + k, b1);
        scales[k] = reconstruct_scale(m->scale_offset, code, group_scale, b1);
        k++, in_group++;
    }
}

void lq_nf_dequantize_range(const struct lq_nf_matrix *m, size_t first, size_t count, float *out) {
    const struct lq_nf_config *c = &m->config;
    const float *table = lq_nf_code_table(c->b0);
    const size_t block_size = (size_t)c->B0;
    uint8_t codes[4096];
    size_t done = 0;
    while (done < count) {
        size_t index = first + done;
        size_t block = index / block_size;
        float scale = lq_nf_block_scale(m, block);
        /* the rest of this block, the rest of the range, and the scratch size bound the run */
        size_t run = (block + 1) * block_size - index;
        if (run > count - done) run = count - done;
        if (run > sizeof codes) run = sizeof codes;
        lq_bitpack_unpack(m->codes, index, run, c->b0, codes);
        for (size_t i = 0; i < run; i++) out[done + i] = table[codes[i]] * scale;
        done += run;
    }
}

void lq_nf_dequantize(const struct lq_nf_matrix *m, float *out) {
    lq_nf_dequantize_range(m, 0, m->rows * m->cols, out);
}

int lq_nf_quantize_dequantize(const float *a, size_t numel, const struct lq_nf_config *c,
                              float *out, struct lq_error *err) {
    int rc = lq_nf_config_validate(c, err);
    if (rc) return rc;
    if (numel == 0) return LQ_OK;
    struct scale_plan plan;
    if ((rc = alloc_plan(numel, c, &plan, err))) return rc;
    if ((rc = plan_scales(a, numel, c, &plan, err))) {
        free_plan(&plan);
        return rc;
    }
    struct codes_job job = {a, numel, c, plan.block_scale, NULL, out, {0}};
    code_midpoints(c->b0, job.midpoints);
    lq_parallel_for(lq_nf_block_count(numel, c), (1u << 16) / (unsigned)c->B0 + 1, codes_body,
                    &job);
    free_plan(&plan);
    return LQ_OK;
}

void lq_nf_matrix_free(struct lq_nf_matrix *m) {
    if (!m) return;
    free(m->codes);
    free(m->scale_codes);
    free(m->group_scales);
    m->codes = m->scale_codes = m->group_scales = NULL;
}
