/* lq_parallel_for on a persistent pool of worker threads: starting threads per call would cost
 * tens of microseconds, as much as a whole small matrix product. The pool serves one loop at a
 * time; a loop started while it is busy (another thread's, or a nested one) runs inline on
 * its caller, which is always correct and keeps nesting deadlock-free. */
#include "parallel.h"

#include <pthread.h>
#include <stdlib.h>
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

struct pool {
    pthread_mutex_t lock;
    pthread_cond_t work_ready, work_done;
    int workers;              /* threads started */
    unsigned long generation; /* bumped for each loop handed to the workers */
    /* the current loop */
    void (*body)(void *context, size_t begin, size_t end);
    void *context;
    size_t count, parts;
    size_t next_part; /* parts not yet claimed */
    size_t parts_done;
    int busy; /* a loop is being run */
};

static struct pool pool = {PTHREAD_MUTEX_INITIALIZER,
                           PTHREAD_COND_INITIALIZER,
                           PTHREAD_COND_INITIALIZER,
                           0,
                           0,
                           NULL,
                           NULL,
                           0,
                           0,
                           0,
                           0,
                           0};

/* Claims and runs parts of the current loop until none is left. Called with the lock held;
 * returns with it held. */
static void run_parts(void) {
    while (pool.next_part < pool.parts) {
        size_t part = pool.next_part++;
        size_t begin = pool.count * part / pool.parts, end = pool.count * (part + 1) / pool.parts;
        void (*body)(void *, size_t, size_t) = pool.body;
        void *context = pool.context;
        pthread_mutex_unlock(&pool.lock);
        body(context, begin, end);
        pthread_mutex_lock(&pool.lock);
        if (++pool.parts_done == pool.parts) pthread_cond_broadcast(&pool.work_done);
    }
}

static void *worker_main(void *argument) {
    (void)argument;
    pthread_mutex_lock(&pool.lock);
    unsigned long seen = pool.generation;
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.work_ready, &pool.lock);
        seen = pool.generation;
        run_parts();
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
    if (threads <= 1) {
        body(context, 0, count);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    if (pool.busy) { /* nested, or another thread's loop is running: do it here */
        pthread_mutex_unlock(&pool.lock);
        body(context, 0, count);
        return;
    }
    grow_pool((int)threads - 1);
    if (pool.workers == 0) {
        pthread_mutex_unlock(&pool.lock);
        body(context, 0, count);
        return;
    }
    /* The split depends only on count and the thread count: results written by index are
     * the same however the parts are scheduled. */
    pool.busy = 1;
    pool.body = body, pool.context = context, pool.count = count, pool.parts = threads;
    pool.next_part = 0, pool.parts_done = 0;
    pool.generation++;
    pthread_cond_broadcast(&pool.work_ready);
    run_parts();
    while (pool.parts_done < pool.parts) pthread_cond_wait(&pool.work_done, &pool.lock);
    pool.busy = 0;
    pthread_mutex_unlock(&pool.lock);
}
