#include "core/bitpack.h"
#include "core/half.h"
#include "core/nf.h"
#include "core/rng.h"
#include "tests/unit/lq_test.h"

#include <stdint.h>
#include <stdlib.h>

static double relative_error(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)a[i] * a[i];
    }
    return sqrt(num / den);
}

static float *gaussian(size_t n, uint64_t seed) {
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    float *x = malloc(n * sizeof *x);
    lq_rng_fill_normal(&rng, x, n);
    return x;
}

static void test_normal_quantile(void) {
    CHECK_NEAR(lq_normal_quantile(0.5), 0.0, 1e-15);
    CHECK_NEAR(lq_normal_quantile(0.975), 1.959963984540054, 1e-13);
    CHECK_NEAR(lq_normal_quantile(0.025), -1.959963984540054, 1e-13);
    CHECK_NEAR(lq_normal_quantile(0.9677083333333333), 1.8481308, 1e-6);
    CHECK_NEAR(lq_normal_quantile(1e-10), -6.361340902404056, 1e-11);
}

static void check_table(int bits, const double *expected, double tolerance) {
    const float *table = lq_nf_code_table(bits);
    for (int i = 0; i < (1 << bits); i++)
        CHECK_MSG(fabs(table[i] - expected[i]) <= tolerance, "NF%d[%d] = %.9f, expected %.9f", bits,
                  i, table[i], expected[i]);
}

static void test_code_tables(void) {
    /* ../shared/README.md, from the paper's construction */
    static const double nf2[] = {-1, 0, 0.3379151, 1};
    static const double nf3[] = {-1, -0.4786291, -0.2171418, 0, 0.1609301, 0.3379151, 0.5626169, 1};
    check_table(2, nf2, 1e-6);
    check_table(3, nf3, 1e-6);
    /* bitsandbytes' NF4 table (functional.py), to float precision */
    static const double nf4[] = {-1.0,
                                 -0.6961928009986877,
                                 -0.5250730514526367,
                                 -0.39491748809814453,
                                 -0.28444138169288635,
                                 -0.18477343022823334,
                                 -0.09105003625154495,
                                 0.0,
                                 0.07958029955625534,
                                 0.16093020141124725,
                                 0.24611230194568634,
                                 0.33791524171829224,
                                 0.44070982933044434,
                                 0.5626170039176941,
                                 0.7229568362236023,
                                 1.0};
    check_table(4, nf4, 3e-7);
    for (int bits = 2; bits <= 8; bits++) {
        const float *t = lq_nf_code_table(bits);
        int n = 1 << bits, ascending = 1;
        for (int i = 0; i + 1 < n; i++) ascending &= t[i] < t[i + 1];
        CHECK_MSG(ascending, "NF%d ascending", bits);
        CHECK(t[0] == -1.0f && t[n - 1] == 1.0f);
        CHECK(t[(1 << (bits - 1)) - 1] == 0.0f); /* an exact zero */
    }
    CHECK(lq_nf_code_table(1) == NULL && lq_nf_code_table(9) == NULL);
}

