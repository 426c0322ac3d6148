/* A CUDA thread block on the CPU, for the unit tests that run a kernel's own source (written
 * as C in kernels/cuda/ headers named ..._kernel.h): one pthread per CUDA thread, the CTAs of a
 * grid one after another, __syncthreads as a barrier of the CTA's threads, warp-collective
 * operations (shuffles, mma) through a per-warp exchange between two barriers of the warp's 32
 * threads (every lane of a warp calls them together, as on the GPU). Shared memory is poisoned
 * (all bits set: NaN as floats) before each CTA, so a read of something never written shows. */
#ifndef LQ_CTA_EMULATION_H
#define LQ_CTA_EMULATION_H

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CTA_MAX_THREADS 256
#define CTA_MAX_WARPS (CTA_MAX_THREADS / 32)

static pthread_barrier_t cta_barrier, cta_warp_barrier[CTA_MAX_WARPS];
static _Thread_local int cta_thread; /* threadIdx.x of the calling CPU thread */
static float cta_lanes[CTA_MAX_WARPS][32];

static void cta_sync(void) {
    pthread_barrier_wait(&cta_barrier);
}

static void cta_warp_wait(void) {
    pthread_barrier_wait(&cta_warp_barrier[cta_thread / 32]);
}

/* __shfl_xor_sync(all lanes, v, offset) */
static float cta_shfl_xor(float v, int offset) {
    const int warp = cta_thread / 32, lane = cta_thread % 32;
    cta_lanes[warp][lane] = v;
    cta_warp_wait();
    const float other = cta_lanes[warp][lane ^ offset];
    cta_warp_wait();
    return other;
}

/* __shfl_xor_sync(all lanes, v, offset) for a double */
static double cta_lanes_f64[CTA_MAX_WARPS][32];
static inline double cta_shfl_xor_f64(double v, int offset) {
    const int warp = cta_thread / 32, lane = cta_thread % 32;
    cta_lanes_f64[warp][lane] = v;
    cta_warp_wait();
    const double other = cta_lanes_f64[warp][lane ^ offset];
    cta_warp_wait();
    return other;
}

/* What each CPU thread runs: body(arg, block, thread, shared). */
typedef void (*cta_body)(const void *arg, int block, int thread, void *shared);

struct cta_launch {
    cta_body body;
    const void *arg;
    int block, thread;
    void *shared;
};

static void *cta_run_thread(void *p) {
    const struct cta_launch *l = p;
    cta_thread = l->thread;
    l->body(l->arg, l->block, l->thread, l->shared);
    return NULL;
}

/* Runs CTAs 0 .. blocks − 1 of `threads` threads (a multiple of 32, at most CTA_MAX_THREADS),
 * each with `shared_bytes` of fresh poisoned shared memory (64-byte aligned). Aborts when the
 * threads cannot be had. */
static void cta_run_grid(cta_body body, const void *arg, int blocks, int threads,
                         size_t shared_bytes) {
    static pthread_t ids[CTA_MAX_THREADS];
    static struct cta_launch launches[CTA_MAX_THREADS];
    if (threads % 32 != 0 || threads > CTA_MAX_THREADS) abort();
    void *shared = aligned_alloc(64, (shared_bytes + 63) / 64 * 64 + 64);
    if (!shared) abort();
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    /* 1 MiB: glibc takes the static TLS (OpenBLAS's, where a test links the CPU backend) out of it
     */
    pthread_attr_setstacksize(&attr, (size_t)1 << 20);
    if (pthread_barrier_init(&cta_barrier, NULL, (unsigned)threads) != 0) abort();
    for (int w = 0; w < threads / 32; w++)
        if (pthread_barrier_init(&cta_warp_barrier[w], NULL, 32) != 0) abort();
    for (int block = 0; block < blocks; block++) {
        memset(shared, 0xff, shared_bytes);
        for (int t = 0; t < threads; t++) {
            launches[t] = (struct cta_launch){body, arg, block, t, shared};
            const int created = pthread_create(&ids[t], &attr, cta_run_thread, &launches[t]);
            if (created != 0) {
                fprintf(stderr, "pthread_create %d: %s\n", t, strerror(created));
                abort();
            }
        }
        for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    }
    for (int w = 0; w < threads / 32; w++) pthread_barrier_destroy(&cta_warp_barrier[w]);
    pthread_barrier_destroy(&cta_barrier);
    pthread_attr_destroy(&attr);
    free(shared);
}

#endif
