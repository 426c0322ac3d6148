/* The one-token attention kernel's source itself (kernels/cuda/attention_decode_kernel.h), run
 * on the CPU by tests/unit/cta_emulation.h: a pthread per CUDA thread, shuffles and barriers
 * emulated, shared memory and every output poisoned. Against a float64 softmax attention:
 *   - one sequence (the cache as it is) and a batch (each sequence's new key and value read
 *     from k_new/v_new and stored into its cache row at its position, the rest of the cache
 *     untouched), positions 0, short and long;
 *   - head_dim 8 (fewer chunks than a key's 8 lanes), 48, 64, 128, 256 and groups of 1, 2, 3
 *     (padded to 4 rows), 4 and 8 q heads per kv head;
 *   - one split (normalized output) and several (each split's unnormalized sum and its (max,
 *     sum), merged here as attention_combine does), splits past a sequence's keys skipped.
 * Outputs within 2e-5 of the largest |value| of the reference row, as the GPU tests' fp32
 * tolerance; tests/kernels/test_cuda_ops.c runs it on a GPU. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "tests/unit/cta_emulation.h"
#include "tests/unit/lq_test.h"

#include "core/rng.h"

#define LQ_AD_FN static inline
#define LQ_AD_UNROLL

static inline void lq_ad_load4(const float *p, float v[4]) {
    if ((uintptr_t)p % 16 != 0) abort(); /* a float4 load on the GPU */
    memcpy(v, p, 16);
}
static inline float lq_ad_shfl_xor(float v, int offset) {
    return cta_shfl_xor(v, offset);
}
static inline void lq_ad_sync(void) {
    cta_sync();
}
static inline float lq_ad_exp(float x) {
    return expf(x);
}
/* each product and sum rounded on its own (a volatile store keeps the compiler from fusing) */
static inline float lq_ad_fmul(float x, float y) {
    volatile float r = x * y;
    return r;
}
static inline float lq_ad_fadd(float x, float y) {
    volatile float r = x + y;
    return r;
}
static inline float lq_ad_fsub(float x, float y) {
    volatile float r = x - y;
    return r;
}
/* the rope kernel's angles (kernels/cuda/rope_angle_cuda.cuh) */
static void lq_ad_rope_angle(int position, int k, int head_dim, float theta, float *c, float *s) {
    const double angle = position * pow((double)theta, -2.0 * k / head_dim);
    *c = (float)cos(angle), *s = (float)sin(angle);
}

#include "kernels/cuda/attention_decode_kernel.h"

struct launch {
    const struct lq_ad_args *args;
    int chunks, rows, kv_heads;
};

static void run_thread(const void *arg, int block, int thread, void *shared) {
    const struct launch *l = arg;
    /* grid (kv_heads, sequences · splits), flattened: block = z · kv_heads + kv_head */
    lq_ad_body(l->args, l->chunks, l->rows, block % l->kv_heads, block / l->kv_heads, thread,
               shared);
}

static struct lq_rng rng;

static float *random_floats(size_t count) {
    float *out = aligned_alloc(16, (count * sizeof(float) + 15) / 16 * 16 + 16);
    if (!out) abort();
    for (size_t i = 0; i < count; i++) out[i] = (float)lq_rng_normal(&rng);
    return out;
}

static float *poisoned(size_t count) {
    float *out = aligned_alloc(16, (count * sizeof(float) + 15) / 16 * 16 + 16);
    if (!out) abort();
    for (size_t i = 0; i < count; i++) out[i] = NAN;
    return out;
}

/* out[head_dim] = softmax(q·Kᵀ / sqrt(head_dim)) · V over keys 0..last, in float64; key `fresh`
 * (or -1) from k_fresh/v_fresh. */
