/* CholeskyQR's tiled Cholesky kernel (kernels/cuda/cholesky_qr_cuda.cu: cholqr_tiled_kernel
 * and cholqr_invert_columns) run on the CPU: its loops transcribed per thread index (warp,
 * lane), the threads of each span between two barriers run one after the other, and a warp's
 * lanes in step for the shuffle. This checks the indexing without a GPU:
 *   - every element the kernel reads in shared memory was written before the last barrier,
 *     or by the reading thread itself (no race: each span is checked for a thread reading or
 *     writing what another thread of the span writes), and the upper triangle, never written,
 *     is never read (it holds NaN);
 *   - every output element is written exactly once;
 *   - L and L⁻¹ match the textbook Cholesky and inverse (tests/unit/cholesky_reference.h);
 *   - the pivot test, the identity on failure, the flag, the first/skip behaviour.
 * The GPU test (tests/kernels/test_cuda_ops.c, case test_cholqr) runs the kernel itself. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cholesky_reference.h"
#include "core/rng.h"
#include "lq_test.h"

/* the kernel's constants (cholesky_qr_cuda.cu / .cuh) */
#define TILE 32
#define MAX_COLUMNS 160
#define ROWS_PER_LANE ((MAX_COLUMNS + TILE - 1) / TILE)
#define PIVOT_FLOOR 1e-10

/* Who touched each shared element since the last barrier: -1 nobody, a thread id, or -2
 * (several threads read it); and whether it was ever written. */
struct span_tracker {
    int *writer, *reader;
    unsigned char *written;
    size_t count;
    int races, unwritten_reads;
};

static void span_begin(struct span_tracker *t) {
    for (size_t e = 0; e < t->count; e++) t->writer[e] = -1, t->reader[e] = -1;
}

/* A read of what the last barrier published (the pivot, the diagonal): every thread may. */
static double shared_read_published(struct span_tracker *t, const double *a, size_t e) {
    if (!t->written[e] || t->writer[e] != -1) t->unwritten_reads++;
    return a[e];
}

static double shared_read(struct span_tracker *t, const double *a, size_t e, int thread) {
    if (!t->written[e]) t->unwritten_reads++;
    if (t->writer[e] != -1 && t->writer[e] != thread) t->races++;
    if (t->reader[e] == -1)
        t->reader[e] = thread;
    else if (t->reader[e] != thread)
        t->reader[e] = -2;
    return a[e];
}

static void shared_write(struct span_tracker *t, double *a, size_t e, int thread, double value) {
    if (t->writer[e] != -1 && t->writer[e] != thread) t->races++;
    if (t->reader[e] != -1 && t->reader[e] != thread) t->races++;
    t->writer[e] = thread;
    t->written[e] = 1;
    a[e] = value;
}

struct emulation {
    int races;           /* shared-memory races found */
    int bad_writes;      /* output elements written other than once */
    int unwritten_reads; /* reads of shared elements never written (NaN) */
};

/* One warp's columns c and c + 1 of L⁻¹ (cholqr_invert_columns): lanes in step. Shared
 * memory is only read here, after the last barrier. */
