/* The CPU backend's sample op (kernels/cpu/sample_cpu.c) against lq_sampler_sample: the same
 * token and the same logprob bits for the same logits and uniform, the logits left as they
 * were, and bad arguments refused. */
#include "core/rng.h"
#include "core/sampler.h"
#include "kernels/backend.h"
#include "tests/unit/lq_test.h"
#include "tests/unit/sample_cases.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static struct lq_sampler *sampler_for(const struct lq_sample_row *row, uint64_t seed, int vocab) {
    struct lq_sampler_params params;
    lq_sampler_params_default(&params);
    params.temperature = row->temperature;
    params.top_k = row->top_k;
    params.top_p = row->top_p;
    params.min_p = row->min_p;
    params.seed = seed;
    struct lq_sampler *sampler = NULL;
    struct lq_error err = {0};
    int rc = lq_sampler_create(&params, vocab, &sampler, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    return sampler;
}

/* Rows of every shape and setting, n rows at a stride past vocab (the padding would win every
 * draw if the op read it): the op's token and logprob equal lq_sampler_sample's, whose
 * generator drew the same uniform the host passes. */
static void test_matches_sampler(void) {
    struct lq_backend *cpu = NULL;
    CHECK_OK(lq_backend_cpu_create(&cpu, &lq_err_));
    struct lq_rng rng;
    lq_rng_seed(&rng, 611);
    static const int vocabs[] = {1, 2, 7, 1000, 32000, 49152};
    static const int counts[] = {1, 3, 8};
    int compared = 0;
    for (size_t v = 0; v < sizeof vocabs / sizeof vocabs[0]; v++) {
        int vocab = vocabs[v], stride = vocab + 5, trials = vocab > 5000 ? 6 : 40;
        for (int trial = 0; trial < trials; trial++) {
            int n = counts[trial % 3];
            float *logits = malloc((size_t)n * stride * sizeof *logits);
            float *before = malloc((size_t)n * stride * sizeof *before);
            float *scratch = malloc((size_t)vocab * sizeof *scratch);
            struct lq_sample_row rows[8];
            struct lq_sampler *drawn[8], *reference[8];
            for (int i = 0; i < n; i++) {
                float *row = logits + (size_t)i * stride;
                sample_case_logits(&rng, row, vocab, (trial + i) % SAMPLE_SHAPES);
                for (int p = vocab; p < stride; p++) row[p] = 1000.0f;
                rows[i] = sample_case_row(&rng, vocab);
                uint64_t seed = lq_rng_next(&rng);
                drawn[i] = sampler_for(&rows[i], seed, vocab);
                reference[i] = sampler_for(&rows[i], seed, vocab);
                rows[i].u = lq_sampler_draw(drawn[i]);
            }
            memcpy(before, logits, (size_t)n * stride * sizeof *logits);
            int tokens[8];
            float logprobs[8];
            CHECK(cpu->ops->sample(cpu, logits, n, vocab, stride, rows, tokens, logprobs) == 0);
            CHECK(memcmp(before, logits, (size_t)n * stride * sizeof *logits) == 0);
            for (int i = 0; i < n; i++) {
                memcpy(scratch, logits + (size_t)i * stride, (size_t)vocab * sizeof *scratch);
                float logprob = 0.0f;
                int token = lq_sampler_sample(reference[i], scratch, NULL, 0, &logprob);
                CHECK_MSG(tokens[i] == token,
                          "vocab %d shape %s T %g k %d p %g min_p %g u %.17g: op %d, sampler %d",
                          vocab, sample_shape_names[(trial + i) % SAMPLE_SHAPES],
                          (double)rows[i].temperature, rows[i].top_k, (double)rows[i].top_p,
                          (double)rows[i].min_p, rows[i].u, tokens[i], token);
                CHECK(memcmp(&logprobs[i], &logprob, sizeof logprob) == 0);
                lq_sampler_free(drawn[i]);
                lq_sampler_free(reference[i]);
                compared++;
            }
            /* without logprobs: the same tokens */
            int again[8];
            CHECK(cpu->ops->sample(cpu, logits, n, vocab, stride, rows, again, NULL) == 0);
            CHECK(memcmp(again, tokens, (size_t)n * sizeof *tokens) == 0);
            free(logits), free(before), free(scratch);
        }
    }
    CHECK(compared > 400);
    cpu->ops->destroy(cpu);
}

