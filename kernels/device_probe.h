/* Which accelerators this build can use. The CUDA backend proper arrives with its own
 * issue; this probe keeps the CUDA toolchain, cudart, cuBLAS and cuSOLVER linked and
 * tested in every build so that the CUDA code path cannot rot. */
#ifndef LQ_DEVICE_PROBE_H
#define LQ_DEVICE_PROBE_H

#include "core/error.h"

/* 1 when the binary was built with the CUDA backend, 0 otherwise. */
int lq_cuda_compiled(void);

/* Stores the number of usable CUDA devices in *count (0 where the build has CUDA but the
 * machine has no GPU or driver: that is not an error). Returns LQ_EUNSUPPORTED when the
 * build has no CUDA backend. */
int lq_cuda_device_count(int *count, struct lq_error *err);

/* Describes device `index` ("NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB, cuBLAS 13.0.0")
 * into buffer; returns 0 or a negative LQ_E* code. */
int lq_cuda_device_describe(int index, char *buffer, int buffer_size, struct lq_error *err);

#endif
