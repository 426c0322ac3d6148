/* Sampling throughput on LLaMA (32000) and Qwen2 (152064) sized vocabularies, with logits shaped
 * like a language model's: normal with standard deviation 2.5 plus a few strongly preferred
 * tokens. Each token copies a fresh logits row (sampling modifies it in place); the copy alone is
 * timed on its own line. Times are process CPU time, which a busy shared machine disturbs less
 * than wall time (the sampler is single-threaded). Prints figures; no pass/fail. Exit status 1
 * only if sampling fails. Optional argument: tokens per line (default 20000). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/rng.h"
#include "core/sampler.h"

enum { ROWS = 16, HISTORY = 256 };

struct config {
    const char *name;
    float temperature;
    int top_k;
    float top_p, min_p, penalty;
    int want_logprob;
};

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* A naive sampler for comparison: sort the whole vocabulary, then top-p. */
struct naive_candidate {
    float logit;
    int id;
};

static int naive_compare(const void *a, const void *b) {
    const struct naive_candidate *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return x->id - y->id;
}

static int naive_top_p(const float *logits, int vocab, float top_p, struct naive_candidate *c,
                       double u) {
    for (int i = 0; i < vocab; i++) c[i] = (struct naive_candidate){logits[i], i};
    qsort(c, (size_t)vocab, sizeof *c, naive_compare);
    double z = 0.0, cumulative = 0.0;
    for (int i = 0; i < vocab; i++) z += exp(c[i].logit - c[0].logit);
    int kept = vocab;
    for (int i = 0; i < vocab; i++) {
        cumulative += exp(c[i].logit - c[0].logit);
        if (cumulative >= top_p * z) {
            kept = i + 1;
            break;
        }
    }
    double target = u * cumulative;
    cumulative = 0.0;
    for (int i = 0; i < kept; i++) {
        cumulative += exp(c[i].logit - c[0].logit);
        if (cumulative > target) return c[i].id;
    }
    return c[kept - 1].id;
}

static int bench_vocab(int vocab, int tokens) {
    float *rows = malloc((size_t)ROWS * (size_t)vocab * sizeof *rows);
    float *logits = malloc((size_t)vocab * sizeof *logits);
    struct naive_candidate *naive = malloc((size_t)vocab * sizeof *naive);
    int *history = malloc((size_t)tokens * sizeof *history);
    if (!rows || !logits || !naive || !history) return 1;
    struct lq_rng rng;
    lq_rng_seed(&rng, 20240601);
    lq_rng_fill_normal(&rng, rows, (size_t)ROWS * (size_t)vocab);
    for (size_t i = 0; i < (size_t)ROWS * (size_t)vocab; i++) rows[i] *= 2.5f;
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < 5; j++)
            rows[(size_t)r * (size_t)vocab + lq_rng_next(&rng) % (uint64_t)vocab] += 8.0f - j;
    for (int i = 0; i < tokens; i++) history[i] = (int)(lq_rng_next(&rng) % (uint64_t)vocab);

    static const struct config configs[] = {
        {"greedy", 0.0f, 0, 1.0f, 0.0f, 1.0f, 0},
        {"T=1", 1.0f, 0, 1.0f, 0.0f, 1.0f, 0},
        {"T=1 + logprob", 1.0f, 0, 1.0f, 0.0f, 1.0f, 1},
        {"T=0.8 top_k=40", 0.8f, 40, 1.0f, 0.0f, 1.0f, 0},
        {"T=0.7 top_p=0.9", 0.7f, 0, 0.9f, 0.0f, 1.0f, 0},
        {"T=1 top_p=0.95", 1.0f, 0, 0.95f, 0.0f, 1.0f, 0},
        {"T=1.5 top_p=0.99", 1.5f, 0, 0.99f, 0.0f, 1.0f, 0},
        {"T=1 min_p=0.05", 1.0f, 0, 1.0f, 0.05f, 1.0f, 0},
        {"T=0.7 k=40 p=0.9 min_p=0.05 rep=1.1/256 + logprob", 0.7f, 40, 0.9f, 0.05f, 1.1f, 1},
    };

    printf("vocab %d, %d tokens per line\n", vocab, tokens);
    double start = cpu_seconds();
    for (int t = 0; t < tokens; t++)
        memcpy(logits, rows + (size_t)(t % ROWS) * (size_t)vocab, (size_t)vocab * sizeof *logits);
    double copy_seconds = cpu_seconds() - start;
    printf("  %-52s %8.2f us/token\n", "(row copy alone, included below)",
           1e6 * copy_seconds / tokens);

    for (size_t c = 0; c < sizeof configs / sizeof configs[0]; c++) {
        const struct config *cf = &configs[c];
        struct lq_sampler_params params;
        lq_sampler_params_default(&params);
        params.temperature = cf->temperature;
        params.top_k = cf->top_k;
        params.top_p = cf->top_p;
        params.min_p = cf->min_p;
        params.repetition_penalty = cf->penalty;
        params.repetition_window = HISTORY;
        params.seed = 7;
        struct lq_sampler *sampler = NULL;
        struct lq_error err = {0};
        if (lq_sampler_create(&params, vocab, &sampler, &err)) {
            fprintf(stderr, "bench_sampler: %s\n", err.message);
            return 1;
        }
        unsigned long checksum = 0;
        start = cpu_seconds();
        for (int t = 0; t < tokens; t++) {
            memcpy(logits, rows + (size_t)(t % ROWS) * (size_t)vocab,
                   (size_t)vocab * sizeof *logits);
            float logprob;
            size_t seen = t < HISTORY ? (size_t)t : HISTORY;
            int token = lq_sampler_sample(sampler, logits, history + t - seen, seen,
                                          cf->want_logprob ? &logprob : NULL);
            if (token < 0) return 1;
            checksum += (unsigned long)token;
        }
        double seconds = cpu_seconds() - start;
        printf("  %-52s %8.2f us/token %9.0f tokens/s  (checksum %lu)\n", cf->name,
               1e6 * seconds / tokens, tokens / seconds, checksum);
        lq_sampler_free(sampler);
    }

    int naive_tokens = tokens / 10 > 0 ? tokens / 10 : 1;
    start = cpu_seconds();
    unsigned long checksum = 0;
    for (int t = 0; t < naive_tokens; t++)
        checksum += (unsigned long)naive_top_p(rows + (size_t)(t % ROWS) * (size_t)vocab, vocab,
                                               0.95f, naive, lq_rng_uniform(&rng));
    double seconds = cpu_seconds() - start;
    printf("  %-52s %8.2f us/token %9.0f tokens/s  (checksum %lu)\n",
           "naive full qsort, T=1 top_p=0.95 (for comparison)", 1e6 * seconds / naive_tokens,
           naive_tokens / seconds, checksum);
    free(rows);
    free(logits);
    free(naive);
    free(history);
    return 0;
}

int main(int argc, char **argv) {
    int tokens = argc > 1 ? atoi(argv[1]) : 20000;
    if (tokens <= 0) tokens = 20000;
    if (bench_vocab(32000, tokens)) return 1;
    if (bench_vocab(152064, tokens / 4 > 0 ? tokens / 4 : 1)) return 1;
    return 0;
}
