/* The CUDA sample op (kernels/cuda/sample_cuda.cu) against the CPU's (core/sampler.c) on fresh
 * random logits: vocabularies odd and large (7 .. 262144), 1, 3 and 64 rows at a stride past
 * the vocabulary (padding that would win every draw if read), peaked, flat, tied and
 * non-finite rows, every setting path and uniforms at both ends of [0, 1).
 * The device token must equal the CPU's, except where rounding alone decides
 * (tests/unit/sample_cases.h: u or top-p's limit within 1e-6 of a step of the cumulative
 * distribution): those are counted and printed, and more than a handful fail. Logprobs within
 * 1e-5 (relative above 1). Greedy rows must always match. The device logits must come back
 * unchanged, and a second call must give the same tokens.
 * Both device implementations run on every batch (LQ_CUDA_SAMPLE=bisect, the bisection, and
 * radix, the default): each is checked against the CPU as above, and radix must give bisect's
 * tokens and logprobs bit for bit (that is its contract: same cuts, confirmed by the same sums).
 * Without a usable GPU (or in a build without CUDA) the test exits 77: meson's "skipped".
 * --quick: one batch of 3 rows at vocab 1000 and at 49152 (the row in shared memory), for runs
 * under compute-sanitizer (tests/kernels/gpu_check.sh sample).
 * Usage: test_cuda_sample [--time] [--quick] */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "kernels/backend.h"
#include "tests/unit/lq_test.h"

#include "tests/kernels/kernel_check.h"
#include "tests/unit/sample_cases.h"

#define NEAR_MARGIN 1e-6
#define LOGPROB_TOLERANCE 1e-5
/* Mismatches where rounding decides, besides those at the deliberate u = 1 - 2^-53 (where a
 * tail token's CDF rounds to 1 and both sides are right): random u lands within 1e-6 of a
 * step rarely, so more than this means a real difference. */
#define NEAR_ALLOWED 5

static int timing, quick;

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
/* The device implementations, as LQ_CUDA_SAMPLE names them; the first is the reference. */
static const char *const implementations[] = {"bisect", "radix"};
#define IMPLEMENTATIONS 2
static int compared[IMPLEMENTATIONS], near_random[IMPLEMENTATIONS], near_end[IMPLEMENTATIONS],
    logprob_checked[IMPLEMENTATIONS];

static int gpu_sample(int implementation, const float *device, int n, int vocab, int stride,
                      const struct lq_sample_row *rows, int *tokens, float *logprobs) {
    setenv("LQ_CUDA_SAMPLE", implementations[implementation], 1);
    return gpu->ops->sample(gpu, device, n, vocab, stride, rows, tokens, logprobs);
}

