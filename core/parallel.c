/* lq_parallel_for on a persistent pool of worker threads: starting threads per call would cost
 * tens of microseconds, as much as a whole small matrix product. The pool serves one loop at a
 * time; a loop started while it is busy (another thread's, or a nested one) runs inline on
 * its caller, which is always correct and keeps nesting deadlock-free. */
#include "parallel.h"

#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define LQ_PARALLEL_MAX_THREADS 256

int lq_parallel_threads(void) {
    const char *env = getenv("LQ_THREADS");
    if (env) {
        long value = strtol(env, NULL, 10);
        if (value >= 1)
            return value > LQ_PARALLEL_MAX_THREADS ? LQ_PARALLEL_MAX_THREADS : (int)value;
    }
    /* sysconf reads /sys on every call: ask once. */
    static int cached;
    int cpus = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (cpus == 0) {
        long online = sysconf(_SC_NPROCESSORS_ONLN);
        cpus = online < 1                         ? 1
               : online > LQ_PARALLEL_MAX_THREADS ? LQ_PARALLEL_MAX_THREADS
                                                  : (int)online;
        __atomic_store_n(&cached, cpus, __ATOMIC_RELAXED);
    }
    return cpus;
}

/* Workers wait for a loop by spinning on the generation counter for a while (a tenth of a
 * millisecond), then sleep on a condition variable; the caller waits for the workers' parts the
 * same way. A decode step of a small model runs hundreds of loops of tens of microseconds each:
 * waking a sleeping thread through the kernel for each cost more than the loops themselves (2
 * threads decoded slower than 1). Spinning stops soon after the last loop, so an idle daemon
 * sleeps. */
#define SPIN_NANOSECONDS 100000

static unsigned long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec;
}

/* A claim ticket: the loop's generation above TICKET_BITS, the next unclaimed part below, in one
 * atomic word, so a worker still holding an old generation can never claim a part of a new loop
 * (its compare-and-swap fails on the generation). */
#define TICKET_BITS 20
#define TICKET_PART(ticket) ((size_t)((ticket) & ((1ull << TICKET_BITS) - 1)))
#define TICKET_GENERATION(ticket) ((ticket) >> TICKET_BITS)

/* One loop's parameters. The pool keeps two, by the parity of the generation: a worker still
 * holding generation G can read G's slot while the caller fills G + 1's, and its claim then
 * fails on the ticket (a loop's parameters used to be one set, which a stale worker could read
 * half-rewritten when the number of parts changed between loops: two parts done twice, or the
 * caller waiting forever). */
struct loop {
    void (*body)(void *context, size_t begin, size_t end);
    void *context;
    size_t count, parts;
};

struct pool {
    pthread_mutex_t lock;
    pthread_cond_t work_ready, work_done;
    int workers;               /* threads started (under lock) */
    int sleepers;              /* workers asleep on work_ready (under lock) */
    int caller_sleeping;       /* the caller is asleep on work_done (under lock) */
    struct loop loops[2];      /* written by the caller before it publishes the ticket */
    unsigned long long ticket; /* (atomic) */
    size_t parts_done;         /* (atomic) */
    int busy;                  /* a loop is being run (atomic) */
};

static struct pool pool = {PTHREAD_MUTEX_INITIALIZER,
                           PTHREAD_COND_INITIALIZER,
                           PTHREAD_COND_INITIALIZER,
                           0,
                           0,
                           0,
                           {{NULL, NULL, 0, 0}, {NULL, NULL, 0, 0}},
                           0,
                           0,
                           0};

static inline void spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claims and runs parts of loop `generation` until none is left (or a newer loop has started).
 * Whoever finishes the last part wakes the caller if it sleeps. */
