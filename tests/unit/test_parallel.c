/* core/parallel.c: every index of every loop visited exactly once, with more threads than
 * cores, loops whose number of parts changes from one call to the next (the pool's workers may
 * still hold the previous loop when the next starts), nested loops and loops from several
 * threads at once. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/parallel.h"
#include "lq_test.h"

struct visits {
    int *hits;
    int nested;
};

static void count_body(void *context, size_t begin, size_t end) {
    struct visits *v = context;
    for (size_t i = begin; i < end; i++) __atomic_add_fetch(&v->hits[i], 1, __ATOMIC_RELAXED);
    if (v->nested && begin < end) { /* a nested loop runs inline on its caller */
        struct visits inner = {calloc(7, sizeof(int)), 0};
        lq_parallel_for(7, 1, count_body, &inner);
        for (int i = 0; i < 7; i++) v->nested += inner.hits[i] == 1 ? 0 : 1000;
        free(inner.hits);
    }
}

/* Loops of changing sizes and grains, each checked for exactly-once visits. */
static int run_loops(int loops, unsigned seed) {
    int bad = 0;
    for (int k = 0; k < loops; k++) {
        seed = seed * 1103515245u + 12345u;
        size_t count = 1 + (seed >> 8) % 200, grain = 1 + (seed >> 20) % 40;
        struct visits v = {calloc(count, sizeof(int)), 0};
        lq_parallel_for(count, grain, count_body, &v);
        for (size_t i = 0; i < count; i++) bad += v.hits[i] != 1;
        free(v.hits);
    }
    return bad;
}

static void test_many_threads_changing_parts(void) {
    setenv("LQ_THREADS", "16", 1);
    CHECK(lq_parallel_threads() == 16);
    CHECK(run_loops(100000, 1) == 0);
    unsetenv("LQ_THREADS");
}

static void test_nested(void) {
    setenv("LQ_THREADS", "4", 1);
    struct visits v = {calloc(64, sizeof(int)), 1};
    lq_parallel_for(64, 1, count_body, &v);
    int bad = 0;
    for (int i = 0; i < 64; i++) bad += v.hits[i] != 1;
    CHECK(bad == 0 && v.nested == 1);
    free(v.hits);
    unsetenv("LQ_THREADS");
}

static void *caller_main(void *argument) {
    *(int *)argument = run_loops(3000, (unsigned)(size_t)argument);
    return NULL;
}

static void test_concurrent_callers(void) {
    setenv("LQ_THREADS", "4", 1);
    pthread_t threads[3];
    int bad[3] = {0, 0, 0};
    for (int i = 0; i < 3; i++) pthread_create(&threads[i], NULL, caller_main, &bad[i]);
    for (int i = 0; i < 3; i++) pthread_join(threads[i], NULL);
    CHECK(bad[0] == 0 && bad[1] == 0 && bad[2] == 0);
    unsetenv("LQ_THREADS");
}

LQ_TEST_MAIN(LQ_TEST(test_many_threads_changing_parts), LQ_TEST(test_nested),
             LQ_TEST(test_concurrent_callers))