/* lq_sampler_sample_with, no params of its own: lq_sampler_sample after a draw, penalty
 * included; the generator is not touched. */
static void test_sample_with(void) {
    struct lq_sampler_params params;
    lq_sampler_params_default(&params);
    params.repetition_penalty = 1.3f;
    params.top_p = 0.9f;
    params.seed = 5;
    struct lq_sampler *a = NULL, *b = NULL;
    CHECK_OK(lq_sampler_create(&params, 300, &a, &lq_err_));
    CHECK_OK(lq_sampler_create(&params, 300, &b, &lq_err_));
    struct lq_rng rng;
    lq_rng_seed(&rng, 77);
    int history[40];
    float x[300], y[300];
    for (int step = 0; step < 200; step++) {
        lq_rng_fill_normal(&rng, x, 300);
        memcpy(y, x, sizeof x);
        for (int i = 0; i < 40; i++) history[i] = (int)(lq_rng_next(&rng) % 300);
        float lx = 0.0f, ly = 0.0f;
        double u = lq_sampler_draw(a);
        int tx = lq_sampler_sample_with(a, NULL, x, history, 40, u, &lx);
        int ty = lq_sampler_sample(b, y, history, 40, &ly);
        CHECK(tx == ty && memcmp(&lx, &ly, sizeof lx) == 0 && memcmp(x, y, sizeof x) == 0);
    }
    /* both generators are at the same place */
    CHECK(lq_sampler_draw(a) == lq_sampler_draw(b));
    /* params override for one call only */
    struct lq_sampler_params greedy = params;
    greedy.temperature = 0.0f;
    float z[300];
    for (int i = 0; i < 300; i++) z[i] = (float)(i % 17);
    CHECK(lq_sampler_sample_with(a, &greedy, z, NULL, 0, 0.99, NULL) == 16);
    CHECK(lq_sampler_get_params(a)->temperature == 1.0f);
    CHECK(lq_sampler_vocab_size(a) == 300);
    CHECK(lq_sampler_sample_with(a, NULL, z, NULL, 0, 1.0, NULL) == LQ_EINVAL);
    greedy.top_p = 0.0f;
    CHECK(lq_sampler_sample_with(a, &greedy, z, NULL, 0, 0.5, NULL) == LQ_EINVAL);
    lq_sampler_free(a);
    lq_sampler_free(b);
}

static void test_invalid(void) {
    struct lq_backend *cpu = NULL;
    CHECK_OK(lq_backend_cpu_create(&cpu, &lq_err_));
    float logits[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    int token = -5;
    struct lq_sample_row ok = {1.0f, 0, 1.0f, 0.0f, 0.5};
    CHECK(cpu->ops->sample(cpu, logits, 1, 8, 8, &ok, &token, NULL) == 0 && token >= 0);
    CHECK(cpu->ops->sample(cpu, logits, 0, 8, 8, &ok, &token, NULL) == LQ_EINVAL);
    CHECK(cpu->ops->sample(cpu, logits, 1, 0, 8, &ok, &token, NULL) == LQ_EINVAL);
    CHECK(cpu->ops->sample(cpu, logits, 1, 8, 7, &ok, &token, NULL) == LQ_EINVAL);
    CHECK(cpu->ops->sample(cpu, NULL, 1, 8, 8, &ok, &token, NULL) == LQ_EINVAL);
    const struct lq_sample_row bad[] = {
        {1.0f, 0, 1.0f, 0.0f, 1.0},  {1.0f, 0, 1.0f, 0.0f, -0.1}, {1.0f, 0, 1.0f, 0.0f, NAN},
        {-1.0f, 0, 1.0f, 0.0f, 0.5}, {NAN, 0, 1.0f, 0.0f, 0.5},   {1.0f, -1, 1.0f, 0.0f, 0.5},
        {1.0f, 0, 0.0f, 0.0f, 0.5},  {1.0f, 0, 1.5f, 0.0f, 0.5},  {1.0f, 0, 1.0f, 2.0f, 0.5},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK_MSG(cpu->ops->sample(cpu, logits, 1, 8, 8, &bad[i], &token, NULL) == LQ_EINVAL,
                  "bad row %zu accepted", i);
    cpu->ops->destroy(cpu);
}

LQ_TEST_MAIN(LQ_TEST(test_matches_sampler), LQ_TEST(test_sample_with), LQ_TEST(test_invalid))