static void run_parts(unsigned long long generation) {
    unsigned long long ticket = __atomic_load_n(&pool.ticket, __ATOMIC_ACQUIRE);
    for (;;) {
        if (TICKET_GENERATION(ticket) != generation) return;
        const struct loop *loop = &pool.loops[generation & 1];
        const size_t parts = loop->parts, part = TICKET_PART(ticket);
        if (part >= parts) return;
        if (!__atomic_compare_exchange_n(&pool.ticket, &ticket, ticket + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue; /* ticket now holds the current value */
        /* the claim succeeded: the loop is still live, so its slot is still its own */
        const size_t count = loop->count;
        loop->body(loop->context, count * part / parts, count * (part + 1) / parts);
        if (__atomic_add_fetch(&pool.parts_done, 1, __ATOMIC_ACQ_REL) == parts) {
            pthread_mutex_lock(&pool.lock);
            if (pool.caller_sleeping) pthread_cond_broadcast(&pool.work_done);
            pthread_mutex_unlock(&pool.lock);
        }
        ticket = __atomic_load_n(&pool.ticket, __ATOMIC_ACQUIRE);
    }
}

static unsigned long long current_generation(void) {
    return TICKET_GENERATION(__atomic_load_n(&pool.ticket, __ATOMIC_ACQUIRE));
}

static void *worker_main(void *argument) {
    (void)argument;
    unsigned long long seen = current_generation();
    for (;;) {
        unsigned long long now = seen;
        const unsigned long long deadline = now_ns() + SPIN_NANOSECONDS;
        for (unsigned spin = 1; now == seen; spin++) {
            spin_pause();
            now = current_generation();
            if (spin % 64 == 0 && now_ns() > deadline) break;
        }
        if (now == seen) {
            pthread_mutex_lock(&pool.lock);
            pool.sleepers++;
            while ((now = current_generation()) == seen)
                pthread_cond_wait(&pool.work_ready, &pool.lock);
            pool.sleepers--;
            pthread_mutex_unlock(&pool.lock);
        }
        seen = now;
        run_parts(seen);
    }
    return NULL;
}

/* Starts workers up to `wanted` (lock held). */
static void grow_pool(int wanted) {
    while (pool.workers < wanted) {
        pthread_t thread;
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attributes, worker_main, NULL);
        pthread_attr_destroy(&attributes);
        if (failed) break;
        pool.workers++;
    }
}

void lq_parallel_for(size_t count, size_t min_per_thread,
                     void (*body)(void *context, size_t begin, size_t end), void *context) {
    if (count == 0) return;
    size_t threads = (size_t)lq_parallel_threads();
    if (min_per_thread < 1) min_per_thread = 1;
    if (threads > count / min_per_thread) threads = count / min_per_thread;
    int idle = 0;
    if (threads <= 1 ||
        !__atomic_compare_exchange_n(&pool.busy, &idle, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        /* one part, or nested, or another thread's loop is running: do it here */
        body(context, 0, count);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    grow_pool((int)threads - 1);
    int workers = pool.workers;
    pthread_mutex_unlock(&pool.lock);
    if (workers == 0) {
        __atomic_store_n(&pool.busy, 0, __ATOMIC_RELEASE);
        body(context, 0, count);
        return;
    }
    if (threads > (size_t)workers + 1) threads = (size_t)workers + 1;
    /* The split depends only on count and the thread count: results written by index are
     * the same however the parts are scheduled. */
    const unsigned long long generation = current_generation() + 1;
    pool.loops[generation & 1] = (struct loop){body, context, count, threads};
    __atomic_store_n(&pool.parts_done, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.ticket, generation << TICKET_BITS, __ATOMIC_RELEASE);
    pthread_mutex_lock(&pool.lock);
    if (pool.sleepers) pthread_cond_broadcast(&pool.work_ready);
    pthread_mutex_unlock(&pool.lock);
    run_parts(generation);
    const unsigned long long deadline = now_ns() + SPIN_NANOSECONDS;
    for (unsigned spin = 1; __atomic_load_n(&pool.parts_done, __ATOMIC_ACQUIRE) != threads;
         spin++) {
        spin_pause();
        if (spin % 64 == 0 && now_ns() > deadline) break;
    }
    if (__atomic_load_n(&pool.parts_done, __ATOMIC_ACQUIRE) != threads) {
        pthread_mutex_lock(&pool.lock);
        pool.caller_sleeping = 1;
        while (__atomic_load_n(&pool.parts_done, __ATOMIC_ACQUIRE) != threads)
            pthread_cond_wait(&pool.work_done, &pool.lock);
        pool.caller_sleeping = 0;
        pthread_mutex_unlock(&pool.lock);
    }
    __atomic_store_n(&pool.busy, 0, __ATOMIC_RELEASE);
}