static void reference(const float *q, const float *k, const float *v, int kv_dim, int last,
                      int fresh, const float *k_fresh, const float *v_fresh, int head_dim,
                      float scale, double *out) {
    double *s = malloc((size_t)(last + 1) * sizeof *s), max = -INFINITY, sum = 0.0;
    if (!s) abort();
    for (int key = 0; key <= last; key++) {
        const float *kr = key == fresh ? k_fresh : k + (size_t)key * kv_dim;
        double dot = 0.0;
        for (int d = 0; d < head_dim; d++) dot += (double)q[d] * kr[d];
        s[key] = dot * scale;
        if (s[key] > max) max = s[key];
    }
    for (int d = 0; d < head_dim; d++) out[d] = 0.0;
    for (int key = 0; key <= last; key++) {
        const double p = exp(s[key] - max);
        const float *vr = key == fresh ? v_fresh : v + (size_t)key * kv_dim;
        sum += p;
        for (int d = 0; d < head_dim; d++) out[d] += p * vr[d];
    }
    for (int d = 0; d < head_dim; d++) out[d] /= sum;
    free(s);
}

/* The rotary embedding as the rope kernel applies it (ops_cuda.cu rope_rows), to `rows` rows
 * of head_dim at `position`, in place: the test's own transcription, from the cos/sin of
 * lq_ad_rope_angle (which the table below also holds). */
#define ROPE_THETA 10000.0f
#define ROPE_TABLE_ROWS 64 /* positions with a cached cos/sin row; the rest are computed */
static void rope_rows(float *x, int rows, int head_dim, int position) {
    const int half = head_dim / 2;
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < half; k++) {
            float c, s;
            lq_ad_rope_angle(position, k, head_dim, ROPE_THETA, &c, &s);
            float *v = x + (size_t)r * head_dim;
            const float x0 = v[k], x1 = v[k + half];
            v[k] = lq_ad_fsub(lq_ad_fmul(x0, c), lq_ad_fmul(x1, s));
            v[k + half] = lq_ad_fadd(lq_ad_fmul(x0, s), lq_ad_fmul(x1, c));
        }
}

/* Runs the kernel over `sequences` sequences (batch: caches per sequence with positions; else
 * one sequence at `start`) with `splits` splits of the keys, merges the splits as
 * attention_combine does, and compares every output row. rope (a batch): q and the new keys go
 * in unrotated and the kernel rotates them; the reference rotates them first, and the stored
 * key must be the rotated one bit for bit. */
static void check_case_rope(int batch, int sequences, const int *positions, int heads, int kv_heads,
                            int head_dim, int splits, int rope);
