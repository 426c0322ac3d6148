/* A CUDA thread block on the CPU, for the unit tests that run a kernel's own source (written
 * as C in kernels/cuda/ headers named ..._kernel.h): one pthread per CUDA thread, the CTAs of a
 * grid one after another, __syncthreads as a barrier of the CTA's threads, warp-collective
 * operations (shuffles, mma) through a per-warp exchange between two barriers of the warp's 32
 * threads (every lane of a warp calls them together, as on the GPU); the CTAs of a thread-block
 * cluster run together, with a barrier of the cluster and each other's shared memory (and all
 * the CTAs of a grid whose CTAs wait for each other through global memory). Shared
 * memory is poisoned (all bits set: NaN as floats) before each CTA, so a read of something
 * never written shows. */
#ifndef LQ_CTA_EMULATION_H
#define LQ_CTA_EMULATION_H

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CTA_MAX_THREADS 256
#define CTA_MAX_WARPS (CTA_MAX_THREADS / 32)
#define CTA_MAX_CLUSTER 8 /* CTAs of a thread-block cluster (or a grid), run together */

static pthread_barrier_t cta_barrier[CTA_MAX_CLUSTER],
    cta_warp_barrier[CTA_MAX_CLUSTER][CTA_MAX_WARPS], cta_cluster_barrier;
static _Thread_local int cta_thread; /* threadIdx.x of the calling CPU thread */
static _Thread_local int cta_rank;   /* its CTA's rank in the cluster (0 without clusters) */
static float cta_lanes[CTA_MAX_CLUSTER][CTA_MAX_WARPS][32];
static void *cta_shared[CTA_MAX_CLUSTER]; /* the running cluster's CTAs' shared memory */

static inline void cta_sync(void) {
    pthread_barrier_wait(&cta_barrier[cta_rank]);
}

/* barrier.cluster.arrive + wait: every thread of every CTA of the cluster */
static inline void cta_cluster_sync(void) {
    pthread_barrier_wait(&cta_cluster_barrier);
}

static inline void cta_warp_wait(void) {
    pthread_barrier_wait(&cta_warp_barrier[cta_rank][cta_thread / 32]);
}

/* __shfl_xor_sync(all lanes, v, offset) */
static inline float cta_shfl_xor(float v, int offset) {
    const int warp = cta_thread / 32, lane = cta_thread % 32;
    cta_lanes[cta_rank][warp][lane] = v;
    cta_warp_wait();
    const float other = cta_lanes[cta_rank][warp][lane ^ offset];
    cta_warp_wait();
    return other;
}

/* __shfl_xor_sync(all lanes, v, offset) for a double */
static double cta_lanes_f64[CTA_MAX_CLUSTER][CTA_MAX_WARPS][32];
static inline double cta_shfl_xor_f64(double v, int offset) {
    const int warp = cta_thread / 32, lane = cta_thread % 32;
    cta_lanes_f64[cta_rank][warp][lane] = v;
    cta_warp_wait();
    const double other = cta_lanes_f64[cta_rank][warp][lane ^ offset];
    cta_warp_wait();
    return other;
}

/* What each CPU thread runs: body(arg, block, thread, shared). */
typedef void (*cta_body)(const void *arg, int block, int thread, void *shared);

struct cta_launch {
    cta_body body;
    const void *arg;
    int block, thread, rank;
    void *shared;
};

/* When > 0, the threads of each cluster's first CTA start this many microseconds late: a CTA
 * that reads what another writes without waiting for it then finds it unwritten. */
static int cta_late_us;

static inline void *cta_run_thread(void *p) {
    const struct cta_launch *l = p;
    cta_thread = l->thread, cta_rank = l->rank;
    if (cta_late_us > 0 && l->rank == 0) usleep((useconds_t)cta_late_us);
    l->body(l->arg, l->block, l->thread, l->shared);
    return NULL;
}

/* Runs CTAs 0 .. blocks − 1 of `threads` threads (a multiple of 32, at most CTA_MAX_THREADS) in
 * clusters of `cluster` CTAs (1 to CTA_MAX_CLUSTER, dividing blocks), a cluster's CTAs
 * together (cta_rank, cta_shared, cta_cluster_sync), each with `shared_bytes` of fresh
 * poisoned shared memory (64-byte aligned). Aborts when the threads cannot be had. */
static inline void cta_run_clusters(cta_body body, const void *arg, int blocks, int threads,
                                    size_t shared_bytes, int cluster) {
    static pthread_t ids[CTA_MAX_CLUSTER * CTA_MAX_THREADS];
    static struct cta_launch launches[CTA_MAX_CLUSTER * CTA_MAX_THREADS];
    if (threads % 32 != 0 || threads > CTA_MAX_THREADS || cluster < 1 ||
        cluster > CTA_MAX_CLUSTER || blocks % cluster != 0)
        abort();
    for (int r = 0; r < cluster; r++) {
        cta_shared[r] = aligned_alloc(64, (shared_bytes + 63) / 64 * 64 + 64);
        if (!cta_shared[r]) abort();
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    /* 1 MiB: glibc takes the static TLS (OpenBLAS's, where a test links the CPU backend) out of it
     */
    pthread_attr_setstacksize(&attr, (size_t)1 << 20);
    if (pthread_barrier_init(&cta_cluster_barrier, NULL, (unsigned)(threads * cluster)) != 0)
        abort();
    for (int r = 0; r < cluster; r++) {
        if (pthread_barrier_init(&cta_barrier[r], NULL, (unsigned)threads) != 0) abort();
        for (int w = 0; w < threads / 32; w++)
            if (pthread_barrier_init(&cta_warp_barrier[r][w], NULL, 32) != 0) abort();
    }
    for (int first = 0; first < blocks; first += cluster) {
        for (int r = 0; r < cluster; r++) memset(cta_shared[r], 0xff, shared_bytes);
        const int count = threads * cluster;
        for (int i = 0; i < count; i++) {
            const int r = i / threads, t = i % threads;
            launches[i] = (struct cta_launch){body, arg, first + r, t, r, cta_shared[r]};
            const int created = pthread_create(&ids[i], &attr, cta_run_thread, &launches[i]);
            if (created != 0) {
                fprintf(stderr, "pthread_create %d: %s\n", i, strerror(created));
                abort();
            }
        }
        for (int i = 0; i < count; i++) pthread_join(ids[i], NULL);
    }
    for (int r = 0; r < cluster; r++) {
        for (int w = 0; w < threads / 32; w++) pthread_barrier_destroy(&cta_warp_barrier[r][w]);
        pthread_barrier_destroy(&cta_barrier[r]);
        free(cta_shared[r]);
        cta_shared[r] = NULL;
    }
    pthread_barrier_destroy(&cta_cluster_barrier);
    pthread_attr_destroy(&attr);
}

/* Every CTA of the grid at once (blocks <= CTA_MAX_CLUSTER), as one cluster: a kernel whose
 * CTAs wait for each other through global memory. */
static inline void cta_run_together(cta_body body, const void *arg, int blocks, int threads,
                                    size_t shared_bytes) {
    cta_run_clusters(body, arg, blocks, threads, shared_bytes, blocks);
}

/* CTAs 0 .. blocks − 1, one after another (no clusters). */
static inline void cta_run_grid(cta_body body, const void *arg, int blocks, int threads,
                                size_t shared_bytes) {
    cta_run_clusters(body, arg, blocks, threads, shared_bytes, 1);
}

#endif