static void check_batch(int vocab, int n) {
    int stride = vocab + 3; /* odd: rows start unaligned */
    size_t count = (size_t)n * stride;
    float *logits = malloc(count * sizeof *logits);
    struct lq_sample_row *rows = malloc((size_t)n * sizeof *rows);
    int *cpu_tokens = malloc((size_t)n * sizeof(int));
    int *gpu_tokens = malloc((size_t)IMPLEMENTATIONS * n * sizeof(int));
    int *again = malloc((size_t)n * sizeof(int));
    float *cpu_logprobs = malloc((size_t)n * sizeof(float));
    float *gpu_logprobs = malloc((size_t)IMPLEMENTATIONS * n * sizeof(float));
    for (int i = 0; i < n; i++) {
        float *row = logits + (size_t)i * stride;
        sample_case_logits(&rng, row, vocab, (int)(lq_rng_next(&rng) % SAMPLE_SHAPES));
        for (int p = vocab; p < stride; p++) row[p] = 1000.0f;
        rows[i] = sample_case_row(&rng, vocab);
    }
    float *device = device_floats(logits, count);
    CHECK(cpu->ops->sample(cpu, logits, n, vocab, stride, rows, cpu_tokens, cpu_logprobs) == 0);
    for (int m = 0; m < IMPLEMENTATIONS; m++) {
        const char *name = implementations[m];
        int *tokens = gpu_tokens + (size_t)m * n;
        float *logprobs = gpu_logprobs + (size_t)m * n;
        for (int i = 0; i < n; i++) tokens[i] = -1, logprobs[i] = NAN;
        int rc = gpu_sample(m, device, n, vocab, stride, rows, tokens, logprobs);
        CHECK_MSG(rc == 0, "%s vocab %d n %d: sample returned %d", name, vocab, n, rc);
        CHECK(gpu_sample(m, device, n, vocab, stride, rows, again, NULL) == 0);
        CHECK_MSG(memcmp(again, tokens, (size_t)n * sizeof(int)) == 0,
                  "%s vocab %d n %d: a second call gave other tokens", name, vocab, n);
        float *back = to_host(device, count);
        CHECK_MSG(memcmp(back, logits, count * sizeof *logits) == 0,
                  "%s vocab %d n %d: the op changed the logits", name, vocab, n);
        free(back);
        for (int i = 0; i < n; i++) {
            const float *row = logits + (size_t)i * stride;
            const struct lq_sample_row *r = &rows[i];
            compared[m]++;
            if (tokens[i] != cpu_tokens[i]) {
                int near = sample_case_near_boundary(row, vocab, r, cpu_tokens[i], NEAR_MARGIN);
                int at_end = r->u == nextafter(1.0, 0.0);
                if (near) {
                    at_end ? near_end[m]++ : near_random[m]++;
                    printf("  %s near a boundary (%s): vocab %d T %g k %d p %g min_p %g u %.17g: "
                           "gpu %d, cpu %d\n",
                           name, at_end ? "u = 1 - 2^-53" : "random u", vocab,
                           (double)r->temperature, r->top_k, (double)r->top_p, (double)r->min_p,
                           r->u, tokens[i], cpu_tokens[i]);
                    continue;
                }
                CHECK_MSG(0,
                          "%s vocab %d n %d row %d T %g k %d p %g min_p %g u %.17g: gpu %d, "
                          "cpu %d",
                          name, vocab, n, i, (double)r->temperature, r->top_k, (double)r->top_p,
                          (double)r->min_p, r->u, tokens[i], cpu_tokens[i]);
                continue;
            }
            double expected = cpu_logprobs[i], got = logprobs[i];
            if (isinf(expected) || isinf(got)) {
                CHECK_MSG(expected == got, "%s vocab %d row %d: logprob %g, cpu %g", name, vocab, i,
                          got, expected);
            } else {
                double scale = fabs(expected) > 1.0 ? fabs(expected) : 1.0;
                CHECK_MSG(fabs(got - expected) <= LOGPROB_TOLERANCE * scale,
                          "%s vocab %d row %d: logprob %.9g, cpu %.9g", name, vocab, i, got,
                          expected);
            }
            logprob_checked[m]++;
        }
    }
    /* radix against bisect: the same tokens and the same logprob bits, row by row */
    for (int m = 1; m < IMPLEMENTATIONS; m++)
        for (int i = 0; i < n; i++) {
            const struct lq_sample_row *r = &rows[i];
            int token = gpu_tokens[(size_t)m * n + i], reference = gpu_tokens[i];
            float logprob = gpu_logprobs[(size_t)m * n + i], reference_logprob = gpu_logprobs[i];
            CHECK_MSG(token == reference &&
                          memcmp(&logprob, &reference_logprob, sizeof logprob) == 0,
                      "vocab %d n %d row %d T %g k %d p %g min_p %g u %.17g: %s %d (%.9g), %s "
                      "%d (%.9g)",
                      vocab, n, i, (double)r->temperature, r->top_k, (double)r->top_p,
                      (double)r->min_p, r->u, implementations[m], token, (double)logprob,
                      implementations[0], reference, (double)reference_logprob);
        }
    gpu->ops->buffer_free(gpu, device);
    free(logits), free(rows), free(cpu_tokens), free(gpu_tokens), free(again);
    free(cpu_logprobs), free(gpu_logprobs);
}

static void test_against_cpu(void) {
    static const int vocabs[] = {7, 1000, 32000, 49152, 151936, 262144};
    static const int counts[] = {1, 3, 64};
    if (quick) {
        check_batch(1000, 3);
        check_batch(49152, 3);
        printf("  --quick: %d rows compared\n", compared[0]);
        return;
    }
    for (size_t v = 0; v < sizeof vocabs / sizeof vocabs[0]; v++)
        for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++)
            for (int repeat = 0; repeat < 3; repeat++) check_batch(vocabs[v], counts[c]);
    for (int m = 0; m < IMPLEMENTATIONS; m++) {
        printf("  %s: %d rows compared, %d logprobs; where rounding decides: %d at u = 1 - 2^-53, "
               "%d at random u (at most %d allowed)\n",
               implementations[m], compared[m], logprob_checked[m], near_end[m], near_random[m],
               NEAR_ALLOWED);
        CHECK(near_random[m] <= NEAR_ALLOWED);
        CHECK(near_end[m] <= compared[m] / 20 + NEAR_ALLOWED); /* about 1 row in 20 has that u */
    }
}

