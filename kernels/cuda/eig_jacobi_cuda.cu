// The one-launch Jacobi eigensolver (eig_jacobi_cuda.cuh says what and why).
#include <math.h>

#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/eig_jacobi_cuda.cuh"
#include "kernels/cuda/eig_jacobi_math.h"

#define EIG_HOST_DEVICE __host__ __device__
#define EIG_DECLARE_SHARED extern __shared__ double eig_shared[]
#include "kernels/cuda/eig_jacobi_kernel.h"

size_t lq_eig_jacobi_shared_bytes(int n) {
    return eig_doubles(n) * sizeof(double) + eig_ints(n) * sizeof(int);
}

int lq_eig_jacobi_supported(int device, int n) {
    if (n < 1 || n > EIG_MAX_N) return 0;
    int optin = 0;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
        cudaSuccess)
        return 0;
    return lq_eig_jacobi_shared_bytes(n) <= (size_t)optin;
}

int lq_eig_jacobi(cudaStream_t stream, double *a, int n, double *lambda, int *info,
                  struct lq_error *err) {
    if (!a || !lambda || !info || n < 1)
        return lq_error_set(err, LQ_EINVAL, "Jacobi eigensolver: no matrix (n = %d)", n);
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess) return lq_cuda_fail(status, "cudaGetDevice", err);
    if (!lq_eig_jacobi_supported(device, n))
        return lq_error_set(err, LQ_EINVAL,
                            "Jacobi eigensolver: a %d x %d matrix needs %zu bytes of shared "
                            "memory, more than a thread block of device %d has",
                            n, n, lq_eig_jacobi_shared_bytes(n), device);
    const size_t bytes = lq_eig_jacobi_shared_bytes(n);
    if (bytes > 48 * 1024) {
        // The device's whole opt-in limit, not this n's size: the same value from every
        // thread, so concurrent solves of other sizes cannot lower it under a launch.
        int optin = 0;
        status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        if (status == cudaSuccess)
            status = cudaFuncSetAttribute(eig_jacobi_kernel,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
        if (status != cudaSuccess)
            return lq_cuda_fail(status, "Jacobi eigensolver: shared memory size", err);
    }
    eig_jacobi_kernel<<<1, dim3(EIG_WARP, EIG_ROWS), bytes, stream>>>(a, n, lambda, info);
    status = cudaGetLastError();
    if (status != cudaSuccess) return lq_cuda_fail(status, "Jacobi eigensolver kernel", err);
    return LQ_OK;
}

const char *lq_eig_jacobi_info_text(int info) {
    switch (info) {
    case 0:
        return "converged";
    case LQ_EIG_JACOBI_UNCONVERGED:
        return "no convergence in the sweep limit";
    case LQ_EIG_JACOBI_NOT_FINITE:
        return "the matrix holds Inf or NaN";
    default:
        return "unknown status";
    }
}
