/* Random rows for the tests of the sample op (tests/unit/test_sample_cpu.c against
 * lq_sampler_sample, tests/kernels/test_cuda_sample.c against the CPU op): logits peaked, flat,
 * spread or full of ties, with -inf, NaN and +inf entries and signed zeros, and settings that
 * reach every path of core/sampler.c (greedy, top-k = 1 and larger, tiny top-p, min-p, all
 * together, extreme temperatures). */
#ifndef LQ_SAMPLE_CASES_H
#define LQ_SAMPLE_CASES_H

#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "core/rng.h"
#include "kernels/backend.h"

enum { SAMPLE_SHAPES = 5 };
static const char *const sample_shape_names[SAMPLE_SHAPES] = {"spread", "peaked", "flat", "ties",
                                                              "nonfinite"};

static inline int sample_case_below(struct lq_rng *rng, int bound) {
    return (int)(lq_rng_uniform(rng) * bound);
}

/* row[vocab] of the given shape (0 .. SAMPLE_SHAPES - 1). */
static inline void sample_case_logits(struct lq_rng *rng, float *row, int vocab, int shape) {
    lq_rng_fill_normal(rng, row, (size_t)vocab);
    switch (shape) {
    case 0: /* a wide spread, as a model's logits */
        for (int i = 0; i < vocab; i++) row[i] = row[i] * 3.0f + 1.0f;
        break;
    case 1: /* one or two tokens far ahead of the rest */
        for (int i = 0; i < vocab; i++) row[i] *= 1.5f;
        row[sample_case_below(rng, vocab)] += 14.0f;
        row[sample_case_below(rng, vocab)] += 13.0f;
        break;
    case 2: /* every logit equal, but a few */
        for (int i = 0; i < vocab; i++) row[i] = 0.5f;
        for (int k = 0; k < 3; k++) row[sample_case_below(rng, vocab)] = 0.25f;
        break;
    case 3: /* coarse values: long tie groups, -0 beside +0 */
        for (int i = 0; i < vocab; i++) row[i] = roundf(row[i] * 2.0f) * 0.5f;
        for (int i = 0; i < vocab; i += 3)
            if (row[i] == 0.0f) row[i] = -0.0f;
        break;
    default: /* spread, with non-finite entries (all -inf now and then on small rows) */
        for (int i = 0; i < vocab; i++) {
            row[i] *= 2.0f;
            int pick = sample_case_below(rng, 16);
            if (pick == 0) row[i] = -INFINITY;
            if (pick == 1) row[i] = NAN;
            if (pick == 2 && i % 5 == 0) row[i] = INFINITY;
        }
        if (vocab < 16 && sample_case_below(rng, 4) == 0)
            for (int i = 0; i < vocab; i++) row[i] = i % 2 ? NAN : -INFINITY;
        break;
    }
}

/* Settings for one row, with its uniform. */
static inline struct lq_sample_row sample_case_row(struct lq_rng *rng, int vocab) {
    struct lq_sample_row row = {1.0f, 0, 1.0f, 0.0f, 0.0};
    switch (sample_case_below(rng, 9)) {
    case 0:
        row.temperature = 0.0f;
        break;
    case 1:
        row.top_k = 1;
        break;
    case 2:
        row.top_p = 1e-6f;
        break;
    case 3:
        row.min_p = (float)lq_rng_uniform(rng);
        break;
    case 4:
        row.top_k = 1 + sample_case_below(rng, vocab + 3);
        row.top_p = 0.05f + 0.95f * (float)lq_rng_uniform(rng);
        break;
    case 5:
        row.temperature = 0.3f + 1.5f * (float)lq_rng_uniform(rng);
        row.top_k = 1 + sample_case_below(rng, vocab < 100 ? vocab : 100);
        row.top_p = 0.5f + 0.5f * (float)lq_rng_uniform(rng);
        row.min_p = 0.1f * (float)lq_rng_uniform(rng);
        break;
    case 6:
        row.temperature = 0.05f;
        break;
    case 7:
        row.temperature = 5.0f, row.top_p = 0.9f;
        break;
    default:
        row.temperature = 0.2f + 2.0f * (float)lq_rng_uniform(rng);
        break;
    }
    /* now and then a uniform at the ends of [0, 1) */
    int end = sample_case_below(rng, 20);
    row.u = end == 0 ? 0.0 : end == 1 ? nextafter(1.0, 0.0) : lq_rng_uniform(rng);
    return row;
}

struct sample_case_entry {
    float logit;
    int id;
};

static inline int sample_case_compare(const void *a, const void *b) {
    const struct sample_case_entry *x = (const struct sample_case_entry *)a,
                                   *y = (const struct sample_case_entry *)b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* Whether rounding alone could make a sampler pick another token than `token` (the CPU's) for
 * this row: u lies within margin of the kept tokens' cumulative distribution just before or
 * just after token, or top-p's limit within margin of a step of its own cumulative
 * distribution (then rounding decides which tokens are kept). A reference of its own in
 * double over a full sort, independent of core/sampler.c's bucketing; greedy never is. */
static inline int sample_case_near_boundary(const float *logits, int vocab,
                                            const struct lq_sample_row *row, int token,
                                            double margin) {
    if (row->temperature == 0.0f) return 0;
    struct sample_case_entry *sorted =
        (struct sample_case_entry *)malloc((size_t)vocab * sizeof *sorted);
    int finite = 0;
    for (int i = 0; i < vocab; i++)
        if (isfinite(logits[i])) sorted[finite++] = (struct sample_case_entry){logits[i], i};
    if (finite == 0) {
        free(sorted);
        return 0;
    }
    qsort(sorted, (size_t)finite, sizeof *sorted, sample_case_compare);
    float max = sorted[0].logit, t = row->temperature;
    double *cumulative = (double *)malloc((size_t)finite * sizeof *cumulative), sum = 0.0;
    for (int i = 0; i < finite; i++)
        cumulative[i] = sum += (double)expf((sorted[i].logit - max) / t);
    int candidates =
        row->top_k > 0 && row->top_k < vocab && finite >= row->top_k ? row->top_k : finite;
    double z = cumulative[candidates - 1];
    int kept = candidates, near = 0;
    if (row->top_p < 1.0f) {
        double limit = (double)row->top_p * z;
        int i = 0;
        while (i < candidates - 1 && cumulative[i] < limit) i++;
        kept = i + 1;
        near = fabs(cumulative[i] / z - row->top_p) < margin ||
               (i > 0 && fabs(cumulative[i - 1] / z - row->top_p) < margin);
    }
    if (row->min_p > 0.0f) { /* core/sampler.c's threshold, rounded up to a float */
        double threshold = (double)max + (double)t * log((double)row->min_p);
        float min_logit = threshold <= -FLT_MAX ? -FLT_MAX : (float)threshold;
        if ((double)min_logit < threshold) min_logit = nextafterf(min_logit, INFINITY);
        int k = 1;
        while (k < kept && sorted[k].logit >= min_logit) k++;
        kept = k;
    }
    int position = 0;
    while (position < finite && sorted[position].id != token) position++;
    if (position < kept) {
        double total = cumulative[kept - 1];
        double before = position > 0 ? cumulative[position - 1] / total : 0.0;
        double after = cumulative[position] / total;
        near |= fabs(row->u - before) < margin || fabs(row->u - after) < margin;
    }
    free(sorted);
    free(cumulative);
    return near;
}

#endif