static void emulate_invert_columns(const double *a, int n, int c, const double *root,
                                   const double *reciprocal, double *g, int *writes) {
    double x[TILE][ROWS_PER_LANE], z[TILE][ROWS_PER_LANE];
    for (int lane = 0; lane < TILE; lane++)
        for (int r = 0; r < ROWS_PER_LANE; r++) {
            x[lane][r] = r == 0 && lane == 0 ? 1.0 : 0.0;
            z[lane][r] = r == 0 && lane == 1 ? 1.0 : 0.0;
        }
    for (int b = 0; b < ROWS_PER_LANE; b++) {
        const int base = c + TILE * b;
        if (base >= n) break;
        const int steps = TILE < n - base ? TILE : n - base;
        for (int owner = 0; owner < steps; owner++) {
            const int j = base + owner;
            /* __shfl_sync(..., x[b], owner), (..., z[b], owner) */
            const double shuffled_x = x[owner][b], shuffled_z = z[owner][b];
            for (int lane = 0; lane < TILE; lane++) {
                const int at = j * n + c + lane;
                const double inverse = reciprocal[j], scale = root[j];
                const double y = shuffled_x * inverse, v = shuffled_z * inverse;
                if (lane > owner && base + lane < n) {
                    const double l = a[at + TILE * b];
                    x[lane][b] = fma(-l, y, x[lane][b]);
                    z[lane][b] = fma(-l, v, z[lane][b]);
                } else if (lane == owner) {
                    x[lane][b] = y * scale;
                    z[lane][b] = v * scale;
                }
                for (int r = b + 1; r < ROWS_PER_LANE; r++)
                    if (c + TILE * r + lane < n) {
                        const double l = a[at + TILE * r];
                        x[lane][r] = fma(-l, y, x[lane][r]);
                        z[lane][r] = fma(-l, v, z[lane][r]);
                    }
            }
        }
    }
    const int second = c + 1 < n;
    for (int lane = 0; lane < TILE; lane++) {
        for (int r = 0; r < ROWS_PER_LANE; r++) {
            const int i = c + TILE * r + lane;
            if (i < n) {
                g[i + (size_t)c * n] = x[lane][r], writes[i + (size_t)c * n]++;
                if (second)
                    g[i + (size_t)(c + 1) * n] = z[lane][r], writes[i + (size_t)(c + 1) * n]++;
            }
        }
        for (int i = lane; i < c; i += TILE) {
            g[i + (size_t)c * n] = 0.0, writes[i + (size_t)c * n]++;
            if (second) g[i + (size_t)(c + 1) * n] = 0.0, writes[i + (size_t)(c + 1) * n]++;
        }
    }
}

/* cholqr_tiled_kernel on g (n x n, in and out) with *failed the device flag. Counts, in e,
 * what went wrong with the indexing; elements of g the kernel must write are checked
 * (writes == 1), the others must keep their value (writes == 0). */
