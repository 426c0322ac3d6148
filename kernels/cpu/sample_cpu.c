/* The CPU backend's sample op: core/sampler.c itself, row by row, with the uniform the caller
 * drew, so it gives lq_sampler_sample's tokens bit for bit. The op must leave the logits as
 * they are and lq_sampler_sample rewrites non-finite entries, so each row is sampled from a
 * copy. */
#include "kernels/cpu/cpu_ops.h"

#include <stdlib.h>
#include <string.h>

#include "core/sampler.h"

/* Row settings as core/sampler.h's parameters (no penalty: the op has none). */
static struct lq_sampler_params row_params(const struct lq_sample_row *row) {
    struct lq_sampler_params params;
    lq_sampler_params_default(&params);
    params.temperature = row->temperature;
    params.top_k = row->top_k;
    params.top_p = row->top_p;
    params.min_p = row->min_p;
    return params;
}

static int rows_check(int n, int vocab, int stride, const struct lq_sample_row *rows,
                      const int *tokens) {
    if (n < 1 || vocab < 1 || stride < vocab || !rows || !tokens) return LQ_EINVAL;
    for (int i = 0; i < n; i++) {
        struct lq_sampler_params params = row_params(&rows[i]);
        if (lq_sampler_params_validate(&params, NULL) || !(rows[i].u >= 0.0 && rows[i].u < 1.0))
            return LQ_EINVAL;
    }
    return LQ_OK;
}

int lq_cpu_sample(struct lq_backend *backend, const float *logits, int n, int vocab, int stride,
                  const struct lq_sample_row *rows, int *tokens, float *logprobs) {
    (void)backend;
    int rc = rows_check(n, vocab, stride, rows, tokens);
    if (rc) return rc;
    if (!logits) return LQ_EINVAL;
    struct lq_sampler_params defaults;
    lq_sampler_params_default(&defaults);
    /* One sampler lends its scratch space to every row; each row brings its own settings. */
    struct lq_sampler *sampler = NULL;
    float *row = malloc((size_t)vocab * sizeof *row);
    if (!row || lq_sampler_create(&defaults, vocab, &sampler, NULL)) {
        free(row);
        return LQ_ENOMEM;
    }
    for (int i = 0; i < n && !rc; i++) {
        memcpy(row, logits + (size_t)i * (size_t)stride, (size_t)vocab * sizeof *row);
        struct lq_sampler_params params = row_params(&rows[i]);
        int token = lq_sampler_sample_with(sampler, &params, row, NULL, 0, rows[i].u,
                                           logprobs ? &logprobs[i] : NULL);
        if (token < 0)
            rc = token;
        else
            tokens[i] = token;
    }
    lq_sampler_free(sampler);
    free(row);
    return rc;
}