static void test_config_parse_and_storage(void) {
    struct lq_nf_config c;
    struct lq_error err = {0};
    CHECK(lq_nf_config_parse("4,8,fp32,64,256", &c, &err) == 0);
    CHECK(c.b0 == 4 && c.b1 == 8 && c.b2 == LQ_SCALE_FP32 && c.B0 == 64 && c.B1 == 256);
    CHECK(lq_nf_config_parse("(3, 2, bf16, 16, 64)", &c, &err) == 0);
    CHECK(c.b0 == 3 && c.b1 == 2 && c.b2 == LQ_SCALE_BF16 && c.B0 == 16 && c.B1 == 64);
    CHECK(lq_nf_config_parse("2,4,16,32,16", &c, &err) == 0 && c.b2 == LQ_SCALE_FP16);
    CHECK(lq_nf_config_parse("5,8,fp32,64,256", &c, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "b0 = 5") != NULL);
    CHECK(lq_nf_config_parse("4,8,fp8,64,256", &c, &err) == LQ_EINVAL);
    CHECK(lq_nf_config_parse("4,8,fp32,64", &c, &err) == LQ_EINVAL);
    CHECK(lq_nf_config_parse("4,8,fp32,0,256", &c, &err) == LQ_EINVAL);
    CHECK(lq_nf_config_parse("4,8,fp32,64,256,1", &c, &err) == LQ_EINVAL);
    char text[64];
    struct lq_nf_config nf4 = LQ_NF_CONFIG_NF4;
    CHECK(strcmp(lq_nf_config_format(&nf4, text, sizeof text), "(4, 8, fp32, 64, 256)") == 0);

    /* Eq. 3: NF4 with double quantization is 4.127 bits/param (4 + 8/64 + 32/16384). */
    CHECK(lq_nf_bits_per_param(&nf4) == 4.126953125);
    struct lq_nf_config nf3 = LQ_NF_CONFIG_NF3;
    CHECK(lq_nf_bits_per_param(&nf3) == 3.126953125);
    CHECK(lq_nf_storage_bits(4096 * 4096, &nf4) == 4096.0 * 4096.0 * 4.126953125);

    struct lq_nf_config grid[LQ_NF_TABLE1_SIZE];
    lq_nf_grid_table1(grid);
    CHECK(grid[0].b0 == 2 && grid[0].b1 == 2 && grid[0].b2 == LQ_SCALE_BF16 && grid[0].B0 == 16 &&
          grid[0].B1 == 16);
    CHECK(lq_nf_bits_per_param(&grid[0]) == 2.1875); /* 2 + 2/16 + 16/256 */
    double lowest = 1e9, highest = 0;
    int distinct = 1;
    for (int i = 0; i < LQ_NF_TABLE1_SIZE; i++) {
        CHECK(lq_nf_config_validate(&grid[i], NULL) == 0);
        double bits = lq_nf_bits_per_param(&grid[i]);
        lowest = bits < lowest ? bits : lowest;
        highest = bits > highest ? bits : highest;
        for (int j = 0; j < i; j++) distinct &= memcmp(&grid[i], &grid[j], sizeof grid[i]) != 0;
    }
    CHECK(distinct);
    CHECK_NEAR(lowest, 2.0 + 2.0 / 64 + 16.0 / (64 * 256), 1e-12);
    CHECK_NEAR(highest, 4.0 + 4.0 / 16 + 32.0 / 256, 1e-12);
}

static void test_round_trip_matches_fused_path(void) {
    struct lq_nf_config grid[LQ_NF_TABLE1_SIZE + 3];
    lq_nf_grid_table1(grid);
    grid[LQ_NF_TABLE1_SIZE] = (struct lq_nf_config){8, 8, LQ_SCALE_FP32, 64, 256};
    grid[LQ_NF_TABLE1_SIZE + 1] = (struct lq_nf_config){8, 3, LQ_SCALE_FP16, 7, 5};
    grid[LQ_NF_TABLE1_SIZE + 2] = (struct lq_nf_config){3, 1, LQ_SCALE_BF16, 1, 3};
    /* stories260K's 172 x 64 leaves a partial group; 7 x 13 a partial block too */
    const size_t shapes[][2] = {{172, 64}, {7, 13}, {64, 64}};
    for (size_t s = 0; s < 3; s++) {
        size_t rows = shapes[s][0], cols = shapes[s][1], n = rows * cols;
        float *a = gaussian(n, 11 + s);
        float *back = malloc(n * sizeof *back), *fused = malloc(n * sizeof *fused);
        int mismatches = 0;
        for (int k = 0; k < LQ_NF_TABLE1_SIZE + 3; k++) {
            struct lq_nf_matrix q;
            struct lq_error err;
            CHECK(lq_nf_quantize(a, rows, cols, &grid[k], &q, &err) == 0);
            lq_nf_dequantize(&q, back);
            CHECK(lq_nf_quantize_dequantize(a, n, &grid[k], fused, &err) == 0);
            mismatches += memcmp(back, fused, n * sizeof *back) != 0;
            size_t blocks = (n + grid[k].B0 - 1) / grid[k].B0;
            /* lq_nf_block_scales (eight codes per word where it can) equals the one-block call,
             * from any first block, across group boundaries */
            float *scales = malloc(blocks * sizeof *scales);
            const size_t starts[] = {0, 1, 3, 7, 8, 9, blocks / 2, blocks - 1};
            for (size_t f = 0; f < sizeof starts / sizeof *starts && scales; f++) {
                size_t start = starts[f] < blocks ? starts[f] : 0;
                lq_nf_block_scales(&q, start, blocks - start, scales);
                for (size_t b = start; b < blocks; b++) {
                    float one = lq_nf_block_scale(&q, b);
                    mismatches += memcmp(&one, &scales[b - start], sizeof one) != 0;
                }
            }
            free(scales);
            CHECK(lq_nf_codes_bytes(&q) == (n * grid[k].b0 + 7) / 8);
            CHECK(lq_nf_scale_codes_bytes(&q) == (blocks * grid[k].b1 + 7) / 8);
            lq_nf_matrix_free(&q);
        }
        CHECK_MSG(mismatches == 0, "%d configurations differ for %zu x %zu", mismatches, rows,
                  cols);
        free(a), free(back), free(fused);
    }
}

