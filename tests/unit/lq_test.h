/* A minimal test harness: each test file defines test functions, lists them in
 * LQ_TEST_MAIN, and exits non-zero when any check fails. Checks report file:line. */
#ifndef LQ_TEST_H
#define LQ_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int lq_test_failures;

#define CHECK(condition)                                                                           \
    do {                                                                                           \
        if (!(condition)) {                                                                        \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #condition);          \
            lq_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

#define CHECK_MSG(condition, ...)                                                                  \
    do {                                                                                           \
        if (!(condition)) {                                                                        \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #condition);          \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            lq_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

#define CHECK_NEAR(actual, expected, tolerance)                                                    \
    do {                                                                                           \
        double lq_a_ = (double)(actual), lq_e_ = (double)(expected);                               \
        if (!(fabs(lq_a_ - lq_e_) <= (double)(tolerance))) {                                       \
            fprintf(stderr, "%s:%d: %s = %.9g, expected %.9g (tolerance %g)\n", __FILE__,          \
                    __LINE__, #actual, lq_a_, lq_e_, (double)(tolerance));                         \
            lq_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

#define CHECK_OK(call)                                                                             \
    do {                                                                                           \
        struct lq_error lq_err_ = {0};                                                             \
        (void)lq_err_;                                                                             \
        int lq_rc_ = (call);                                                                       \
        if (lq_rc_ != 0) {                                                                         \
            fprintf(stderr, "%s:%d: %s returned %d\n", __FILE__, __LINE__, #call, lq_rc_);         \
            lq_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

struct lq_test_case {
    const char *name;
    void (*run)(void);
};

#define LQ_TEST(name)                                                                              \
    { #name, name }

/* Runs every case; a case filter may be given as argv[1]. */
static inline int lq_test_run(const struct lq_test_case *cases, size_t count, int argc,
                              char **argv) {
    int failed_cases = 0;
    for (size_t i = 0; i < count; i++) {
        if (argc > 1 && strcmp(argv[1], cases[i].name) != 0) continue;
        int before = lq_test_failures;
        cases[i].run();
        int ok = lq_test_failures == before;
        printf("%s %s\n", ok ? "ok  " : "FAIL", cases[i].name);
        if (!ok) failed_cases++;
    }
    printf("%d of %zu cases failed\n", failed_cases, count);
    return failed_cases ? 1 : 0;
}

#define LQ_TEST_MAIN(...)                                                                          \
    int main(int argc, char **argv) {                                                              \
        static const struct lq_test_case cases[] = {__VA_ARGS__};                                  \
        return lq_test_run(cases, sizeof cases / sizeof cases[0], argc, argv);                     \
    }

#endif
