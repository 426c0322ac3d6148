/* The Jacobi eigensolver's kernel source itself (kernels/cuda/eig_jacobi_kernel.h), run on the
 * CPU: one pthread per CUDA thread of the block (32 x 16), __syncthreads as a barrier of all
 * of them, __shfl_xor_sync through a buffer between two barriers (the kernel only shuffles
 * where every thread of the block does). Shared memory, the upper triangle, lambda and info
 * are poisoned before each run, so a read of something never written or an element never
 * written shows. Results are checked against LAPACKE_dsyevd with eig_check.h's bounds and
 * against the host transcription's behaviour (test_jacobi_order.c): this is the kernel's
 * indexing, phases, dummy index, stopping, sort and output layout as the GPU would run them,
 * short of the GPU's memory model. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "tests/unit/lq_test.h"

#include "tests/unit/eig_check.h"

/* The CUDA words the kernel uses, for a CPU thread per CUDA thread. */
struct emulated_index {
    unsigned x, y;
};
static _Thread_local struct emulated_index emulated_thread;
static pthread_barrier_t emulated_barrier;
static double *emulated_shared;
static double emulated_lanes[32 * 16];

static void emulated_syncthreads(void) {
    pthread_barrier_wait(&emulated_barrier);
}

static double emulated_shuffle_xor(double v, int offset) {
    const unsigned base = emulated_thread.y * 32;
    emulated_lanes[base + emulated_thread.x] = v;
    emulated_syncthreads();
    const double other = emulated_lanes[base + (emulated_thread.x ^ (unsigned)offset)];
    emulated_syncthreads();
    return other;
}

#define __global__
#define __device__
#define __launch_bounds__(threads)
#define __syncthreads() emulated_syncthreads()
#define __shfl_xor_sync(mask, v, offset) emulated_shuffle_xor((v), (offset))
#define threadIdx emulated_thread
#define EIG_HOST_DEVICE
#define EIG_DECLARE_SHARED double *eig_shared = emulated_shared

#include "kernels/cuda/eig_jacobi_kernel.h"

#define EMULATED_THREADS (EIG_WARP * EIG_ROWS)

struct launch {
    double *a, *lambda;
    int n, *info;
    struct emulated_index index;
};

static void *run_thread(void *arg) {
    struct launch *l = arg;
    emulated_thread = l->index;
    eig_jacobi_kernel(l->a, l->n, l->lambda, l->info);
    return NULL;
}

/* One launch of the kernel on a (n x n column-major, lower triangle read, upper poisoned
 * here), lambda and info poisoned first; returns info. */
static int launch_kernel(const double *a, int n, double *lambda, double *v) {
    static pthread_t threads[EMULATED_THREADS];
    static struct launch launches[EMULATED_THREADS];
    /* lq_eig_jacobi_shared_bytes(n), in whole doubles, all NaN (as ints: a large negative) */
    const size_t shared_doubles = eig_doubles(n) + (eig_ints(n) * sizeof(int) + 7) / 8;
    emulated_shared = malloc(shared_doubles * sizeof(double));
    if (!emulated_shared) abort();
    for (size_t k = 0; k < shared_doubles; k++) emulated_shared[k] = NAN;
    for (int c = 0; c < n; c++)
        for (int r = 0; r < n; r++) v[r + (size_t)c * n] = r >= c ? a[r + (size_t)c * n] : NAN;
    for (int k = 0; k < n; k++) lambda[k] = NAN;
    int info = -12345;
    CHECK(pthread_barrier_init(&emulated_barrier, NULL, EMULATED_THREADS) == 0);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, (size_t)1 << 18); /* the kernel needs little stack */
    for (int t = 0; t < EMULATED_THREADS; t++) {
        launches[t] =
            (struct launch){v, lambda, n, &info, {(unsigned)(t % 32), (unsigned)(t / 32)}};
        const int created = pthread_create(&threads[t], &attr, run_thread, &launches[t]);
        if (created != 0) {
            fprintf(stderr, "pthread_create %d: %s\n", t, strerror(created));
            abort();
        }
    }
    for (int t = 0; t < EMULATED_THREADS; t++) pthread_join(threads[t], NULL);
    pthread_attr_destroy(&attr);
    pthread_barrier_destroy(&emulated_barrier);
    free(emulated_shared);
    return info;
}

static struct lq_rng rng;

static void check_kernel(const char *what, const double *a, int n) {
    double *v = malloc((size_t)n * n * sizeof(double)),
           *ref = malloc((size_t)n * n * sizeof(double));
    double *lambda = malloc((size_t)n * sizeof(double)),
           *ref_lambda = malloc((size_t)n * sizeof(double));
    if (!v || !ref || !lambda || !ref_lambda) abort();
    const int info = launch_kernel(a, n, lambda, v);
    CHECK_MSG(info == 0, "%s n = %d: info %d", what, n, info);
    memcpy(ref, a, (size_t)n * n * sizeof(double));
    CHECK(LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'L', n, ref, n, ref_lambda) == 0);
    eig_check_solution(what, a, n, lambda, v, ref_lambda, "emulated kernel");
    free(v), free(ref), free(lambda), free(ref_lambda);
}

/* Fewer sizes than the transcription's test: 512 threads per launch on a CPU are slow. */
static const int sizes[] = {1, 2, 3, 17, 74, 75};

static void test_kernel_random(void) {
    lq_rng_seed(&rng, 74);
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        double *a = eig_check_random(&rng, sizes[i]);
        check_kernel("random", a, sizes[i]);
        free(a);
    }
}

static void test_kernel_awkward(void) {
    lq_rng_seed(&rng, 75);
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        const int n = sizes[i];
        double *a = eig_check_repeated(&rng, n);
        eig_check_zero_row(a, n, n / 2);
        check_kernel("zero row", a, n);
        free(a);
        a = eig_check_diagonal(&rng, n);
        check_kernel("diagonal", a, n);
        free(a);
        a = eig_check_gram(&rng, n);
        for (size_t k = 0; k < (size_t)n * n; k++) a[k] *= 1e-200;
        check_kernel("tiny gram", a, n);
        free(a);
    }
}

static void test_kernel_not_finite(void) {
    eig_check_not_finite(launch_kernel, LQ_EIG_JACOBI_NOT_FINITE);
}

LQ_TEST_MAIN(LQ_TEST(test_kernel_random), LQ_TEST(test_kernel_awkward),
             LQ_TEST(test_kernel_not_finite))