static void test_codes_are_nearest(void) {
    size_t rows = 33, cols = 31, n = rows * cols;
    float *a = gaussian(n, 5);
    for (int b0 = 2; b0 <= 8; b0 = b0 == 4 ? 8 : b0 + 1) {
        struct lq_nf_config c = {b0, 4, LQ_SCALE_BF16, 16, 4};
        struct lq_nf_matrix q;
        CHECK(lq_nf_quantize(a, rows, cols, &c, &q, NULL) == 0);
        const float *t = lq_nf_code_table(b0);
        int worse = 0;
        for (size_t block = 0; block * 16 < n; block++) {
            /* the block scale from the stored fields: ŝ = offset + code * group scale / 15 */
            size_t group = block / 4;
            uint16_t bf16 =
                (uint16_t)(q.group_scales[2 * group] | q.group_scales[2 * group + 1] << 8);
            float group_scale = lq_bf16_to_float(bf16);
            float scale = q.scale_offset +
                          (float)lq_bitpack_get(q.scale_codes, block, 4) * group_scale / 15.0f;
            size_t end = (block + 1) * 16 < n ? (block + 1) * 16 : n;
            for (size_t i = block * 16; i < end; i++) {
                /* the chosen code is at least as near as any other one */
                double v = a[i] / scale;
                double chosen = fabs(t[lq_bitpack_get(q.codes, i, b0)] - v);
                for (int j = 0; j < (1 << b0); j++)
                    if (fabs(t[j] - v) < chosen - 1e-6) worse++;
            }
        }
        CHECK_MSG(worse == 0, "b0 = %d: %d values have a nearer code", b0, worse);
        lq_nf_matrix_free(&q);
    }
    free(a);
}

static void test_ties_take_lower_code_and_saturation(void) {
    /* Every block has absmax exactly 1: offset 1, range 0, so ŝ = 1 exactly. */
    const int b0 = 3;
    const float *t = lq_nf_code_table(b0);
    float a[16];
    for (int i = 0; i < 7; i++) a[i] = (t[i] + t[i + 1]) * 0.5f; /* exactly on each midpoint */
    a[7] = 1.0f;
    for (int i = 8; i < 16; i++) a[i] = i % 2 ? 1.0f : -1.0f;
    struct lq_nf_config c = {b0, 8, LQ_SCALE_FP32, 8, 2};
    struct lq_nf_matrix q;
    CHECK(lq_nf_quantize(a, 2, 8, &c, &q, NULL) == 0);
    float back[16];
    lq_nf_dequantize(&q, back);
    for (int i = 0; i < 7; i++)
        CHECK_MSG(back[i] == t[i], "midpoint %d -> %g, expected %g", i, back[i], t[i]);
    lq_nf_matrix_free(&q);

    /* Block scales that do not fall on the b1 grid are rounded: ŝ < absmax for some block
     * and its largest value saturates to the top code. */
    float b[8] = {1.0f, 0.5f, 0.25f, 0.0f, 0.63f, -0.1f, 0.2f, 0.3f};
    struct lq_nf_config coarse = {b0, 1, LQ_SCALE_FP32, 4, 2};
    CHECK(lq_nf_quantize_dequantize(b, 8, &coarse, back, NULL) == 0);
    /* absmaxes 1 and 0.63: offset 0.63, range 0.37 -> codes 1 and 0: ŝ = 1 and 0.63 */
    CHECK_NEAR(back[4], 0.63f, 1e-7); /* top code of the second block */
    CHECK_NEAR(back[0], 1.0f, 0);
}

static void test_error_falls_with_bits(void) {
    size_t n = 256 * 256;
    float *a = gaussian(n, 3), *back = malloc(n * sizeof *back);
    double previous = 1e9;
    const int widths[] = {2, 3, 4, 8};
    for (int k = 0; k < 4; k++) {
        struct lq_nf_config c = {widths[k], 8, LQ_SCALE_FP32, 64, 256};
        CHECK(lq_nf_quantize_dequantize(a, n, &c, back, NULL) == 0);
        double e = relative_error(a, back, n);
        CHECK_MSG(e < previous * 0.75, "b0 = %d: error %g not below %g", widths[k], e, previous);
        previous = e;
    }
    CHECK(previous < 0.01); /* NF8 */
    /* NF4 on Gaussian data, blocks of 64: about 0.1 relative error (the well-known figure) */
    struct lq_nf_config nf4 = LQ_NF_CONFIG_NF4;
    CHECK(lq_nf_quantize_dequantize(a, n, &nf4, back, NULL) == 0);
    double e4 = relative_error(a, back, n);
    CHECK_MSG(e4 > 0.08 && e4 < 0.12, "NF4 error %g", e4);
    free(a), free(back);
}

