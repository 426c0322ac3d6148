/* The benchmarks' environment variants (tests/bench/env_variants.h): what a spec parses to,
 * what it refuses, and that applying a variant and restoring it leaves the environment as it
 * was. */
#define _POSIX_C_SOURCE 200809L
#include "../bench/env_variants.h"

#include <stdlib.h>

#include "lq_test.h"

static struct env_variant variants[ENV_VARIANTS_MAX];

static void test_parse(void) {
    char why[200] = "";
    int count = -1;
    CHECK(env_variants_parse("LQ_A=1 LQ_B=v6;LQ_C=3,LQ_D=x;-;  LQ_E=2  ", variants,
                             ENV_VARIANTS_MAX, &count, why, sizeof why) == 0);
    CHECK_MSG(count == 4, "%d variants (%s)", count, why);
    CHECK(variants[0].count == 2 && strcmp(variants[0].settings[1].name, "LQ_B") == 0 &&
          strcmp(variants[0].settings[1].value, "v6") == 0);
    CHECK(strcmp(variants[0].label, "LQ_A=1 LQ_B=v6") == 0);
    CHECK(variants[1].count == 2 && strcmp(variants[1].settings[0].name, "LQ_C") == 0 &&
          strcmp(variants[1].settings[1].value, "x") == 0);
    CHECK(variants[2].count == 0 && strcmp(variants[2].label, "defaults") == 0);
    CHECK(variants[3].count == 1 && strcmp(variants[3].label, "LQ_E=2") == 0);
    CHECK(env_variants_parse("-", variants, ENV_VARIANTS_MAX, &count, why, sizeof why) == 0 &&
          count == 1 && variants[0].count == 0);
}

static void test_refusals(void) {
    static const char *const bad[] = {
        "lq_a=1",                                 /* lower case */
        "LQ_A",                                   /* no '=' */
        "LQ_A=",                                  /* empty value */
        "=1",                                     /* empty name */
        "1A=2",                                   /* starts with a digit */
        "LQ_A=1 LQ_A=2",                          /* twice in a variant */
        "LQ_A=1;",                                /* a blank variant */
        ";LQ_A=1",                                /* another */
        "",                                       /* nothing */
        "LQ_A=1;  ;-",                            /* blanks only */
        "A=1 B=1 C=1 D=1 E=1 F=1 G=1 H=1 I=1",    /* 9 settings */
        "LQ_A=123456789012345678901234567890123", /* a value of 33 */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char why[200] = "";
        int count = 0;
        CHECK_MSG(env_variants_parse(bad[i], variants, ENV_VARIANTS_MAX, &count, why, sizeof why) ==
                          -1 &&
                      why[0] != '\0',
                  "'%s' was taken", bad[i]);
    }
    char spec[ENV_VARIANTS_MAX * 3 + 8] = "";
    for (int i = 0; i <= ENV_VARIANTS_MAX; i++) strcat(spec, i ? ";-" : "-");
    char why[200] = "";
    int count = 0;
    CHECK(env_variants_parse(spec, variants, ENV_VARIANTS_MAX, &count, why, sizeof why) == -1);
    CHECK_MSG(strstr(why, "more than") != NULL, "%s", why);
    spec[strlen(spec) - 2] = '\0'; /* exactly the most */
    CHECK(env_variants_parse(spec, variants, ENV_VARIANTS_MAX, &count, why, sizeof why) == 0 &&
          count == ENV_VARIANTS_MAX);
}

static void test_apply_restore(void) {
    setenv("LQ_TEST_SET_BEFORE", "old", 1);
    unsetenv("LQ_TEST_UNSET_BEFORE");
    char why[200];
    int count = 0;
    CHECK(env_variants_parse("LQ_TEST_SET_BEFORE=new LQ_TEST_UNSET_BEFORE=1", variants, 4, &count,
                             why, sizeof why) == 0);
    struct env_saved saved;
    CHECK(env_variant_apply(&variants[0], &saved) == 0);
    const char *a = getenv("LQ_TEST_SET_BEFORE"), *b = getenv("LQ_TEST_UNSET_BEFORE");
    CHECK(a && strcmp(a, "new") == 0);
    CHECK(b && strcmp(b, "1") == 0);
    env_variant_restore(&variants[0], &saved);
    a = getenv("LQ_TEST_SET_BEFORE");
    CHECK(a && strcmp(a, "old") == 0);
    CHECK(getenv("LQ_TEST_UNSET_BEFORE") == NULL);
    CHECK(saved.previous[0] == NULL && saved.previous[1] == NULL);
}

static void test_median(void) {
    double odd[] = {3.0, 1.0, 2.0}, even[] = {4.0, 1.0, 3.0, 2.0}, one[] = {7.5};
    CHECK_NEAR(env_variants_median(odd, 3), 2.0, 0);
    CHECK_NEAR(env_variants_median(even, 4), 2.5, 0);
    CHECK_NEAR(env_variants_median(one, 1), 7.5, 0);
}

