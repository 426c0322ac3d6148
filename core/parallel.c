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
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < 1) cpus = 1;
    return cpus > LQ_PARALLEL_MAX_THREADS ? LQ_PARALLEL_MAX_THREADS : (int)cpus;
}

struct parallel_task {
    void (*body)(void *context, size_t begin, size_t end);
    void *context;
    size_t begin, end;
};

static void *run_task(void *argument) {
    struct parallel_task *task = argument;
    task->body(task->context, task->begin, task->end);
    return NULL;
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
    struct parallel_task tasks[LQ_PARALLEL_MAX_THREADS];
    pthread_t handles[LQ_PARALLEL_MAX_THREADS];
    int started[LQ_PARALLEL_MAX_THREADS];
    for (size_t t = 0; t < threads; t++) {
        tasks[t] =
            (struct parallel_task){body, context, count * t / threads, count * (t + 1) / threads};
        /* Thread 0's range runs on the calling thread; a failed start runs inline too. */
        started[t] = t > 0 && pthread_create(&handles[t], NULL, run_task, &tasks[t]) == 0;
        if (t > 0 && !started[t]) run_task(&tasks[t]);
    }
    run_task(&tasks[0]);
    for (size_t t = 1; t < threads; t++)
        if (started[t]) pthread_join(handles[t], NULL);
}