static void test_degenerate_inputs(void) {
    float zeros[100] = {0}, back[100];
    struct lq_nf_config c = {4, 4, LQ_SCALE_FP16, 16, 4};
    CHECK(lq_nf_quantize_dequantize(zeros, 100, &c, back, NULL) == 0);
    int all_zero = 1;
    for (int i = 0; i < 100; i++) all_zero &= back[i] == 0.0f;
    CHECK(all_zero);

    float constant[64];
    for (int i = 0; i < 64; i++) constant[i] = (i % 2 ? -3.0f : 3.0f);
    struct lq_nf_matrix q;
    CHECK(lq_nf_quantize(constant, 8, 8, &c, &q, NULL) == 0); /* range 0 in every group */
    lq_nf_dequantize(&q, back);
    for (int i = 0; i < 64; i++) CHECK(back[i] == constant[i]);
    lq_nf_matrix_free(&q);

    float bad[32] = {0};
    bad[17] = NAN;
    struct lq_error err = {0};
    CHECK(lq_nf_quantize(bad, 4, 8, &c, &q, &err) == LQ_ENUMERIC);
    CHECK(strstr(err.message, "value 17") != NULL);
    bad[17] = 1e6f; /* a group scale of 1e6 does not fit fp16 */
    CHECK(lq_nf_quantize_dequantize(bad, 32, &c, back, &err) == LQ_ENUMERIC);
    CHECK(strstr(err.message, "fp16") != NULL);
    c.b2 = LQ_SCALE_BF16;
    CHECK(lq_nf_quantize_dequantize(bad, 32, &c, back, &err) == 0);
    CHECK(lq_nf_quantize(bad, 0, 8, &c, &q, &err) == LQ_EINVAL);
}

static void test_packed_size_matches_eq3(void) {
    size_t rows = 256, cols = 256;
    float *a = gaussian(rows * cols, 9);
    struct lq_nf_config nf4 = LQ_NF_CONFIG_NF4;
    struct lq_nf_matrix q;
    CHECK(lq_nf_quantize(a, rows, cols, &nf4, &q, NULL) == 0);
    /* Eq. 3 counts codes, block-scale codes and group scales; the per-matrix offset is extra */
    CHECK((double)lq_nf_matrix_bytes(&q) * 8 == lq_nf_storage_bits(rows * cols, &nf4) + 32);
    lq_nf_matrix_free(&q);
    free(a);
}

static void test_same_result_for_any_thread_count(void) {
    size_t n = 700 * 300;
    float *a = gaussian(n, 21), *one = malloc(n * sizeof(float)), *many = malloc(n * sizeof(float));
    struct lq_nf_config c = {3, 4, LQ_SCALE_FP16, 16, 64};
    setenv("LQ_THREADS", "1", 1);
    CHECK(lq_nf_quantize_dequantize(a, n, &c, one, NULL) == 0);
    a[123457] = NAN;
    struct lq_error err1 = {0}, err2 = {0};
    CHECK(lq_nf_quantize_dequantize(a, n, &c, one + 0, &err1) == LQ_ENUMERIC);
    setenv("LQ_THREADS", "5", 1);
    CHECK(lq_nf_quantize_dequantize(a, n, &c, many, &err2) == LQ_ENUMERIC);
    CHECK(strcmp(err1.message, err2.message) == 0); /* the first bad value, whatever the split */
    a[123457] = 0.5f;
    setenv("LQ_THREADS", "1", 1);
    CHECK(lq_nf_quantize_dequantize(a, n, &c, one, NULL) == 0);
    setenv("LQ_THREADS", "5", 1);
    CHECK(lq_nf_quantize_dequantize(a, n, &c, many, NULL) == 0);
    CHECK(memcmp(one, many, n * sizeof(float)) == 0);
    unsetenv("LQ_THREADS");
    free(a), free(one), free(many);
}

LQ_TEST_MAIN(LQ_TEST(test_same_result_for_any_thread_count), LQ_TEST(test_normal_quantile),
             LQ_TEST(test_code_tables), LQ_TEST(test_config_parse_and_storage),
             LQ_TEST(test_round_trip_matches_fused_path), LQ_TEST(test_codes_are_nearest),
             LQ_TEST(test_ties_take_lower_code_and_saturation), LQ_TEST(test_error_falls_with_bits),
             LQ_TEST(test_degenerate_inputs), LQ_TEST(test_packed_size_matches_eq3))
