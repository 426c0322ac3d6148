/* Benchmark: LQ decomposition of a 4096 x 4096 matrix, rank 64, NF3 configuration
 * (3, 8, fp32, 64, 256), on the CPU. Prints seconds per step and the parts of a step.
 * Usage: bench_lq [size] [rank] [steps]   (defaults 4096 64 5) */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <cblas.h>

#include "core/lq.h"
#include "core/rng.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
    size_t size = argc > 1 ? (size_t)atol(argv[1]) : 4096;
    int rank = argc > 2 ? atoi(argv[2]) : 64;
    int steps = argc > 3 ? atoi(argv[3]) : 5;
    size_t n = size * size;
    float *w = malloc(n * sizeof *w), *out = malloc(n * sizeof *out);
    float *left = malloc(size * (size_t)rank * sizeof *left),
          *right = malloc(size * (size_t)rank * sizeof *right);
    if (!w || !out || !left || !right) return fprintf(stderr, "out of memory\n"), 1;
    /* Weight-like data: Gaussian noise plus a decaying low-rank part, scaled like LLaMA's. */
    struct lq_rng rng;
    lq_rng_seed(&rng, 2024);
    lq_rng_fill_normal(&rng, w, n);
    lq_rng_fill_normal(&rng, left, size * (size_t)rank);
    lq_rng_fill_normal(&rng, right, size * (size_t)rank);
    for (int k = 0; k < rank; k++)
        for (size_t i = 0; i < size; i++) left[i * (size_t)rank + k] *= 0.5f / (1.0f + (float)k);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)size, (int)size, rank, 1.0f, left,
                rank, right, (int)size, 1.0f, w, (int)size);
    for (size_t i = 0; i < n; i++) w[i] *= 0.02f;

    struct lq_nf_config nf3 = LQ_NF_CONFIG_NF3;
    struct lq_error err = {0};
    printf("lq decomposition benchmark: %zu x %zu, rank %d, NF3 (3, 8, fp32, 64, 256), "
           "OpenBLAS %d threads\n",
           size, size, rank, openblas_get_num_threads());

    struct lq_svd_options svd;
    lq_svd_options_default(&svd);
    float *u = malloc(size * (size_t)rank * sizeof *u), *s = malloc((size_t)rank * sizeof *s);
    float *vt = malloc(size * (size_t)rank * sizeof *vt);
    double t0 = now();
    if (lq_svd_truncated(w, size, size, rank, &svd, u, s, vt, &err))
        return fprintf(stderr, "svd: %s\n", err.message), 1;
    double t_svd = now() - t0;
    t0 = now();
    if (lq_nf_quantize_dequantize(w, n, &nf3, out, &err))
        return fprintf(stderr, "quantize: %s\n", err.message), 1;
    double t_quant = now() - t0;

    struct lq_decompose_options options;
    lq_decompose_options_default(&options);
    options.rank = rank;
    options.max_iters = steps;
    options.min_improvement = 0.0;
    struct lq_decomposition d;
    t0 = now();
    if (lq_decompose(w, size, size, &nf3, &options, &d, &err))
        return fprintf(stderr, "decompose: %s\n", err.message), 1;
    double t_total = now() - t0;
    printf("randomized SVD (rank %d + 10, 2 power iterations): %.3f s\n", rank, t_svd);
    printf("NF3 quantize-dequantize of %zu values: %.3f s\n", n, t_quant);
    printf("decomposition: %d steps in %.3f s = %.3f s per step; relative error %.5f "
           "(plain NF3 %.5f)\n",
           d.iters, t_total, t_total / d.iters, d.error / d.norm,
           lq_weighted_distance(w, out, NULL, n) / d.norm);
    lq_decomposition_free(&d);
    free(w), free(out), free(left), free(right), free(u), free(s), free(vt);
    return 0;
}