static void check_case(int batch, int sequences, const int *positions, int heads, int kv_heads,
                       int head_dim, int splits) {
    check_case_rope(batch, sequences, positions, heads, kv_heads, head_dim, splits, 0);
}
static void check_case_rope(int batch, int sequences, const int *positions, int heads, int kv_heads,
                            int head_dim, int splits, int rope) {
    char label[160];
    snprintf(label, sizeof label, "%s of %d, heads %d/%d, head_dim %d, %d splits%s",
             batch ? "batch" : "sequence", sequences, heads, kv_heads, head_dim, splits,
             rope ? ", rope" : "");
    const int group = heads / kv_heads, kv_dim = kv_heads * head_dim;
    const int chunks = lq_ad_chunks(head_dim), rows = lq_ad_rows(group);
    CHECK_MSG(chunks > 0 && rows > 0 && chunks * rows <= LQ_AD_MAX_ROWS_CHUNKS,
              "%s: not a shape of the kernel", label);
    int keys = 0;
    for (int s = 0; s < sequences; s++)
        if (positions[s] + 1 > keys) keys = positions[s] + 1;
    const int split_len =
        ((keys + splits - 1) / splits + LQ_AD_STEP_KEYS - 1) / LQ_AD_STEP_KEYS * LQ_AD_STEP_KEYS;
    splits = (keys + split_len - 1) / split_len;
    CHECK_MSG((size_t)rows * split_len <= LQ_AD_MAX_SCORES, "%s: too many keys per split", label);

    const size_t q_count = (size_t)sequences * heads * head_dim, cache = (size_t)keys * kv_dim;
    float *q = random_floats(q_count), *out = poisoned(q_count);
    float *k_new = random_floats((size_t)sequences * kv_dim);
    float *v_new = random_floats((size_t)sequences * kv_dim);
    float *k_caches[8], *v_caches[8], *k_before[8];
    for (int s = 0; s < sequences; s++) {
        k_caches[s] = random_floats(cache), v_caches[s] = random_floats(cache);
        k_before[s] = malloc(cache * sizeof(float));
        if (!k_before[s]) abort();
        memcpy(k_before[s], k_caches[s], cache * sizeof(float));
    }
    const size_t parts = q_count / head_dim * splits;
    float *part_out = poisoned(parts * head_dim), *part_stats = poisoned(parts * 2);
    /* what the reference sees: q and the new keys rotated (rope), else as they are */
    float *q_ref = malloc(q_count * sizeof(float));
    float *k_new_ref = malloc((size_t)sequences * kv_dim * sizeof(float));
    float *table = malloc((size_t)ROPE_TABLE_ROWS * head_dim * sizeof(float));
    if (!q_ref || !k_new_ref || !table) abort();
    memcpy(q_ref, q, q_count * sizeof(float));
    memcpy(k_new_ref, k_new, (size_t)sequences * kv_dim * sizeof(float));
    for (int p = 0; p < ROPE_TABLE_ROWS; p++)
        for (int k = 0; k < head_dim / 2; k++)
            lq_ad_rope_angle(p, k, head_dim, ROPE_THETA, &table[(size_t)p * head_dim + k],
                             &table[(size_t)p * head_dim + head_dim / 2 + k]);
    if (rope) {
        CHECK_MSG(batch && lq_ad_rope_fits(head_dim), "%s: not a rope shape", label);
        for (int s = 0; s < sequences; s++) {
            rope_rows(q_ref + (size_t)s * heads * head_dim, heads, head_dim, positions[s]);
            rope_rows(k_new_ref + (size_t)s * kv_dim, kv_heads, head_dim, positions[s]);
        }
    }

    struct lq_ad_args a;
    memset(&a, 0, sizeof a);
    a.q = q, a.out = out;
    if (batch) {
        a.k_caches = k_caches, a.v_caches = v_caches, a.positions = positions;
        a.k_new = k_new, a.v_new = v_new;
    } else {
        a.k_cache = k_caches[0], a.v_cache = v_caches[0], a.start = positions[0];
    }
    a.heads = heads, a.kv_heads = kv_heads, a.head_dim = head_dim, a.group = group;
    a.splits = splits, a.split_len = split_len;
    a.scale = 1.0f / sqrtf((float)head_dim);
    a.part_out = part_out, a.part_stats = part_stats;
    a.rope.on = rope, a.rope.table = table, a.rope.positions = ROPE_TABLE_ROWS;
    a.rope.theta = ROPE_THETA;
    const struct launch l = {&a, chunks, rows, kv_heads};
    cta_run_grid(run_thread, &l, kv_heads * sequences * splits, LQ_AD_THREADS,
                 lq_ad_shared_floats(rows, head_dim, split_len) * sizeof(float));

    double *want = malloc((size_t)head_dim * sizeof *want);
    if (!want) abort();
    double worst = 0.0;
    for (int s = 0; s < sequences; s++) {
        const int last = positions[s];
        for (int h = 0; h < heads; h++) {
            const size_t row = (size_t)s * heads + h;
            const int kv = h / group;
            reference(q_ref + row * head_dim, k_before[s] + (size_t)kv * head_dim,
                      v_caches[s] + (size_t)kv * head_dim, kv_dim, last, batch ? last : -1,
                      k_new_ref + (size_t)s * kv_dim + (size_t)kv * head_dim,
                      v_new + (size_t)s * kv_dim + (size_t)kv * head_dim, head_dim, a.scale, want);
            /* the row as the GPU hands it on: the output, or attention_combine's merge */
            double got[256], scale = 0.0;
            if (splits == 1) {
                for (int d = 0; d < head_dim; d++) got[d] = out[row * head_dim + d];
            } else {
                const int count = last / split_len + 1; /* the splits holding its keys */
                double max = -INFINITY, total = 0.0;
                for (int p = 0; p < count; p++)
                    if (part_stats[2 * (row * splits + p)] > max)
                        max = part_stats[2 * (row * splits + p)];
                for (int d = 0; d < head_dim; d++) got[d] = 0.0;
                for (int p = 0; p < count; p++) {
                    const size_t part = row * splits + p;
                    const double w = exp(part_stats[2 * part] - max);
                    total += w * part_stats[2 * part + 1];
                    for (int d = 0; d < head_dim; d++) got[d] += w * part_out[part * head_dim + d];
                }
                for (int d = 0; d < head_dim; d++) got[d] /= total;
            }
            for (int d = 0; d < head_dim; d++)
                if (fabs(want[d]) > scale) scale = fabs(want[d]);
            for (int d = 0; d < head_dim; d++) {
                const double error = fabs(got[d] - want[d]) / (scale + 1e-30);
                if (!(error <= worst)) worst = error;
            }
        }
        if (batch) { /* the new key landed at the position; nothing else changed */
            int stored = 1;
            for (int kv = 0; kv < kv_heads; kv++)
                for (int d = 0; d < head_dim; d++)
                    stored &= k_caches[s][(size_t)last * kv_dim + (size_t)kv * head_dim + d] ==
                                  k_new_ref[(size_t)s * kv_dim + (size_t)kv * head_dim + d] &&
                              v_caches[s][(size_t)last * kv_dim + (size_t)kv * head_dim + d] ==
                                  v_new[(size_t)s * kv_dim + (size_t)kv * head_dim + d];
            memcpy(k_before[s] + (size_t)last * kv_dim, k_caches[s] + (size_t)last * kv_dim,
                   (size_t)kv_dim * sizeof(float));
            CHECK_MSG(stored && memcmp(k_before[s], k_caches[s], cache * sizeof(float)) == 0,
                      "%s: sequence %d's cache is not the old one with the new row at %d", label, s,
                      last);
        }
    }
    printf("%s: worst error %.2g of the row's largest value\n", label, worst);
    CHECK_MSG(worst <= 2e-5, "%s: error %.3g", label, worst);
    for (int s = 0; s < sequences; s++) free(k_caches[s]), free(v_caches[s]), free(k_before[s]);
    free(q), free(out), free(k_new), free(v_new), free(part_out), free(part_stats), free(want);
    free(q_ref), free(k_new_ref), free(table);
}

