/* A fork-join parallel loop over [0, count) for the CPU-heavy inner loops of core/
 * (quantization over millions of values). Each call starts and joins its threads: calls are
 * coarse (milliseconds and up), so a pool would buy nothing measurable. */
#ifndef LQ_PARALLEL_H
#define LQ_PARALLEL_H

#include <stddef.h>

/* Threads used: LQ_THREADS from the environment if set (>= 1), else the online CPUs. */
int lq_parallel_threads(void);

/* Calls body(context, begin, end) on disjoint ranges covering [0, count), concurrently when
 * count >= min_per_thread * 2. Ranges are contiguous and in order, so results written by
 * index are the same whatever the thread count. */
void lq_parallel_for(size_t count, size_t min_per_thread,
                     void (*body)(void *context, size_t begin, size_t end), void *context);

#endif
