/* Benchmark: the decode kernels of lq_cpu_linear (kernels/cpu/nf_gemv.h) on NF matrices:
 * the tile path (dequantize rows to fp32, then the row-wise kernel), the fused portable kernel
 * and the fused AVX2 one, for 1, 8 and 16 tokens. Prints GB/s of packed bytes (codes and scales
 * read per call) and ns per output row, and checks the kernels agree bit for bit.
 * Usage: bench_nf_gemv [seconds per figure]   (default 0.3; threads: LQ_THREADS) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/nf.h"
#include "core/parallel.h"
#include "core/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/nf_gemv.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Seconds per call, the mean over calls filling at least `budget` seconds. */
static double time_kernel(const struct lq_nf_matrix *q, const float *x, int n, float *y,
                          enum lq_nf_gemv_kernel kernel, double budget) {
    lq_cpu_quantized_gemv(q, x, n, y, kernel); /* warm the caches and the pool */
    int calls = 0;
    double start = now(), elapsed;
    do {
        lq_cpu_quantized_gemv(q, x, n, y, kernel);
        calls++;
        elapsed = now() - start;
    } while (elapsed < budget || calls < 3);
    return elapsed / calls;
}

int main(int argc, char **argv) {
    double budget = argc > 1 ? atof(argv[1]) : 0.3;
    const size_t shapes[][2] = {{576, 1536}, {4096, 4096}};
    const int bits[] = {2, 3, 4};
    const int counts[] = {1, 8, 16};
    enum { most_tokens = 16 };
    const enum lq_nf_gemv_kernel kernels[] = {LQ_NF_GEMV_TILE, LQ_NF_GEMV_PORTABLE,
                                              LQ_NF_GEMV_AVX2};
    printf("NF decode kernels, %d threads, avx2 %s; config (b0, 8, fp32, 64, 256)\n",
           lq_parallel_threads(), lq_nf_gemv_avx2_supported() ? "yes" : "no (portable runs)");
    printf("%-11s %3s %2s %-9s %10s %10s %8s\n", "shape", "b0", "n", "kernel", "GB/s", "ns/row",
           "vs tile");
    struct lq_rng rng;
    lq_rng_seed(&rng, 9);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        size_t rows = shapes[s][0], cols = shapes[s][1];
        float *a = malloc(rows * cols * sizeof *a), *x = malloc(most_tokens * cols * sizeof *x);
        float *y = malloc(most_tokens * rows * sizeof *y);
        float *reference = malloc(most_tokens * rows * sizeof *y);
        if (!a || !x || !y || !reference) return fprintf(stderr, "out of memory\n"), 1;
        lq_rng_fill_normal(&rng, a, rows * cols);
        lq_rng_fill_normal(&rng, x, most_tokens * cols);
        for (int b = 0; b < 3; b++) {
            struct lq_nf_config config = {bits[b], 8, LQ_SCALE_FP32, 64, 256};
            struct lq_nf_matrix q;
            struct lq_error err = {0};
            if (lq_nf_quantize(a, rows, cols, &config, &q, &err))
                return fprintf(stderr, "quantize: %s\n", err.message), 1;
            double bytes = (double)lq_nf_matrix_bytes(&q);
            for (int c = 0; c < 3; c++) {
                int n = counts[c];
                double tile_seconds = 0.0;
                lq_cpu_quantized_gemv(&q, x, n, reference, LQ_NF_GEMV_TILE);
                for (int k = 0; k < 3; k++) {
                    double seconds = time_kernel(&q, x, n, y, kernels[k], budget);
                    if (k == 0) tile_seconds = seconds;
                    int same = memcmp(y, reference, (size_t)n * rows * sizeof *y) == 0;
                    printf("%4zux%-6zu %3d %2d %-9s %10.2f %10.1f %7.2fx%s\n", rows, cols, bits[b],
                           n, lq_nf_gemv_kernel_name(kernels[k]), bytes / seconds * 1e-9,
                           seconds / (double)rows * 1e9, tile_seconds / seconds,
                           same ? "" : "  DIFFERS FROM TILE");
                    fflush(stdout);
                }
            }
            lq_nf_matrix_free(&q);
        }
        free(a), free(x), free(y), free(reference);
    }
    return 0;
}
