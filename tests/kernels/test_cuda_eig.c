/* The one-launch Jacobi eigensolver (kernels/cuda/eig_jacobi_cuda.cuh) on the GPU against
 * cuSOLVER's Dsyevd on the same matrices: random symmetric ones of sizes 1 to 138, three
 * clusters of repeated eigenvalues, a zero row, a diagonal one, a Gram matrix of condition
 * 1e12, and 1e±200 scalings. Eigenvalues ascending and within 1e-12·‖A‖ of Dsyevd's,
 * ‖A·V − V·Λ‖ <= 1e-12·‖A‖·n, ‖VᵀV − I‖ <= 1e-12·n (tests/unit/eig_check.h). The upper
 * triangle, lambda and info are poisoned before each run, so an element the kernel reads
 * but should not, or never writes, fails the check. Also: non-finite input, refused sizes,
 * and (LQ_TEST_VERBOSE or --time) the median time of one solve against Dsyevd's.
 * Without a usable GPU the test exits 77: meson's "skipped".
 * Usage: test_cuda_eig [CASE] (CASE: a case name). */
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/eig_jacobi_cuda.cuh"
#include "kernels/cuda/eig_jacobi_math.h"
#include "tests/unit/lq_test.h"

#include "tests/unit/eig_check.h"

#define POISON_INFO (-12345)

static struct lq_rng rng;
static cusolverDnHandle_t solver;
static cudaStream_t stream;
static int device;

#define CUDA_CHECK(call)                                                                           \
    do {                                                                                           \
        cudaError_t check_status_ = (call);                                                        \
        CHECK_MSG(check_status_ == cudaSuccess, "%s: %s", #call,                                   \
                  cudaGetErrorString(check_status_));                                              \
    } while (0)

/* Dsyevd's eigenvalues of a (lower triangle). */
static int reference_eigenvalues(const double *a, int n, double *ref_lambda) {
    double *d_a = NULL, *d_lambda = NULL, *d_work = NULL;
    int *d_info = NULL, lwork = 0, info = -1, ok = 0;
    const size_t bytes = (size_t)n * n * sizeof(double);
    if (cudaMalloc((void **)&d_a, bytes) || cudaMalloc((void **)&d_lambda, n * sizeof(double)) ||
        cudaMalloc((void **)&d_info, sizeof(int)))
        goto done;
    if (cudaMemcpy(d_a, a, bytes, cudaMemcpyHostToDevice)) goto done;
    if (cusolverDnDsyevd_bufferSize(solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                    d_a, n, d_lambda, &lwork))
        goto done;
    if (cudaMalloc((void **)&d_work, (size_t)(lwork > 0 ? lwork : 1) * sizeof(double))) goto done;
    if (cusolverDnDsyevd(solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, d_a, n,
                         d_lambda, d_work, lwork, d_info))
        goto done;
    if (cudaMemcpy(&info, d_info, sizeof info, cudaMemcpyDeviceToHost) || info != 0) goto done;
    if (cudaMemcpy(ref_lambda, d_lambda, n * sizeof(double), cudaMemcpyDeviceToHost)) goto done;
    ok = 1;
done:
    cudaFree(d_a), cudaFree(d_lambda), cudaFree(d_info), cudaFree(d_work);
    CHECK_MSG(ok, "cuSOLVER Dsyevd on %d x %d failed (info %d)", n, n, info);
    return ok;
}

/* Runs lq_eig_jacobi on a's lower triangle (upper poisoned with NaN, lambda with NaN, info
 * with POISON_INFO); returns the info, the eigenvalues in lambda and vectors in v. */
