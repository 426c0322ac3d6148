// Device probe of the CUDA build: counts devices and touches cuBLAS and cuSOLVER so the
// toolchain and libraries are proven at build and test time, on machines with or without a GPU.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <stdio.h>

extern "C" {
#include "kernels/device_probe.h"
}
#include "kernels/cuda/connections_cuda.h"

// A kernel so that the build really runs nvcc's device compilation, and the probe on a GPU
// really launches code: each thread writes its index.
__global__ void lq_probe_iota(int *out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = i;
}

extern "C" int lq_cuda_compiled(void) {
    return 1;
}

extern "C" int lq_cuda_device_count(int *count, struct lq_error *err) {
    *count = 0;
    int devices = 0;
    lq_cuda_default_connections();
    cudaError_t status = cudaGetDeviceCount(&devices);
    if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver) {
        cudaGetLastError(); // clear the sticky error: no GPU here is a normal state
        return LQ_OK;
    }
    if (status != cudaSuccess)
        return lq_error_set(err, LQ_EIO, "cudaGetDeviceCount: %s", cudaGetErrorString(status));
    *count = devices;
    return LQ_OK;
}

static int launch_check(struct lq_error *err) {
    const int n = 1000;
    int *device_out = nullptr;
    int host[1000];
    lq_cuda_default_connections();
    cudaError_t status = cudaMalloc(&device_out, n * sizeof(int));
    if (status != cudaSuccess)
        return lq_error_set(err, LQ_ENOMEM, "cudaMalloc: %s", cudaGetErrorString(status));
    lq_probe_iota<<<(n + 255) / 256, 256>>>(device_out, n);
    status = cudaGetLastError();
    if (status == cudaSuccess)
        status = cudaMemcpy(host, device_out, n * sizeof(int), cudaMemcpyDeviceToHost);
    cudaFree(device_out);
    if (status != cudaSuccess)
        return lq_error_set(err, LQ_EIO, "probe kernel: %s", cudaGetErrorString(status));
    for (int i = 0; i < n; i++)
        if (host[i] != i)
            return lq_error_set(err, LQ_ENUMERIC, "probe kernel wrote %d at %d", host[i], i);
    return LQ_OK;
}

extern "C" int lq_cuda_device_describe(int index, char *buffer, int buffer_size,
                                       struct lq_error *err) {
    cudaDeviceProp properties;
    cudaError_t status = cudaGetDeviceProperties(&properties, index);
    if (status != cudaSuccess)
        return lq_error_set(err, LQ_EINVAL, "CUDA device %d: %s", index,
                            cudaGetErrorString(status));
    status = cudaSetDevice(index);
    if (status != cudaSuccess)
        return lq_error_set(err, LQ_EIO, "cudaSetDevice(%d): %s", index,
                            cudaGetErrorString(status));
    int rc = launch_check(err);
    if (rc) return rc;

    cublasHandle_t blas = nullptr;
    int blas_version = 0;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS)
        return lq_error_set(err, LQ_EIO, "cublasCreate failed on device %d", index);
    cublasGetVersion(blas, &blas_version);
    cublasDestroy(blas);

    cusolverDnHandle_t solver = nullptr;
    if (cusolverDnCreate(&solver) != CUSOLVER_STATUS_SUCCESS)
        return lq_error_set(err, LQ_EIO, "cusolverDnCreate failed on device %d", index);
    cusolverDnDestroy(solver);

    snprintf(buffer, (size_t)buffer_size, "%s, sm_%d%d, %.1f GiB, cuBLAS %d", properties.name,
             properties.major, properties.minor,
             (double)properties.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), blas_version);
    return LQ_OK;
}
