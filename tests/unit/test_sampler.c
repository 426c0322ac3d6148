#include "core/rng.h"
#include "core/sampler.h"
#include "tests/unit/lq_test.h"

#include <stdint.h>
#include <stdlib.h>

static struct lq_sampler *make_sampler(float temperature, int top_k, float top_p, float min_p,
                                       float penalty, int window, uint64_t seed, int vocab) {
    struct lq_sampler_params params;
    lq_sampler_params_default(&params);
    params.temperature = temperature;
    params.top_k = top_k;
    params.top_p = top_p;
    params.min_p = min_p;
    params.repetition_penalty = penalty;
    params.repetition_window = window;
    params.seed = seed;
    struct lq_sampler *sampler = NULL;
    struct lq_error err = {0};
    int rc = lq_sampler_create(&params, vocab, &sampler, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    return sampler;
}

/* Draws `draws` tokens from fresh copies of logits[vocab] and counts them in counts[vocab]. */
static void histogram(struct lq_sampler *sampler, const float *logits, int vocab, int draws,
                      const int *history, size_t count, int *counts) {
    float *scratch = malloc((size_t)vocab * sizeof *scratch);
    memset(counts, 0, (size_t)vocab * sizeof *counts);
    for (int d = 0; d < draws; d++) {
        memcpy(scratch, logits, (size_t)vocab * sizeof *scratch);
        int token = lq_sampler_sample(sampler, scratch, history, count, NULL);
        CHECK(token >= 0 && token < vocab);
        if (token >= 0 && token < vocab) counts[token]++;
    }
    free(scratch);
}

/* Support of `draws` samples as a bit mask (vocab <= 32). */
static unsigned support(struct lq_sampler *sampler, const float *logits, int vocab, int draws) {
    int counts[32];
    histogram(sampler, logits, vocab, draws, NULL, 0, counts);
    unsigned mask = 0;
    for (int i = 0; i < vocab; i++)
        if (counts[i]) mask |= 1u << i;
    return mask;
}

static unsigned support_with(float temperature, int top_k, float top_p, float min_p,
                             const float *logits, int vocab) {
    struct lq_sampler *sampler =
        make_sampler(temperature, top_k, top_p, min_p, 1.0f, 0, 1234, vocab);
    unsigned mask = support(sampler, logits, vocab, 4000);
    lq_sampler_free(sampler);
    return mask;
}

/* log-softmax in double: the reference for logprob. */
static double log_softmax(const float *logits, int vocab, int token) {
    double max = -INFINITY;
    for (int i = 0; i < vocab; i++)
        if (isfinite(logits[i]) && logits[i] > max) max = logits[i];
    double sum = 0.0;
    for (int i = 0; i < vocab; i++)
        if (isfinite(logits[i])) sum += exp((double)logits[i] - max);
    return (double)logits[token] - max - log(sum);
}

/* Pearson chi-square of counts against probabilities p (sum 1) over n draws. */
static double chi_square(const int *counts, const double *p, int bins, int draws) {
    double chi = 0.0;
    for (int i = 0; i < bins; i++) {
        double expected = p[i] * draws;
        chi += (counts[i] - expected) * (counts[i] - expected) / expected;
    }
    return chi;
}

static void test_defaults_and_validation(void) {
    struct lq_sampler_params params;
    lq_sampler_params_default(&params);
    CHECK(params.temperature == 1.0f && params.top_k == 0 && params.top_p == 1.0f);
    CHECK(params.min_p == 0.0f && params.repetition_penalty == 1.0f);
    CHECK(params.repetition_window == 0 && params.seed == 0);
    CHECK_OK(lq_sampler_params_validate(&params, NULL));

    /* Each bad value must fail with LQ_EINVAL and name its parameter. */
    const float bad_temperature[] = {-0.1f, NAN, INFINITY};
    const float bad_top_p[] = {0.0f, -0.5f, 1.0001f, NAN};
    const float bad_min_p[] = {-0.01f, 1.01f, NAN};
    const float bad_penalty[] = {0.0f, -1.0f, NAN, INFINITY};
    struct lq_error err;
    for (size_t i = 0; i < sizeof bad_temperature / sizeof *bad_temperature; i++) {
        lq_sampler_params_default(&params);
        params.temperature = bad_temperature[i];
        CHECK(lq_sampler_params_validate(&params, &err) == LQ_EINVAL);
        CHECK_MSG(strstr(err.message, "temperature") != NULL, "%s", err.message);
    }
    for (size_t i = 0; i < sizeof bad_top_p / sizeof *bad_top_p; i++) {
        lq_sampler_params_default(&params);
        params.top_p = bad_top_p[i];
        CHECK(lq_sampler_params_validate(&params, &err) == LQ_EINVAL);
        CHECK_MSG(strstr(err.message, "top_p") != NULL, "%s", err.message);
    }
    for (size_t i = 0; i < sizeof bad_min_p / sizeof *bad_min_p; i++) {
        lq_sampler_params_default(&params);
        params.min_p = bad_min_p[i];
        CHECK(lq_sampler_params_validate(&params, &err) == LQ_EINVAL);
        CHECK_MSG(strstr(err.message, "min_p") != NULL, "%s", err.message);
    }
    for (size_t i = 0; i < sizeof bad_penalty / sizeof *bad_penalty; i++) {
        lq_sampler_params_default(&params);
        params.repetition_penalty = bad_penalty[i];
        CHECK(lq_sampler_params_validate(&params, &err) == LQ_EINVAL);
        CHECK_MSG(strstr(err.message, "repetition_penalty") != NULL, "%s", err.message);
    }
    lq_sampler_params_default(&params);
    params.top_k = -1;
    CHECK(lq_sampler_params_validate(&params, &err) == LQ_EINVAL);
    CHECK_MSG(strstr(err.message, "top_k") != NULL, "%s", err.message);
    lq_sampler_params_default(&params);
    params.repetition_window = -3;
    CHECK(lq_sampler_params_validate(&params, &err) == LQ_EINVAL);
    CHECK_MSG(strstr(err.message, "repetition_window") != NULL, "%s", err.message);
    CHECK(lq_sampler_params_validate(NULL, &err) == LQ_EINVAL);

    /* Range ends that are allowed. */
    lq_sampler_params_default(&params);
    params.temperature = 0.0f;
    params.top_p = 1.0f;
    params.min_p = 1.0f;
    params.repetition_penalty = 0.5f;
    params.top_k = 1000000;
    CHECK_OK(lq_sampler_params_validate(&params, NULL));

    /* create validates too and leaves *out NULL on failure. */
    struct lq_sampler *sampler = (struct lq_sampler *)&params;
    params.top_p = 2.0f;
    CHECK(lq_sampler_create(&params, 10, &sampler, &err) == LQ_EINVAL);
    CHECK(sampler == NULL);
    lq_sampler_params_default(&params);
    CHECK(lq_sampler_create(&params, 0, &sampler, &err) == LQ_EINVAL);
    CHECK_MSG(strstr(err.message, "vocab_size") != NULL, "%s", err.message);
    CHECK(lq_sampler_create(&params, 10, NULL, &err) == LQ_EINVAL);
    lq_sampler_free(NULL);

    /* Bad arguments to sample. */
    CHECK_OK(lq_sampler_create(&params, 4, &sampler, NULL));
    float logits[4] = {0, 1, 2, 3};
    CHECK(lq_sampler_sample(sampler, NULL, NULL, 0, NULL) == LQ_EINVAL);
    CHECK(lq_sampler_sample(NULL, logits, NULL, 0, NULL) == LQ_EINVAL);
    CHECK(lq_sampler_sample(sampler, logits, NULL, 2, NULL) == LQ_EINVAL);
    lq_sampler_free(sampler);
}

static void test_greedy(void) {
    struct lq_sampler *sampler = make_sampler(0.0f, 0, 1.0f, 0.0f, 1.0f, 0, 7, 6);
    float logits[6] = {0.1f, 2.5f, -1.0f, 2.4f, 0.0f, 1.0f};
    float copy[6];
    for (int trial = 0; trial < 50; trial++) {
        memcpy(copy, logits, sizeof copy);
        CHECK(lq_sampler_sample(sampler, copy, NULL, 0, NULL) == 1);
    }
    /* Ties take the lowest id. */
    float ties[6] = {0.0f, 3.0f, 1.0f, 3.0f, 3.0f, -2.0f};
    memcpy(copy, ties, sizeof copy);
    CHECK(lq_sampler_sample(sampler, copy, NULL, 0, NULL) == 1);
    float all_equal[6] = {0};
    CHECK(lq_sampler_sample(sampler, all_equal, NULL, 0, NULL) == 0);
    /* logprob is still the log-softmax. */
    float logprob = 0.0f;
    memcpy(copy, logits, sizeof copy);
    CHECK(lq_sampler_sample(sampler, copy, NULL, 0, &logprob) == 1);
    CHECK_NEAR(logprob, log_softmax(logits, 6, 1), 1e-6);
    lq_sampler_free(sampler);
}

/* Frequencies of temperature sampling match softmax(logits / T). */
static void test_temperature_frequencies(void) {
    const float logits[5] = {1.0f, 0.5f, 0.0f, -0.5f, -1.5f};
    const float temperatures[] = {1.0f, 0.8f, 2.0f};
    const int draws = 20000;
    for (size_t t = 0; t < sizeof temperatures / sizeof *temperatures; t++) {
        double p[5], sum = 0.0;
        for (int i = 0; i < 5; i++) sum += p[i] = exp(logits[i] / temperatures[t]);
        for (int i = 0; i < 5; i++) p[i] /= sum;
        struct lq_sampler *sampler =
            make_sampler(temperatures[t], 0, 1.0f, 0.0f, 1.0f, 0, 42 + t, 5);
        int counts[5];
        histogram(sampler, logits, 5, draws, NULL, 0, counts);
        /* 4 degrees of freedom: P(chi2 > 18.47) = 0.001 for a correct sampler. */
        double chi = chi_square(counts, p, 5, draws);
        CHECK_MSG(chi < 18.47, "T = %g: chi-square %.2f; counts %d %d %d %d %d",
                  (double)temperatures[t], chi, counts[0], counts[1], counts[2], counts[3],
                  counts[4]);
        lq_sampler_free(sampler);
    }
}

/* The draw is inverse CDF with one uniform per call: on two equal logits the token is
 * u < 1/2 ? 0 : 1 for the generator's own stream. Calls that need no draw (every logit NaN)
 * still consume their uniform, so the stream stays in step with the token count. */
static void test_one_uniform_per_call(void) {
    const uint64_t seed = 99;
    struct lq_sampler *sampler = make_sampler(1.0f, 0, 1.0f, 0.0f, 1.0f, 0, seed, 2);
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    for (int i = 0; i < 1000; i++) {
        int expected = lq_rng_uniform(&rng) < 0.5 ? 0 : 1;
        if (i % 7 == 3) {
            float none[2] = {NAN, NAN};
            CHECK(lq_sampler_sample(sampler, none, NULL, 0, NULL) == 0);
            continue;
        }
        float logits[2] = {0.25f, 0.25f};
        CHECK(lq_sampler_sample(sampler, logits, NULL, 0, NULL) == expected);
    }
    lq_sampler_free(sampler);
}

static void test_top_k(void) {
    struct lq_rng rng;
    lq_rng_seed(&rng, 5);
    /* top-k = 1 is greedy, whatever the temperature. */
    enum { VOCAB = 1000 };
    float *logits = malloc(VOCAB * sizeof *logits);
    struct lq_sampler *top1 = make_sampler(1.5f, 1, 1.0f, 0.0f, 1.0f, 0, 3, VOCAB);
    struct lq_sampler *greedy = make_sampler(0.0f, 0, 1.0f, 0.0f, 1.0f, 0, 3, VOCAB);
    for (int trial = 0; trial < 100; trial++) {
        lq_rng_fill_normal(&rng, logits, VOCAB);
        if (trial % 2) logits[trial] = logits[trial + 500] = 10.0f; /* a tie: lowest id wins */
        float a[VOCAB], b[VOCAB];
        memcpy(a, logits, sizeof a);
        memcpy(b, logits, sizeof b);
        int t1 = lq_sampler_sample(top1, a, NULL, 0, NULL);
        CHECK(t1 == lq_sampler_sample(greedy, b, NULL, 0, NULL));
        if (trial % 2) CHECK(t1 == trial);
    }
    lq_sampler_free(top1);
    lq_sampler_free(greedy);
    free(logits);

    /* top-k = 3 keeps the three largest, with probabilities renormalised among them. */
    const float small[8] = {0.0f, 2.0f, -1.0f, 1.5f, 1.9f, 0.3f, -3.0f, 1.0f};
    struct lq_sampler *top3 = make_sampler(1.0f, 3, 1.0f, 0.0f, 1.0f, 0, 11, 8);
    int counts[8];
    const int draws = 20000;
    histogram(top3, small, 8, draws, NULL, 0, counts);
    CHECK(counts[0] == 0 && counts[2] == 0 && counts[5] == 0 && counts[6] == 0 && counts[7] == 0);
    int kept[3] = {1, 4, 3};
    double p[3], sum = 0.0;
    int kept_counts[3];
    for (int i = 0; i < 3; i++) sum += p[i] = exp(small[kept[i]]);
    for (int i = 0; i < 3; i++) {
        p[i] /= sum;
        kept_counts[i] = counts[kept[i]];
    }
    double chi = chi_square(kept_counts, p, 3, draws);
    CHECK_MSG(chi < 13.82, "chi-square %.2f (2 degrees of freedom, P = 0.001 at 13.82)", chi);
    lq_sampler_free(top3);
    /* top-k larger than the vocabulary is off. */
    CHECK(support_with(1.0f, 100, 1.0f, 0.0f, small, 8) == 0xffu);
}

static void test_top_p(void) {
    /* Four equal logits: probabilities and cumulative sums 1/4, 1/2, 3/4, 1 are exact, so the
     * boundary is exact: cumulative >= p keeps the prefix that reaches p and no more. */
    const float equal[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    CHECK(support_with(1.0f, 0, 0.25f, 0.0f, equal, 4) == 0x1u);
    CHECK(support_with(1.0f, 0, 0.5f, 0.0f, equal, 4) == 0x3u);
    CHECK(support_with(1.0f, 0, 0.50001f, 0.0f, equal, 4) == 0x7u);
    CHECK(support_with(1.0f, 0, 0.75f, 0.0f, equal, 4) == 0x7u);
    CHECK(support_with(1.0f, 0, 0.75001f, 0.0f, equal, 4) == 0xfu);
    CHECK(support_with(1.0f, 0, 1.0f, 0.0f, equal, 4) == 0xfu);
    /* Always at least one token. */
    CHECK(support_with(1.0f, 0, 1e-6f, 0.0f, equal, 4) == 0x1u);
    /* The same exact boundary after top-k: 4 of 5 equal logits, cumulative 1/4, 1/2, ... */
    const float equal5[5] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    CHECK(support_with(1.0f, 4, 0.5f, 0.0f, equal5, 5) == 0x3u);
    CHECK(support_with(1.0f, 4, 0.50001f, 0.0f, equal5, 5) == 0x7u);

    /* Probabilities 0.5, 0.3, 0.15, 0.05 (ids shuffled): cumulative 0.5, 0.8, 0.95, 1. */
    const float logits[4] = {logf(0.15f), logf(0.5f), logf(0.05f), logf(0.3f)};
    CHECK(support_with(1.0f, 0, 0.45f, 0.0f, logits, 4) == 0x2u);
    CHECK(support_with(1.0f, 0, 0.7f, 0.0f, logits, 4) == 0xau);
    CHECK(support_with(1.0f, 0, 0.9f, 0.0f, logits, 4) == 0xbu);
    CHECK(support_with(1.0f, 0, 0.97f, 0.0f, logits, 4) == 0xfu);
    /* top-p sees the distribution renormalised after top-k: with k = 2 the first token has
     * 0.5 / 0.8 = 0.625 >= 0.6, without top-k it has 0.5 < 0.6. */
    CHECK(support_with(1.0f, 2, 0.6f, 0.0f, logits, 4) == 0x2u);
    CHECK(support_with(1.0f, 0, 0.6f, 0.0f, logits, 4) == 0xau);
    /* ... and the tempered one: at T = 0.5 the probabilities are (0.25, 0.09, 0.0225, 0.0025) /
     * 0.365, so the first token alone has 0.685 >= 0.65; at T = 1 it has 0.5 < 0.65. */
    CHECK(support_with(0.5f, 0, 0.65f, 0.0f, logits, 4) == 0x2u);
    CHECK(support_with(1.0f, 0, 0.65f, 0.0f, logits, 4) == 0xau);

    /* Frequencies inside the nucleus are renormalised: p = 0.9 keeps 0.5, 0.3, 0.15. */
    struct lq_sampler *sampler = make_sampler(1.0f, 0, 0.9f, 0.0f, 1.0f, 0, 77, 4);
    int counts[4];
    const int draws = 20000;
    histogram(sampler, logits, 4, draws, NULL, 0, counts);
    CHECK(counts[2] == 0);
    int nucleus_counts[3] = {counts[1], counts[3], counts[0]};
    const double p[3] = {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95};
    double chi = chi_square(nucleus_counts, p, 3, draws);
    CHECK_MSG(chi < 13.82, "chi-square %.2f (2 degrees of freedom, P = 0.001 at 13.82)", chi);
    lq_sampler_free(sampler);
}

static void test_min_p(void) {
    /* Probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.2 drops below 0.1, min_p 0.5 below 0.25. */
    const float logits[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    CHECK(support_with(1.0f, 0, 1.0f, 0.2f, logits, 4) == 0x7u);
    CHECK(support_with(1.0f, 0, 1.0f, 0.5f, logits, 4) == 0x3u);
    CHECK(support_with(1.0f, 0, 1.0f, 1.0f, logits, 4) == 0x1u);
    /* At T = 2 the ratios are square roots: 0.05 / 0.5 -> 0.316 >= 0.2, so all four stay. */
    CHECK(support_with(2.0f, 0, 1.0f, 0.2f, logits, 4) == 0xfu);
    /* min_p = 1 keeps exactly the tokens tied with the max. */
    const float tied[4] = {1.0f, 0.0f, 1.0f, 0.5f};
    CHECK(support_with(1.0f, 0, 1.0f, 1.0f, tied, 4) == 0x5u);
    CHECK(support_with(1.0f, 3, 1.0f, 1.0f, tied, 4) == 0x5u); /* through the top-k path */
    /* The boundary at float resolution: min_p = 0x1.78b564p-2 is the float just above e^-1, so
     * a logit exactly 1 below the max has ratio e^-1 < min_p and goes; log(min_p) in double
     * (-0.999999975) rounds to -1.0f, so the threshold must round up, not to nearest. The float
     * just below e^-1 keeps it. */
    const float one_below[3] = {0.0f, -1.0f, -5.0f};
    const float above_e = 0x1.78b564p-2f, below_e = 0x1.78b562p-2f;
    CHECK(support_with(1.0f, 0, 1.0f, above_e, one_below, 3) == 0x1u);
    CHECK(support_with(1.0f, 0, 1.0f, below_e, one_below, 3) == 0x3u);
    CHECK(support_with(1.0f, 2, 1.0f, above_e, one_below, 3) == 0x1u);
    CHECK(support_with(1.0f, 2, 1.0f, below_e, one_below, 3) == 0x3u);
    /* Combined with top-k and top-p: the intersection of the three prefixes. */
    CHECK(support_with(1.0f, 3, 0.97f, 0.5f, logits, 4) == 0x3u);
    CHECK(support_with(1.0f, 3, 0.6f, 0.2f, logits, 4) == 0x3u);
}

static void test_repetition_penalty(void) {
    struct lq_sampler *sampler = make_sampler(0.0f, 0, 1.0f, 0.0f, 1.5f, 0, 1, 4);
    /* Positive logit divided: 2.0 / 1.5 = 1.33 < 1.9, so token 1 wins. */
    float logits[4] = {2.0f, 1.9f, -1.0f, -1.2f};
    int history[3] = {0, 0, 0};
    float copy[4];
    memcpy(copy, logits, sizeof copy);
    CHECK(lq_sampler_sample(sampler, copy, history, 1, NULL) == 1);
    CHECK(copy[0] == 2.0f / 1.5f && copy[1] == 1.9f);
    /* A distinct token is penalised once, however often it appears. */
    memcpy(copy, logits, sizeof copy);
    CHECK(lq_sampler_sample(sampler, copy, history, 3, NULL) == 1);
    CHECK(copy[0] == 2.0f / 1.5f);
    /* Negative logit multiplied: -1.0 * 1.5 = -1.5 < -1.2. */
    float negative[4] = {-5.0f, -6.0f, -1.0f, -1.2f};
    int seen_two[1] = {2};
    CHECK(lq_sampler_sample(sampler, negative, seen_two, 1, NULL) == 3);
    CHECK(negative[2] == -1.5f);
    /* The window counts only the last tokens: {0, 3} with window 1 penalises only 3. */
    lq_sampler_free(sampler);
    sampler = make_sampler(0.0f, 0, 1.0f, 0.0f, 1.5f, 1, 1, 4);
    int old_and_new[2] = {0, 3};
    memcpy(copy, logits, sizeof copy);
    CHECK(lq_sampler_sample(sampler, copy, old_and_new, 2, NULL) == 0);
    CHECK(copy[0] == 2.0f && copy[3] == -1.2f * 1.5f);
    lq_sampler_free(sampler);
    /* Out-of-range ids in the history are ignored; a penalty < 1 rewards. */
    sampler = make_sampler(0.0f, 0, 1.0f, 0.0f, 0.5f, 0, 1, 4);
    int odd[3] = {-1, 4, 1};
    memcpy(copy, logits, sizeof copy);
    float logprob = 0.0f;
    CHECK(lq_sampler_sample(sampler, copy, odd, 3, &logprob) == 1); /* 1.9 / 0.5 = 3.8 */
    /* logprob is under the logits as given, before the penalty. */
    CHECK_NEAR(logprob, log_softmax(logits, 4, 1), 1e-6);
    /* The marks are cleared between calls: no history, no penalty. */
    memcpy(copy, logits, sizeof copy);
    CHECK(lq_sampler_sample(sampler, copy, NULL, 0, NULL) == 0);
    CHECK(memcmp(copy, logits, sizeof copy) == 0);
    lq_sampler_free(sampler);
}

static void test_seed_determinism(void) {
    enum { VOCAB = 2000, STEPS = 300 };
    int tokens[3][STEPS];
    const uint64_t seeds[3] = {1234, 1234, 1235};
    for (int run = 0; run < 3; run++) {
        struct lq_sampler *sampler =
            make_sampler(0.9f, 0, 0.95f, 0.0f, 1.2f, 64, seeds[run], VOCAB);
        struct lq_rng logits_rng; /* the same logits sequence in every run */
        lq_rng_seed(&logits_rng, 8);
        float logits[VOCAB];
        for (int step = 0; step < STEPS; step++) {
            lq_rng_fill_normal(&logits_rng, logits, VOCAB);
            for (int i = 0; i < VOCAB; i++) logits[i] *= 2.0f;
            tokens[run][step] = lq_sampler_sample(sampler, logits, tokens[run], (size_t)step, NULL);
        }
        lq_sampler_free(sampler);
    }
    int same = 0, differ = 0;
    for (int step = 0; step < STEPS; step++) {
        same += tokens[0][step] == tokens[1][step];
        differ += tokens[0][step] != tokens[2][step];
    }
    CHECK(same == STEPS);
    CHECK_MSG(differ > STEPS / 2, "only %d of %d tokens differ between seeds", differ, STEPS);
}

static void test_nonfinite_logits(void) {
    /* NaN and +inf count as -inf: only ids 1 and 3 can come out. */
    const float logits[5] = {NAN, 1.0f, INFINITY, 0.5f, -INFINITY};
    struct lq_sampler *sampler = make_sampler(1.0f, 0, 1.0f, 0.0f, 1.0f, 0, 3, 5);
    int counts[5];
    histogram(sampler, logits, 5, 4000, NULL, 0, counts);
    CHECK(counts[0] == 0 && counts[2] == 0 && counts[4] == 0);
    CHECK(counts[1] > 0 && counts[3] > 0);
    float copy[5];
    memcpy(copy, logits, sizeof copy);
    float logprob = 0.0f;
    int token = lq_sampler_sample(sampler, copy, NULL, 0, &logprob);
    CHECK(copy[0] == -INFINITY && copy[2] == -INFINITY); /* replaced in place */
    CHECK_NEAR(logprob, log_softmax(logits, 5, token), 1e-6);
    /* Every logit non-finite: the lowest id, with logprob -inf. */
    float none[5] = {NAN, -INFINITY, INFINITY, NAN, -INFINITY};
    CHECK(lq_sampler_sample(sampler, none, NULL, 0, &logprob) == 0);
    CHECK(logprob == -INFINITY);
    lq_sampler_free(sampler);
    /* Greedy and top-k skip them too. */
    struct lq_sampler *greedy = make_sampler(0.0f, 0, 1.0f, 0.0f, 1.0f, 0, 3, 5);
    memcpy(copy, logits, sizeof copy);
    CHECK(lq_sampler_sample(greedy, copy, NULL, 0, NULL) == 1);
    lq_sampler_free(greedy);
    CHECK(support_with(1.0f, 3, 1.0f, 0.0f, logits, 5) == 0xau);
    /* A penalty on a NaN logit leaves it NaN, hence -inf. */
    struct lq_sampler *penalised = make_sampler(0.0f, 0, 1.0f, 0.0f, 2.0f, 0, 3, 5);
    int history[1] = {0};
    memcpy(copy, logits, sizeof copy);
    CHECK(lq_sampler_sample(penalised, copy, history, 1, &logprob) == 1);
    lq_sampler_free(penalised);
}

/* logprob is the log-softmax of the raw logits, whatever penalty, temperature and filters did,
 * on every path: greedy, top-k, buckets with and without reuse of the T = 1 sum, penalised. */
static void test_logprob(void) {
    enum { VOCAB = 3000, STEPS = 60 };
    struct config {
        float temperature;
        int top_k;
        float top_p, min_p, penalty;
    } configs[] = {
        {0.6f, 50, 0.9f, 0.02f, 1.3f}, {0.6f, 0, 0.9f, 0.0f, 1.0f},  {1.0f, 0, 1.0f, 0.0f, 1.0f},
        {1.0f, 0, 0.8f, 0.1f, 1.0f},   {1.0f, 40, 1.0f, 0.0f, 1.0f}, {0.0f, 0, 1.0f, 0.0f, 1.0f},
        {2.0f, 0, 1.0f, 0.0f, 1.2f},
    };
    struct lq_rng rng;
    lq_rng_seed(&rng, 17);
    static float logits[VOCAB], copy[VOCAB];
    for (size_t ci = 0; ci < sizeof configs / sizeof *configs; ci++) {
        const struct config *cf = &configs[ci];
        struct lq_sampler *sampler = make_sampler(cf->temperature, cf->top_k, cf->top_p, cf->min_p,
                                                  cf->penalty, 0, 9, VOCAB);
        int history[STEPS];
        for (int step = 0; step < STEPS; step++) {
            lq_rng_fill_normal(&rng, logits, VOCAB);
            for (int i = 0; i < VOCAB; i++) logits[i] = 3.0f * logits[i] + 40.0f; /* offset */
            if (step % 4 == 1) logits[step] = NAN;
            memcpy(copy, logits, sizeof copy);
            float logprob = 1.0f;
            int token = lq_sampler_sample(sampler, copy, history, (size_t)step, &logprob);
            CHECK(token >= 0 && token < VOCAB);
            if (token < 0 || token >= VOCAB) break;
            double expected = log_softmax(logits, VOCAB, token);
            CHECK_MSG(fabs(logprob - expected) <= 2e-5 * (1.0 + fabs(expected)),
                      "config %zu step %d: logprob %.7g, expected %.7g", ci, step, (double)logprob,
                      expected);
            history[step] = token;
        }
        lq_sampler_free(sampler);
    }
}

/* An independent sampler with a full sort and plain sequential sums in sorted order. The sampler
 * under test sums whole buckets first, so the two agree exactly except when a cumulative sum lies
 * within rounding of a boundary: *margin gets the smallest relative distance of a decisive sum
 * from its boundary, and callers skip draws below 1e-9. */
struct reference_candidate {
    float logit;
    int id;
};

static int reference_compare(const void *a, const void *b) {
    const struct reference_candidate *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return x->id - y->id;
}

/* Relative distance from limit of the sums on either side of a crossing at index j. */
static double crossing_margin(const double *cumulative, size_t j, double limit, double scale) {
    double margin = fabs(cumulative[j] - limit) / scale;
    if (j > 0 && fabs(cumulative[j - 1] - limit) / scale < margin)
        margin = fabs(cumulative[j - 1] - limit) / scale;
    return margin;
}

static int reference_sample(const struct lq_sampler_params *p, float *x, int vocab,
                            const int *history, size_t count, double u, double *margin) {
    *margin = INFINITY;
    size_t start = p->repetition_window && (size_t)p->repetition_window < count
                       ? count - (size_t)p->repetition_window
                       : 0;
    unsigned char *seen = calloc((size_t)vocab, 1);
    for (size_t i = start; i < count; i++) {
        int t = history[i];
        if (t < 0 || t >= vocab || seen[t]) continue;
        seen[t] = 1;
        x[t] = x[t] > 0 ? x[t] / p->repetition_penalty : x[t] * p->repetition_penalty;
    }
    free(seen);
    float max = -INFINITY;
    int argmax = 0;
    for (int i = 0; i < vocab; i++) {
        if (!isfinite(x[i])) x[i] = -INFINITY;
        if (x[i] > max) max = x[i], argmax = i;
    }
    if (max == -INFINITY || p->temperature == 0.0f) return argmax;
    struct reference_candidate *c = malloc((size_t)vocab * sizeof *c);
    double *cumulative = malloc((size_t)vocab * sizeof *cumulative);
    size_t n = 0;
    for (int i = 0; i < vocab; i++)
        if (x[i] > -INFINITY) c[n++] = (struct reference_candidate){x[i], i};
    qsort(c, n, sizeof *c, reference_compare);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        sum += expf((c[i].logit - max) / p->temperature);
        cumulative[i] = sum;
    }
    /* top-k, then top-p on the renormalised distribution, then min-p: all prefixes. */
    size_t kept = p->top_k > 0 && (size_t)p->top_k < n ? (size_t)p->top_k : n;
    if (p->top_p < 1.0f) {
        double limit = (double)p->top_p * cumulative[kept - 1];
        size_t j = 0;
        while (j + 1 < kept && cumulative[j] < limit) j++;
        *margin = crossing_margin(cumulative, j, limit, cumulative[kept - 1]);
        kept = j + 1;
    }
    double min_logit =
        p->min_p > 0 ? (double)max + (double)p->temperature * log((double)p->min_p) : -INFINITY;
    size_t k = 1;
    while (k < kept && c[k].logit >= min_logit) k++;
    kept = k;
    double target = u * cumulative[kept - 1];
    size_t j = 0;
    while (j + 1 < kept && cumulative[j] <= target) j++;
    double draw_margin = crossing_margin(cumulative, j, target, cumulative[kept - 1]);
    if (draw_margin < *margin) *margin = draw_margin;
    int token = c[j].id;
    free(c);
    free(cumulative);
    return token;
}

static void test_matches_full_sort_reference(void) {
    enum { VOCAB = 8000, DRAWS = 24 };
    struct config {
        float temperature;
        int top_k;
        float top_p, min_p, penalty;
    } configs[] = {
        {1.0f, 0, 1.0f, 0.0f, 1.0f},     {0.7f, 40, 0.9f, 0.0f, 1.0f},
        {1.0f, 0, 0.95f, 0.0f, 1.0f},    {1.5f, 0, 0.99f, 0.0f, 1.0f},
        {3.0f, 0, 1.0f, 0.0f, 1.0f},     {1.0f, 0, 1.0f, 0.05f, 1.0f},
        {1.0f, 1000, 0.8f, 0.01f, 1.3f}, {0.05f, 0, 0.9f, 0.0f, 1.2f},
        {2.0f, 0, 0.5f, 0.001f, 1.0f},   {1.0f, 7999, 1.0f, 0.0f, 1.0f},
        {0.8f, 0, 1.0f, 0.0f, 1.1f},
    };
    const float scales[] = {0.5f, 2.0f, 6.0f};
    float *logits = malloc(VOCAB * sizeof *logits);
    float *mine = malloc(VOCAB * sizeof *mine);
    float *theirs = malloc(VOCAB * sizeof *theirs);
    int history[DRAWS];
    struct lq_rng rng;
    lq_rng_seed(&rng, 2024);
    int mismatches = 0, checked = 0, ambiguous = 0;
    for (size_t ci = 0; ci < sizeof configs / sizeof *configs; ci++) {
        for (size_t si = 0; si < sizeof scales / sizeof *scales; si++) {
            const struct config *cf = &configs[ci];
            uint64_t seed = 1000 + ci * 10 + si;
            struct lq_sampler_params params;
            lq_sampler_params_default(&params);
            params.temperature = cf->temperature;
            params.top_k = cf->top_k;
            params.top_p = cf->top_p;
            params.min_p = cf->min_p;
            params.repetition_penalty = cf->penalty;
            params.repetition_window = 16;
            params.seed = seed;
            struct lq_sampler *sampler = NULL;
            CHECK_OK(lq_sampler_create(&params, VOCAB, &sampler, NULL));
            if (!sampler) continue;
            struct lq_rng uniform;
            lq_rng_seed(&uniform, seed);
            for (int d = 0; d < DRAWS; d++) {
                lq_rng_fill_normal(&rng, logits, VOCAB);
                for (int i = 0; i < VOCAB; i++) {
                    logits[i] *= scales[si];
                    /* Some rows quantised to create ties, some with masked tokens. */
                    if (d % 3 == 1) logits[i] = roundf(logits[i] * 2.0f) * 0.5f;
                    if (d % 5 == 2 && i % 7 == 0) logits[i] = -INFINITY;
                }
                memcpy(mine, logits, VOCAB * sizeof *mine);
                memcpy(theirs, logits, VOCAB * sizeof *theirs);
                double u = lq_rng_uniform(&uniform);
                int got = lq_sampler_sample(sampler, mine, history, (size_t)d, NULL);
                double margin;
                int want = reference_sample(&params, theirs, VOCAB, history, (size_t)d, u, &margin);
                if (margin < 1e-9) {
                    ambiguous++;
                } else if (got != want) {
                    if (mismatches++ < 5)
                        fprintf(stderr, "config %zu scale %g draw %d: got %d, reference %d\n", ci,
                                (double)scales[si], d, got, want);
                }
                CHECK(memcmp(mine, theirs, VOCAB * sizeof *mine) == 0);
                history[d] = want;
                checked++;
            }
            lq_sampler_free(sampler);
        }
    }
    CHECK_MSG(mismatches == 0, "%d of %d draws differ from the full-sort reference", mismatches,
              checked);
    CHECK_MSG(ambiguous <= checked / 100, "%d of %d draws within rounding of a boundary", ambiguous,
              checked);
    free(logits);
    free(mine);
    free(theirs);
}

/* A head token and a tail of tokens each below probability 2^-22 that together hold ~0.6%: only a
 * uniform near 1 lands there, which makes the sampler lower its threshold step by step down to
 * the full sort. Seeds are picked for their first uniform so that every draw goes deep. */
static void test_tail_draws(void) {
    enum { VOCAB = 30000 };
    float *logits = malloc(VOCAB * sizeof *logits);
    float *mine = malloc(VOCAB * sizeof *mine);
    float *theirs = malloc(VOCAB * sizeof *theirs);
    struct lq_rng rng;
    lq_rng_seed(&rng, 31);
    lq_rng_fill_normal(&rng, logits, VOCAB);
    for (int i = 0; i < VOCAB; i++) {
        logits[i] = -15.5f + 0.5f * logits[i];
        if (i % 2) logits[i] = roundf(logits[i] * 4.0f) * 0.25f; /* ties */
    }
    logits[123] = 0.0f;
    struct config {
        int top_k;
        float top_p, min_p;
    } configs[] = {{0, 1.0f, 0.0f}, {0, 0.9999f, 0.0f}, {0, 1.0f, 1e-8f}, {25000, 1.0f, 0.0f}};
    uint64_t seed = 0;
    int mismatches = 0, tail = 0;
    for (size_t ci = 0; ci < sizeof configs / sizeof *configs; ci++) {
        for (int d = 0; d < 10; d++) {
            double u;
            do { /* about one seed in 170 */
                struct lq_rng probe;
                lq_rng_seed(&probe, ++seed);
                u = lq_rng_uniform(&probe);
            } while (u < 0.994);
            struct lq_sampler_params params;
            lq_sampler_params_default(&params);
            params.top_k = configs[ci].top_k;
            params.top_p = configs[ci].top_p;
            params.min_p = configs[ci].min_p;
            params.seed = seed;
            struct lq_sampler *sampler = NULL;
            CHECK_OK(lq_sampler_create(&params, VOCAB, &sampler, NULL));
            if (!sampler) continue;
            memcpy(mine, logits, VOCAB * sizeof *mine);
            memcpy(theirs, logits, VOCAB * sizeof *theirs);
            int got = lq_sampler_sample(sampler, mine, NULL, 0, NULL);
            double margin;
            int want = reference_sample(&params, theirs, VOCAB, NULL, 0, u, &margin);
            if (margin >= 1e-9 && got != want && mismatches++ < 5)
                fprintf(stderr, "config %zu seed %llu: got %d, reference %d\n", ci,
                        (unsigned long long)seed, got, want);
            tail += got != 123;
            lq_sampler_free(sampler);
        }
    }
    CHECK_MSG(mismatches == 0, "%d tail draws differ from the full-sort reference", mismatches);
    CHECK_MSG(tail >= 20, "only %d of 40 draws reached the tail", tail);
    free(logits);
    free(mine);
    free(theirs);
}

LQ_TEST_MAIN(LQ_TEST(test_defaults_and_validation), LQ_TEST(test_greedy),
             LQ_TEST(test_temperature_frequencies), LQ_TEST(test_one_uniform_per_call),
             LQ_TEST(test_top_k), LQ_TEST(test_top_p), LQ_TEST(test_min_p),
             LQ_TEST(test_repetition_penalty), LQ_TEST(test_seed_determinism),
             LQ_TEST(test_nonfinite_logits), LQ_TEST(test_logprob),
             LQ_TEST(test_matches_full_sort_reference), LQ_TEST(test_tail_draws))