static int jacobi_on_device(const double *a, int n, double *lambda, double *v) {
    const size_t bytes = (size_t)n * n * sizeof(double);
    double *host = malloc(bytes), *d_a = NULL, *d_lambda = NULL;
    int *d_info = NULL, info = POISON_INFO;
    if (!host) abort();
    for (int c = 0; c < n; c++)
        for (int r = 0; r < n; r++) host[r + (size_t)c * n] = r >= c ? a[r + (size_t)c * n] : NAN;
    for (int k = 0; k < n; k++) lambda[k] = NAN;
    CUDA_CHECK(cudaMalloc((void **)&d_a, bytes));
    CUDA_CHECK(cudaMalloc((void **)&d_lambda, n * sizeof(double)));
    CUDA_CHECK(cudaMalloc((void **)&d_info, sizeof(int)));
    if (d_a && d_lambda && d_info) {
        CUDA_CHECK(cudaMemcpy(d_a, host, bytes, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(d_lambda, lambda, n * sizeof(double), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(d_info, &info, sizeof info, cudaMemcpyHostToDevice));
        struct lq_error err = {0};
        const int rc = lq_eig_jacobi(stream, d_a, n, d_lambda, d_info, &err);
        CHECK_MSG(rc == 0, "lq_eig_jacobi n = %d: %s", n, err.message);
        CUDA_CHECK(cudaStreamSynchronize(stream));
        CUDA_CHECK(cudaMemcpy(v, d_a, bytes, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(lambda, d_lambda, n * sizeof(double), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(&info, d_info, sizeof info, cudaMemcpyDeviceToHost));
    }
    cudaFree(d_a), cudaFree(d_lambda), cudaFree(d_info);
    free(host);
    return info;
}

/* Solves a on the device and checks it against Dsyevd. */
static void check_device(const char *what, const double *a, int n) {
    if (!lq_eig_jacobi_supported(device, n)) {
        printf("  %-10s n = %3d: not supported on this device (%zu bytes of shared memory)\n", what,
               n, lq_eig_jacobi_shared_bytes(n));
        return;
    }
    double *lambda = malloc(n * sizeof(double)), *ref = malloc(n * sizeof(double));
    double *v = malloc((size_t)n * n * sizeof(double));
    if (!lambda || !ref || !v) abort();
    const int info = jacobi_on_device(a, n, lambda, v);
    CHECK_MSG(info == 0, "%s n = %d: info %d", what, n, info);
    if (reference_eigenvalues(a, n, ref)) eig_check_solution(what, a, n, lambda, v, ref, "GPU");
    free(lambda), free(ref), free(v);
}

static void test_random(void) {
    lq_rng_seed(&rng, 74);
    for (int i = 0; i < EIG_CHECK_SIZE_COUNT; i++)
        for (int trial = 0; trial < 3; trial++) {
            double *a = eig_check_random(&rng, eig_check_sizes[i]);
            check_device("random", a, eig_check_sizes[i]);
            free(a);
        }
}

static void test_awkward(void) {
    lq_rng_seed(&rng, 75);
    eig_check_awkward(&rng, check_device);
}

/* Inf or NaN in the lower triangle: info says so and every output is NaN. */
static void test_not_finite(void) {
    eig_check_not_finite(jacobi_on_device, LQ_EIG_JACOBI_NOT_FINITE);
    CHECK(strcmp(lq_eig_jacobi_info_text(LQ_EIG_JACOBI_NOT_FINITE), "converged") != 0);
}

/* Sizes the device cannot hold, and no matrix, are refused with a message; nothing runs. */
static void test_refused(void) {
    struct lq_error err = {0};
    double *d = NULL;
    int *info = NULL;
    CUDA_CHECK(cudaMalloc((void **)&d, sizeof(double)));
    CUDA_CHECK(cudaMalloc((void **)&info, sizeof(int)));
    CHECK(lq_eig_jacobi(stream, d, 0, d, info, &err) == LQ_EINVAL && err.message[0]);
    int too_big = 2;
    while (lq_eig_jacobi_supported(device, too_big)) too_big++;
    CHECK(too_big > 74); /* the decomposition's sketch fits on any device with 100 KiB */
    memset(&err, 0, sizeof err);
    CHECK(lq_eig_jacobi(stream, d, too_big, d, info, &err) == LQ_EINVAL &&
          strstr(err.message, "shared memory") != NULL);
    printf("  largest n on this device: %d\n", too_big - 1);
    cudaFree(d), cudaFree(info);
}

static int compare_floats(const void *x, const void *y) {
    const float a = *(const float *)x, b = *(const float *)y;
    return (a > b) - (a < b);
}

/* Median device time of one solve of a 74 x 74 Gram-like matrix (the decomposition's
 * sketch at rank 64), Jacobi against Dsyevd, each timed with events around 15 runs. */
static void test_time(void) {
    if (!getenv("LQ_TEST_VERBOSE")) return;
    const int n = 74, runs = 15;
    lq_rng_seed(&rng, 76);
    double *a = eig_check_gram(&rng, n);
    double *d_a = NULL, *d_src = NULL, *d_lambda = NULL, *d_work = NULL;
    int *d_info = NULL, lwork = 0;
    const size_t bytes = (size_t)n * n * sizeof(double);
    CUDA_CHECK(cudaMalloc((void **)&d_a, bytes));
    CUDA_CHECK(cudaMalloc((void **)&d_src, bytes));
    CUDA_CHECK(cudaMalloc((void **)&d_lambda, n * sizeof(double)));
    CUDA_CHECK(cudaMalloc((void **)&d_info, sizeof(int)));
    CUDA_CHECK(cudaMemcpy(d_src, a, bytes, cudaMemcpyHostToDevice));
    CHECK(cusolverDnDsyevd_bufferSize(solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                      d_a, n, d_lambda, &lwork) == CUSOLVER_STATUS_SUCCESS);
    CUDA_CHECK(cudaMalloc((void **)&d_work, (size_t)(lwork > 0 ? lwork : 1) * sizeof(double)));
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    float ms[2][15];
    for (int method = 0; method < 2; method++)
        for (int run = 0; run < runs + 2; run++) { /* two warm-up runs */
            CUDA_CHECK(cudaMemcpyAsync(d_a, d_src, bytes, cudaMemcpyDeviceToDevice, stream));
            CUDA_CHECK(cudaEventRecord(start, stream));
            if (method == 0) {
                struct lq_error err = {0};
                CHECK(lq_eig_jacobi(stream, d_a, n, d_lambda, d_info, &err) == 0);
            } else {
                CHECK(cusolverDnDsyevd(solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                       d_a, n, d_lambda, d_work, lwork,
                                       d_info) == CUSOLVER_STATUS_SUCCESS);
            }
            CUDA_CHECK(cudaEventRecord(stop, stream));
            CUDA_CHECK(cudaEventSynchronize(stop));
            if (run >= 2) CUDA_CHECK(cudaEventElapsedTime(&ms[method][run - 2], start, stop));
        }
    qsort(ms[0], runs, sizeof(float), compare_floats);
    qsort(ms[1], runs, sizeof(float), compare_floats);
    printf("  74 x 74 Gram (condition 1e12): Jacobi %.3f ms, Dsyevd %.3f ms (median of %d)\n",
           ms[0][runs / 2], ms[1][runs / 2], runs);
    cudaEventDestroy(start), cudaEventDestroy(stop);
    cudaFree(d_a), cudaFree(d_src), cudaFree(d_lambda), cudaFree(d_info), cudaFree(d_work);
    free(a);
}

int main(int argc, char **argv) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        printf("SKIP: no usable CUDA device\n");
        return 77;
    }
    if (cudaGetDevice(&device) != cudaSuccess || cudaStreamCreate(&stream) != cudaSuccess ||
        cusolverDnCreate(&solver) != CUSOLVER_STATUS_SUCCESS ||
        cusolverDnSetStream(solver, stream) != CUSOLVER_STATUS_SUCCESS) {
        printf("SKIP: cannot set up CUDA and cuSOLVER\n");
        return 77;
    }
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--time") == 0) setenv("LQ_TEST_VERBOSE", "1", 1);
    static const struct lq_test_case cases[] = {LQ_TEST(test_random), LQ_TEST(test_awkward),
                                                LQ_TEST(test_not_finite), LQ_TEST(test_refused),
                                                LQ_TEST(test_time)};
    const int filtered = argc > 1 && strcmp(argv[1], "--time") != 0;
    const int rc = lq_test_run(cases, sizeof cases / sizeof cases[0], filtered ? argc : 1, argv);
    cusolverDnDestroy(solver);
    cudaStreamDestroy(stream);
    return rc;
}