static void test_batches(void) {
    int batches[8], count = -1;
    CHECK(env_variants_parse_batches("1,8,32,64", batches, 8, &count) == 0 && count == 4 &&
          batches[0] == 1 && batches[3] == 64);
    CHECK(env_variants_parse_batches("8", batches, 8, &count) == 0 && count == 1 &&
          batches[0] == 8);
    static const char *const bad[] = {"",     "0", "65",  "1,",  ",1",
                                      "1,,8", "x", "1;8", "1 8", "1,2,3,4,5,6,7,8,9"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK_MSG(env_variants_parse_batches(bad[i], batches, 8, &count) == -1, "'%s' was taken",
                  bad[i]);
}

/* A fake measurement: the variant's LQ_TEST_MS (ms at batch 1, doubled per further batch
 * size), which fails where LQ_TEST_FAIL is set; it records the order of the runs and what
 * LQ_TEST_BASE was. */
struct fake {
    char order[64];
    int runs, base_seen;
};

static int fake_measure(void *context, const int *batches, int batch_count, double *ms,
                        double *percent, char *why, size_t why_size) {
    struct fake *f = context;
    const char *value = getenv("LQ_TEST_MS"), *base = getenv("LQ_TEST_BASE");
    f->base_seen += base && strcmp(base, "on") == 0;
    f->order[f->runs++] = value ? value[0] : 'd';
    if (getenv("LQ_TEST_FAIL")) {
        snprintf(why, why_size, "told to fail");
        return -1;
    }
    const double base_ms = value ? atof(value) + 0.5 * (f->runs % 4) : 9.0; /* runs differ */
    for (int b = 0; b < batch_count; b++)
        ms[b] = base_ms * (1 << b), percent[b] = 100.0 / ms[b] * batches[b];
    return 0;
}

static void test_sweep(void) {
    char why[200];
    int count = 0, base_count = 0;
    struct env_variant base;
    CHECK(env_variants_parse("LQ_TEST_BASE=on", &base, 1, &base_count, why, sizeof why) == 0);
    CHECK(env_variants_parse("LQ_TEST_MS=4;LQ_TEST_MS=2;LQ_TEST_MS=3 LQ_TEST_FAIL=1;-", variants,
                             ENV_VARIANTS_MAX, &count, why, sizeof why) == 0 &&
          count == 4);
    unsetenv("LQ_TEST_MS"), unsetenv("LQ_TEST_FAIL"), unsetenv("LQ_TEST_BASE");
    struct fake f = {{0}, 0, 0};
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    const int batches[2] = {1, 8};
    CHECK(env_variants_sweep(variants, count, &base, batches, 2, 3, fake_measure, &f, out) == -1);
    fclose(out);
    /* forward, backward, forward; the failed variant ('3') once only */
    CHECK_MSG(strcmp(f.order, "423d"
                              "d24"
                              "42d") == 0,
              "order %s", f.order);
    CHECK(f.base_seen == f.runs);
    CHECK(getenv("LQ_TEST_MS") == NULL && getenv("LQ_TEST_FAIL") == NULL &&
          getenv("LQ_TEST_BASE") == NULL);
    CHECK_MSG(strstr(text, "FAILED: LQ_TEST_MS=3 LQ_TEST_FAIL=1: told to fail") != NULL, "%s",
              text);
    /* variant 0 ran as runs 1, 7, 8: 4 + 0.5·(1, 3, 0) -> median 4.5, best 4; at batch 8 twice
     * that: 9 (8), 100·8/9 = 89% */
    const char *line = strstr(text, "\nLQ_TEST_MS=4 ");
    CHECK_MSG(line && strstr(line, "batch 1:   4.500 (  4.000)  22% 1.000x") &&
                  strstr(line, "batch 8:   9.000 (  8.000)  89% 1.000x"),
              "%s", text);
    /* variant 1 ran as runs 2, 6, 9: 2 + 0.5·(2, 2, 1) -> median 3, best 2.5, against 4.5 */
    line = strstr(text, "\nLQ_TEST_MS=2 ");
    CHECK_MSG(line && strstr(line, "batch 1:   3.000 (  2.500)  33% 0.667x"), "%s", text);
    line = strstr(text, "\nLQ_TEST_MS=3 LQ_TEST_FAIL=1 ");
    CHECK_MSG(line && strstr(line, "batch 1: failed"), "%s", text);
    line = strstr(text, "\ndefaults ");
    CHECK_MSG(line && strstr(line, "batch 1:   9.000 (  9.000)  11% 2.000x"), "%s", text);
    free(text);
    CHECK(env_variants_sweep(variants, 1, NULL, batches, 2, 0, fake_measure, &f, stdout) == -1);
    CHECK(env_variants_sweep(variants, 1, NULL, batches, 9, 1, fake_measure, &f, stdout) == -1);
}

LQ_TEST_MAIN(LQ_TEST(test_parse), LQ_TEST(test_refusals), LQ_TEST(test_apply_restore),
             LQ_TEST(test_median), LQ_TEST(test_batches), LQ_TEST(test_sweep))