static void emulate_tiled_kernel(double *g, int n, int first, int invert, int *failed,
                                 struct emulation *e) {
    const size_t count = (size_t)n * n;
    double *a = malloc(count * sizeof *a);
    double diagonal[MAX_COLUMNS], root[MAX_COLUMNS], reciprocal[MAX_COLUMNS];
    int *writes = calloc(count, sizeof *writes);
    struct span_tracker t = {
        malloc(count * sizeof(int)), malloc(count * sizeof(int)), calloc(count, 1), count, 0, 0};
    for (size_t i = 0; i < count; i++) a[i] = NAN; /* shared memory is not initialised */
    memset(e, 0, sizeof *e);

    const int skip = first ? 0 : *failed;
    span_begin(&t);
    for (int warp = 0; warp < TILE; warp++)
        for (int lane = 0; lane < TILE; lane++) {
            const int thread = lane + TILE * warp;
            for (int k = warp; k < n; k += TILE) {
                for (int i = k + lane; i < n; i += TILE)
                    shared_write(&t, a, i + (size_t)k * n, thread, g[i + (size_t)k * n]);
                if (lane == 0) diagonal[k] = g[k + (size_t)k * n];
            }
        }
    /* __syncthreads() */
    int bad = skip != 0;
    for (int j = 0; j < n && !bad; j++) {
        span_begin(&t);
        const double pivot = shared_read_published(&t, a, j + (size_t)j * n);
        if (!(pivot > PIVOT_FLOOR * diagonal[j]) || !(pivot <= DBL_MAX)) {
            bad = 1;
            break;
        }
        const double inverse = 1.0 / pivot;
        for (int warp = 0; warp < TILE; warp++)
            for (int lane = 0; lane < TILE; lane++) {
                const int thread = lane + TILE * warp;
                for (int k = j + 1 + warp; k < n; k += TILE) {
                    const double scaled = shared_read(&t, a, k + (size_t)j * n, thread) * inverse;
                    const int rows = n - k;
                    double left[ROWS_PER_LANE], right[ROWS_PER_LANE];
                    for (int p = 0; p < ROWS_PER_LANE; p++) {
                        const int i = k + lane + TILE * p;
                        left[p] = right[p] = 0.0;
                        if (TILE * p < rows && i < n) {
                            left[p] = shared_read(&t, a, i + (size_t)j * n, thread);
                            right[p] = shared_read(&t, a, i + (size_t)k * n, thread);
                        }
                    }
                    for (int p = 0; p < ROWS_PER_LANE; p++) {
                        const int i = k + lane + TILE * p;
                        if (TILE * p < rows && i < n)
                            shared_write(&t, a, i + (size_t)k * n, thread,
                                         right[p] - left[p] * scaled);
                    }
                }
            }
        /* __syncthreads() */
    }
    if (bad) {
        for (int warp = 0; warp < TILE; warp++)
            for (int lane = 0; lane < TILE; lane++)
                for (int k = warp; k < n; k += TILE)
                    for (int i = lane; i < n; i += TILE)
                        g[i + (size_t)k * n] = i == k ? 1.0 : 0.0, writes[i + (size_t)k * n]++;
        *failed = 1;
    } else {
        span_begin(&t);
        for (int k = 0; k < n; k++) {
            const double d = shared_read_published(&t, a, k + (size_t)k * n);
            root[k] = sqrt(d);
            reciprocal[k] = 1.0 / d;
        }
        /* __syncthreads() */
        if (invert) {
            const int pairs = (n + 1) / 2;
            for (int warp = 0; warp < TILE; warp++)
                for (int round = 0; round * TILE < pairs; round++) {
                    const int pair = round * TILE + (round & 1 ? TILE - 1 - warp : warp);
                    if (pair < pairs)
                        emulate_invert_columns(a, n, 2 * pair, root, reciprocal, g, writes);
                }
        } else {
            for (int warp = 0; warp < TILE; warp++)
                for (int lane = 0; lane < TILE; lane++)
                    for (int k = warp; k < n; k += TILE)
                        for (int i = k + lane; i < n; i += TILE) {
                            const size_t at = i + (size_t)k * n;
                            g[at] = i == k ? root[k] : a[at] / root[k];
                            writes[at]++;
                        }
        }
        if (first) *failed = 0;
    }
    /* what must have been written once: everything (identity, or L⁻¹ with its zeros), or the
     * lower triangle (L); the upper triangle of L is left alone */
    for (int k = 0; k < n; k++)
        for (int i = 0; i < n; i++) {
            const int expected = bad || invert || i >= k ? 1 : 0;
            if (writes[i + (size_t)k * n] != expected) e->bad_writes++;
        }
    e->races = t.races;
    e->unwritten_reads = t.unwritten_reads;
    free(t.writer), free(t.reader), free(t.written), free(writes), free(a);
}

static const int sizes[] = {1, 2, 3, 17, 31, 32, 33, 63, 64, 65, 74, 75, 128, 159, 160};
#define SIZES (sizeof sizes / sizeof sizes[0])

/* An upper-triangle marker the kernel must leave in place when it returns L. */
#define UPPER_MARK 12345.0

static void fill_upper(double *g, int n) {
    for (int k = 1; k < n; k++)
        for (int i = 0; i < k; i++) g[i + (size_t)k * n] = UPPER_MARK;
}

static void test_factor_and_inverse(void) {
    struct lq_rng rng;
    lq_rng_seed(&rng, 74);
    for (size_t s = 0; s < SIZES; s++) {
        const int n = sizes[s];
        const size_t count = (size_t)n * n;
        struct cholesky_reference_case c;
        CHECK(cholesky_reference_case_make(&rng, n, &c) == 0);
        const double *gram = c.gram, *l = c.l, *inverse = c.inverse;
        double *out = malloc(count * sizeof *out);
        const double tolerance = cholesky_reference_tolerance(gram, l, inverse, n);
        for (int invert = 0; invert <= 1; invert++) {
            memcpy(out, gram, count * sizeof *out);
            fill_upper(out, n); /* only the lower triangle may be read */
            int failed = 1;     /* the first pass resets the flag */
            struct emulation e;
            emulate_tiled_kernel(out, n, 1, invert, &failed, &e);
            CHECK_MSG(e.races == 0 && e.bad_writes == 0 && e.unwritten_reads == 0,
                      "n %d invert %d: %d races, %d bad writes, %d unwritten reads", n, invert,
                      e.races, e.bad_writes, e.unwritten_reads);
            CHECK_MSG(failed == 0, "n %d invert %d: failed", n, invert);
            const double error =
                cholesky_reference_error(out, invert ? inverse : l, gram, n, invert);
            CHECK_MSG(error <= tolerance, "n %d invert %d: error %.3g > %.3g", n, invert, error,
                      tolerance);
            for (int k = 1; k < n; k++)
                for (int i = 0; i < k; i++) {
                    const double upper = out[i + (size_t)k * n];
                    CHECK_MSG(invert ? upper == 0.0 : upper == UPPER_MARK,
                              "n %d invert %d: upper (%d, %d) = %g", n, invert, i, k, upper);
                }
        }
        cholesky_reference_case_free(&c);
        free(out);
    }
}

