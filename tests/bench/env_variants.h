/* Settings of the environment a benchmark runs under in turn, so that one process (one model
 * built and uploaded, one GPU, the variants interleaved round by round) compares them:
 * tests/bench/bench_cuda.c --decode-env. A spec is variants separated by ';', each one
 * NAME=VALUE settings separated by spaces or commas; "-" (or nothing) is the environment as it
 * is: "LQ_CUDA_MMA1_STAGE=1;LQ_CUDA_MMA1_STAGE=1 LQ_CUDA_MMA1_INLINE_T=1;-" is three. */
#ifndef LQ_BENCH_ENV_VARIANTS_H
#define LQ_BENCH_ENV_VARIANTS_H

#include <stddef.h>
#include <stdio.h>

#define ENV_VARIANTS_MAX 64
#define ENV_SETTINGS_MAX 8

struct env_setting {
    char name[48], value[32];
};

struct env_variant {
    int count;
    struct env_setting settings[ENV_SETTINGS_MAX];
    char label[ENV_SETTINGS_MAX * 82]; /* the settings, space-separated; "defaults" for none */
};

/* What a variant's settings replaced, for env_variant_restore. */
struct env_saved {
    char *previous[ENV_SETTINGS_MAX]; /* owned copies; NULL where the name was unset */
};

/* Parses spec into variants[0 .. *count) (at most max). 0; or -1 with why (a message naming the
 * offending text) for a name that is not [A-Z_][A-Z0-9_]*, an empty value, a name set twice in
 * a variant, a setting without '=', a blank variant (an empty spec, "A=1;", ";;"), too many
 * settings or variants. */
int env_variants_parse(const char *spec, struct env_variant *variants, int max, int *count,
                       char *why, size_t why_size);

/* Sets the variant's settings, their earlier values kept in *saved. 0, or -1 (no memory, or
 * setenv failed; whatever was set is then restored). */
int env_variant_apply(const struct env_variant *variant, struct env_saved *saved);

/* Puts back what env_variant_apply replaced (unsets what was unset) and frees *saved's copies. */
void env_variant_restore(const struct env_variant *variant, struct env_saved *saved);

/* The median of values[0 .. n) (n > 0), which it sorts. */
double env_variants_median(double *values, int n);

/* Batch sizes from a comma-separated list ("1,8,32"): each 1 to 64, at most max of them. 0, or
 * -1 for anything else or an empty list. */
int env_variants_parse_batches(const char *list, int *batches, int max, int *count);

/* One measurement under the environment as it stands: ms per step and % of the bandwidth limit
 * at each of the batch sizes into ms[b] and percent[b]. 0, or -1 with why filled. */
typedef int (*env_variant_measure)(void *context, const int *batches, int batch_count, double *ms,
                                   double *percent, char *why, size_t why_size);

#define ENV_SWEEP_ROUNDS_MAX 64
#define ENV_SWEEP_BATCHES_MAX 8

/* measure under each variant in turn, `rounds` times (1 to ENV_SWEEP_ROUNDS_MAX; batch_count
 * 1 to ENV_SWEEP_BATCHES_MAX): forward in odd rounds, backward in even ones, so that no variant
 * always runs right after the same one; base's settings (NULL: none) are set under every
 * variant's. Prints each run's header, a failure's message, and then a line per variant: at each
 * batch size its median ms (best), its % of the limit at the median, its median against the
 * first variant's. A variant that fails is not run again. 0, or -1 if any failed (or no
 * memory). */
int env_variants_sweep(const struct env_variant *variants, int count,
                       const struct env_variant *base, const int *batches, int batch_count,
                       int rounds, env_variant_measure measure, void *context, FILE *out);

#endif