/* Bad arguments, with LQ_CUDA_SAMPLE set by the caller. */
static void test_invalid_with(void) {
    float host[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    float *device = device_floats(host, 8);
    int token = -1;
    struct lq_sample_row ok = {1.0f, 0, 1.0f, 0.0f, 0.5};
    CHECK(gpu->ops->sample(gpu, device, 1, 8, 8, &ok, &token, NULL) == 0 && token >= 0 &&
          token < 8);
    CHECK(gpu->ops->sample(gpu, device, 0, 8, 8, &ok, &token, NULL) == LQ_EINVAL);
    CHECK(gpu->ops->sample(gpu, device, 1, 8, 7, &ok, &token, NULL) == LQ_EINVAL);
    struct lq_sample_row bad = ok;
    bad.u = 1.0;
    CHECK(gpu->ops->sample(gpu, device, 1, 8, 8, &bad, &token, NULL) == LQ_EINVAL);
    bad = ok, bad.top_p = 0.0f;
    CHECK(gpu->ops->sample(gpu, device, 1, 8, 8, &bad, &token, NULL) == LQ_EINVAL);
    bad = ok, bad.temperature = -1.0f;
    CHECK(gpu->ops->sample(gpu, device, 1, 8, 8, &bad, &token, NULL) == LQ_EINVAL);
    gpu->ops->buffer_free(gpu, device);
}

static void test_invalid(void) {
    for (int m = 0; m < IMPLEMENTATIONS; m++) {
        setenv("LQ_CUDA_SAMPLE", implementations[m], 1);
        test_invalid_with();
    }
}

/* --time: one step of 64 rows as lqd serve samples it, each device implementation against
 * copying the logits to the host (what the op replaces), median of 25; the implementations take
 * turns within each round, and must pick the same tokens. */
static void time_step(int vocab, struct lq_sample_row settings, const char *what) {
    int n = 64;
    size_t count = (size_t)n * vocab;
    float *logits = malloc(count * sizeof *logits);
    struct lq_sample_row rows[64];
    for (int i = 0; i < n; i++) {
        sample_case_logits(&rng, logits + (size_t)i * vocab, vocab, 0);
        rows[i] = settings;
        rows[i].u = lq_rng_uniform(&rng);
    }
    float *device = device_floats(logits, count);
    int tokens[IMPLEMENTATIONS][64];
    float logprobs[IMPLEMENTATIONS][64];
    double times[IMPLEMENTATIONS][25], copies[25];
    struct lq_error err = {0};
    for (int k = 0; k < 28; k++) {
        for (int m = 0; m < IMPLEMENTATIONS; m++) {
            gpu->ops->synchronize(gpu, &err);
            setenv("LQ_CUDA_SAMPLE", implementations[m], 1);
            double start = seconds_now();
            CHECK(gpu->ops->sample(gpu, device, n, vocab, vocab, rows, tokens[m], logprobs[m]) ==
                  0);
            if (k >= 3) times[m][k - 3] = seconds_now() - start;
        }
        double start = seconds_now();
        CHECK(gpu->ops->copy_to_host(gpu, logits, device, count * sizeof *logits) == 0);
        if (k >= 3) copies[k - 3] = seconds_now() - start;
    }
    printf("  vocab %6d, 64 rows, %-28s", vocab, what);
    for (int m = 0; m < IMPLEMENTATIONS; m++) {
        qsort(times[m], 25, sizeof times[m][0], compare_doubles);
        printf(" %s %8.1f us ", implementations[m], times[m][12] * 1e6);
        CHECK_MSG(memcmp(tokens[m], tokens[0], sizeof tokens[0]) == 0 &&
                      memcmp(logprobs[m], logprobs[0], sizeof logprobs[0]) == 0,
                  "vocab %d %s: %s picked other tokens than %s", vocab, what, implementations[m],
                  implementations[0]);
    }
    qsort(copies, 25, sizeof copies[0], compare_doubles);
    printf("  (copy of the logits to the host: %8.1f us)\n", copies[12] * 1e6);
    gpu->ops->buffer_free(gpu, device);
    free(logits);
}

static void test_timing(void) {
    if (!timing) return;
    struct lq_sample_row greedy = {0.0f, 0, 1.0f, 0.0f, 0.0};
    struct lq_sample_row plain = {0.8f, 0, 1.0f, 0.0f, 0.0};
    struct lq_sample_row nucleus = {0.8f, 0, 0.95f, 0.0f, 0.0};
    struct lq_sample_row all = {0.8f, 40, 0.95f, 0.05f, 0.0};
    static const int vocabs[] = {49152, 151936};
    for (int v = 0; v < 2; v++) {
        time_step(vocabs[v], greedy, "greedy");
        time_step(vocabs[v], plain, "T 0.8");
        time_step(vocabs[v], nucleus, "T 0.8, top-p 0.95");
        time_step(vocabs[v], all, "T 0.8, k 40, p 0.95, min-p");
    }
}

int main(int argc, char **argv) {
    struct lq_error err = {0};
    if (lq_backend_cuda_create(0, 0, &gpu, &err)) {
        printf("SKIP: %s\n", err.message);
        return 77;
    }
    CHECK_OK(lq_backend_cpu_create(&cpu, &err));
    lq_rng_seed(&rng, 20261126);
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--time") == 0)
            timing = 1;
        else if (strcmp(argv[i], "--quick") == 0)
            quick = 1;
    static const struct lq_test_case cases[] = {
        LQ_TEST(test_against_cpu),
        LQ_TEST(test_invalid),
        LQ_TEST(test_timing),
    };
    /* every case (the arguments are options here, not a case filter) */
    const int failed = lq_test_run(cases, sizeof cases / sizeof cases[0], 1, argv);
    gpu->ops->destroy(gpu);
    cpu->ops->destroy(cpu);
    return failed;
}
