/* The CPU backend's token_nll (kernels/backend.h, "evaluation"): each row's negative
 * log-likelihood of its target by core/eval.c's lq_token_nll (the float max, then the double
 * sum of exp in vocabulary order), so every perplexity the CPU reports keeps its bits. Rows run in
 * parallel; each row's arithmetic is the same whatever the thread count. */

#include "core/eval.h"
#include "core/parallel.h"
#include "kernels/cpu/cpu_ops.h"

/* A thread gets at least this many logits, so short evaluations stay on one thread. */
#define NLL_VALUES_PER_THREAD ((size_t)1 << 16)

struct nll_job {
    const float *logits;
    const int *targets;
    int vocab;
    double *nll;
};

static void nll_body(void *context, size_t begin, size_t end) {
    const struct nll_job *job = context;
    for (size_t i = begin; i < end; i++)
        job->nll[i] =
            lq_token_nll(job->logits + i * (size_t)job->vocab, job->vocab, job->targets[i]);
}

int lq_cpu_token_nll(struct lq_backend *backend, const float *logits, const int *targets, int n,
                     int vocab, double *nll) {
    (void)backend;
    if (n < 0 || vocab < 1 || (n > 0 && (!logits || !targets || !nll))) return LQ_EINVAL;
    for (int i = 0; i < n; i++)
        if (targets[i] < 0 || targets[i] >= vocab) return LQ_EINVAL;
    struct nll_job job = {logits, targets, vocab, nll};
    size_t rows_per_thread = NLL_VALUES_PER_THREAD / (size_t)vocab;
    lq_parallel_for((size_t)n, rows_per_thread ? rows_per_thread : 1, nll_body, &job);
    return LQ_OK;
}
