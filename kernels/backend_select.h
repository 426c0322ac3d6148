/* Choosing the compute device from a --device option: "cpu", "cuda" (GPU 0), "cuda:N", or
 * "auto" (the first GPU when one is usable, else the CPU). A GPU that was asked for but is not
 * there (no driver, no device, a build without CUDA) is not fatal: the CPU takes over and the
 * notice says why, so one command line works on every machine. */
#ifndef LQ_BACKEND_SELECT_H
#define LQ_BACKEND_SELECT_H

#include <stddef.h>

#include "kernels/backend.h"

#define LQ_BACKEND_NOTICE_SIZE 512

/* Opens the backend `device` names (NULL means "cpu"). memory_limit caps a GPU backend's
 * allocations (0: its free memory). notice (LQ_BACKEND_NOTICE_SIZE bytes) receives one line
 * for the log: which device runs, and why a GPU asked for is not used. LQ_EINVAL for a name
 * that is none of the above; other errors when even the CPU backend cannot be created. */
int lq_backend_open(const char *device, size_t memory_limit, struct lq_backend **out, char *notice,
                    struct lq_error *err);

/* Parses a memory size: bytes, or a number with K, M, G or T (powers of 1024; "40G",
 * "512MiB", "1.5G"). Returns 0 on success, -1 otherwise. */
int lq_parse_memory_size(const char *text, size_t *out);

#endif
