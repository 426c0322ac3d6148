// CUDA_DEVICE_MAX_CONNECTIONS: how many hardware work queues the host gets to a device (CUDA's
// default is 8). Streams beyond that share queues, and work on a shared queue runs in order,
// so the error table's concurrent decompositions (decompose_cuda.cu, up to 16 streams by
// default) queued behind each other: on an H100, 16 streams ran a 4096 x 4096 error-table row
// no faster than 8 until this was 32 (tests/kernels/gpu_check.sh connections). CUDA reads the
// variable when it creates the device's context, so it is set (unless the user set it) before
// the first call that can create one. Included by device_probe.cu and backend_cuda.cu, and by
// server/main.c, which sets it first thing, before any thread starts: setenv beside another
// thread's getenv is a data race, and a later call with the variable set changes nothing.
#ifndef LQ_CONNECTIONS_CUDA_H
#define LQ_CONNECTIONS_CUDA_H

#include <stdlib.h>

#define LQ_CUDA_CONNECTIONS "32"

static inline void lq_cuda_default_connections(void) {
    setenv("CUDA_DEVICE_MAX_CONNECTIONS", LQ_CUDA_CONNECTIONS, 0); // the user's value wins
}

#endif