static int is_identity(const double *g, int n) {
    for (int k = 0; k < n; k++)
        for (int i = 0; i < n; i++)
            if (g[i + (size_t)k * n] != (i == k ? 1.0 : 0.0)) return 0;
    return 1;
}

/* A nearly dependent last column (cholesky_reference_dependent_gram) fails the pivot test; so
 * does a NaN or an infinity in the lower triangle of a regular G. */
static void test_pivot_failures(void) {
    struct lq_rng rng;
    lq_rng_seed(&rng, 75);
    const int ns[] = {2, 17, 74, 160};
    for (size_t s = 0; s < sizeof ns / sizeof ns[0]; s++) {
        const int n = ns[s];
        const size_t count = (size_t)n * n;
        double *gram = malloc(count * sizeof *gram), *out = malloc(count * sizeof *out);
        cholesky_reference_dependent_gram(&rng, n, gram);
        double *regular = malloc(count * sizeof *regular);
        cholesky_reference_gram(&rng, n, regular);
        for (int variant = 0; variant < 3; variant++)
            for (int invert = 0; invert <= 1; invert++) {
                memcpy(out, variant == 0 ? gram : regular, count * sizeof *out);
                if (variant == 1) out[n - 1] = NAN;      /* (n − 1, 0) */
                if (variant == 2) out[n - 1] = INFINITY; /* (n − 1, 0) */
                int failed = 0;
                struct emulation e;
                emulate_tiled_kernel(out, n, 1, invert, &failed, &e);
                CHECK_MSG(failed == 1 && is_identity(out, n) && e.races == 0 && e.bad_writes == 0,
                          "n %d variant %d invert %d: failed %d", n, variant, invert, failed);
            }
        free(gram), free(out), free(regular);
    }
}

/* The second pass after a failed first only writes the identity and keeps the flag; after a
 * successful first it factors and leaves the flag at 0. */
static void test_first_and_skip(void) {
    struct lq_rng rng;
    lq_rng_seed(&rng, 76);
    const int n = 74;
    const size_t count = (size_t)n * n;
    struct cholesky_reference_case c;
    CHECK(cholesky_reference_case_make(&rng, n, &c) == 0);
    const double *gram = c.gram, *l = c.l, *inverse = c.inverse;
    double *out = malloc(count * sizeof *out);
    struct emulation e;
    for (int invert = 0; invert <= 1; invert++) {
        memcpy(out, gram, count * sizeof *out);
        int failed = 1;
        emulate_tiled_kernel(out, n, 0, invert, &failed, &e);
        CHECK(failed == 1 && is_identity(out, n) && e.bad_writes == 0);
        memcpy(out, gram, count * sizeof *out);
        failed = 0;
        emulate_tiled_kernel(out, n, 0, invert, &failed, &e);
        CHECK(failed == 0 && e.bad_writes == 0);
        CHECK(cholesky_reference_error(out, invert ? inverse : l, gram, n, invert) <=
              cholesky_reference_tolerance(gram, l, inverse, n));
    }
    cholesky_reference_case_free(&c);
    free(out);
}

LQ_TEST_MAIN(LQ_TEST(test_factor_and_inverse), LQ_TEST(test_pivot_failures),
             LQ_TEST(test_first_and_skip))