static void test_one_sequence(void) {
    lq_rng_seed(&rng, 71);
    const int starts[] = {0, 5, 80, 500};
    for (int i = 0; i < 4; i++) check_case(0, 1, &starts[i], 8, 8, 128, 1);
    const int long_start = 2000;
    check_case(0, 1, &long_start, 4, 4, 128, 16); /* 16 splits of 128 keys */
    check_case(0, 1, &starts[3], 8, 4, 8, 3);     /* head_dim 8: 2 chunks for 8 lanes */
}

static void test_shapes(void) {
    lq_rng_seed(&rng, 72);
    const int start = 77;
    const int shapes[][3] = {/* heads, kv_heads, head_dim */
                             {4, 4, 48},  {6, 2, 64},  {8, 4, 64},  {8, 1, 32},
                             {4, 2, 256}, {2, 2, 256}, {16, 4, 128}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        check_case(0, 1, &start, shapes[i][0], shapes[i][1], shapes[i][2], 1);
        check_case(0, 1, &start, shapes[i][0], shapes[i][1], shapes[i][2], 2);
    }
}

static void test_batch(void) {
    lq_rng_seed(&rng, 73);
    const int positions[] = {0, 1, 33, 300, 5};
    check_case(1, 5, positions, 8, 2, 64, 1);
    check_case(1, 5, positions, 8, 2, 64, 4); /* splits past the short sequences' keys */
    check_case(1, 3, positions + 1, 4, 4, 128, 2);
}

/* The step's rotary embedding done by the kernel: head_dim 64, 128 and 256 (M = 2, 4, 8), GQA
 * groups, one split and several, positions in the cos/sin table (< 64) and past it (computed). */
static void test_rope(void) {
    lq_rng_seed(&rng, 74);
    const int positions[] = {0, 1, 33, 300, 63, 64};
    check_case_rope(1, 6, positions, 8, 2, 64, 1, 1);
    check_case_rope(1, 6, positions, 8, 2, 64, 3, 1);
    check_case_rope(1, 3, positions + 2, 4, 4, 128, 2, 1);
    check_case_rope(1, 2, positions + 3, 4, 1, 128, 1, 1);
    check_case_rope(1, 2, positions + 4, 4, 2, 256, 2, 1);
    CHECK(!lq_ad_rope_fits(32) && !lq_ad_rope_fits(48) && !lq_ad_rope_fits(8) &&
          lq_ad_rope_fits(64) && lq_ad_rope_fits(128) && lq_ad_rope_fits(256));
}

/* lq_ad_plan, the launcher's split of the keys, over many shapes: splits of whole steps that
 * fit the scores' shared memory, cover every key, none empty, within the caps; refused only
 * where the caps leave no way. */
static void test_plan(void) {
    const int key_counts[] = {1,    2,    31,    32,    33,    100,    511,   513,
                              4096, 4097, 20000, 65536, 70000, 131072, 600000};
    const int row_counts[] = {1, 2, 4, 8}, wanted[] = {1, 2, 3, 17, 44, 128, 500};
    const int sequence_counts[] = {1, 6, 64, 600, 65535};
    int plans = 0, refused = 0;
    for (size_t k = 0; k < sizeof key_counts / sizeof key_counts[0]; k++)
        for (size_t r = 0; r < 4; r++)
            for (size_t w = 0; w < sizeof wanted / sizeof wanted[0]; w++)
                for (size_t s = 0; s < sizeof sequence_counts / sizeof sequence_counts[0]; s++) {
                    const int keys = key_counts[k], rows = row_counts[r];
                    const int sequences = sequence_counts[s];
                    int splits = -7, len = -7;
                    const int rc = lq_ad_plan(keys, rows, wanted[w], sequences, 128, &splits, &len);
                    /* the fewest splits the shared memory allows */
                    const int longest = LQ_AD_MAX_SCORES / rows / LQ_AD_STEP_KEYS * LQ_AD_STEP_KEYS;
                    const int fewest = (keys + longest - 1) / longest;
                    if (rc) {
                        refused++;
                        CHECK_MSG(fewest > 128 || (long long)sequences * fewest > 65535,
                                  "keys %d rows %d wanted %d sequences %d: refused", keys, rows,
                                  wanted[w], sequences);
                        continue;
                    }
                    plans++;
                    CHECK_MSG(len > 0 && len % LQ_AD_STEP_KEYS == 0 &&
                                  (size_t)rows * len <= LQ_AD_MAX_SCORES &&
                                  (long long)splits * len >= keys &&
                                  (long long)(splits - 1) * len < keys && splits <= 128 &&
                                  (long long)sequences * splits <= 65535 &&
                                  (splits <= wanted[w] || len == longest),
                              "keys %d rows %d wanted %d sequences %d: %d splits of %d", keys, rows,
                              wanted[w], sequences, splits, len);
                }
    printf("%d plans checked, %d refused\n", plans, refused);
    CHECK(plans > 0 && refused > 0);
}

LQ_TEST_MAIN(LQ_TEST(test_one_sequence), LQ_TEST(test_shapes), LQ_TEST(test_batch),
             LQ_TEST(test_rope), LQ_TEST(test_plan))
