/* Environment variants for benchmarks (env_variants.h). */
#define _POSIX_C_SOURCE 200809L
#include "env_variants.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int refuse(char *why, size_t why_size, const char *format, ...) {
    va_list args;
    va_start(args, format);
    if (why && why_size) vsnprintf(why, why_size, format, args);
    va_end(args);
    return -1;
}

static int valid_name(const char *name, size_t length) {
    if (length == 0 || (name[0] >= '0' && name[0] <= '9')) return 0;
    for (size_t i = 0; i < length; i++)
        if (!((name[i] >= 'A' && name[i] <= 'Z') || (name[i] >= '0' && name[i] <= '9') ||
              name[i] == '_'))
            return 0;
    return 1;
}

/* One setting, text[0 .. length), into variant. */
static int parse_setting(const char *text, size_t length, struct env_variant *variant, char *why,
                         size_t why_size) {
    const char *equals = memchr(text, '=', length);
    const int shown = length > 60 ? 60 : (int)length;
    if (!equals) return refuse(why, why_size, "'%.*s': not NAME=VALUE", shown, text);
    const size_t name_length = (size_t)(equals - text), value_length = length - name_length - 1;
    if (!valid_name(text, name_length) || name_length >= sizeof variant->settings[0].name)
        return refuse(why, why_size, "'%.*s': the name is not [A-Z_][A-Z0-9_]* (at most %zu)",
                      shown, text, sizeof variant->settings[0].name - 1);
    if (value_length == 0 || value_length >= sizeof variant->settings[0].value)
        return refuse(why, why_size, "'%.*s': the value is empty or longer than %zu", shown, text,
                      sizeof variant->settings[0].value - 1);
    if (variant->count == ENV_SETTINGS_MAX)
        return refuse(why, why_size, "'%.*s': more than %d settings in a variant", shown, text,
                      ENV_SETTINGS_MAX);
    for (int i = 0; i < variant->count; i++)
        if (strlen(variant->settings[i].name) == name_length &&
            memcmp(variant->settings[i].name, text, name_length) == 0)
            return refuse(why, why_size, "'%.*s': the name is set twice in one variant", shown,
                          text);
    struct env_setting *s = &variant->settings[variant->count++];
    memcpy(s->name, text, name_length), s->name[name_length] = '\0';
    memcpy(s->value, equals + 1, value_length), s->value[value_length] = '\0';
    return 0;
}

/* One variant, text[0 .. length) (settings separated by spaces or commas; "-": none). */
static int parse_variant(const char *text, size_t length, struct env_variant *variant, char *why,
                         size_t why_size) {
    memset(variant, 0, sizeof *variant);
    if (strspn(text, " ,\t") >= length)
        return refuse(why, why_size, "an empty variant (\"-\" is the environment as it is)");
    size_t i = 0;
    while (i < length) {
        while (i < length && (text[i] == ' ' || text[i] == ',' || text[i] == '\t')) i++;
        size_t end = i;
        while (end < length && text[end] != ' ' && text[end] != ',' && text[end] != '\t') end++;
        if (end > i && !(end - i == 1 && text[i] == '-') &&
            parse_setting(text + i, end - i, variant, why, why_size))
            return -1;
        i = end;
    }
    size_t at = 0;
    for (int k = 0; k < variant->count; k++)
        at += (size_t)snprintf(variant->label + at, sizeof variant->label - at, "%s%s=%s",
                               k ? " " : "", variant->settings[k].name, variant->settings[k].value);
    if (variant->count == 0) snprintf(variant->label, sizeof variant->label, "defaults");
    return 0;
}

int env_variants_parse(const char *spec, struct env_variant *variants, int max, int *count,
                       char *why, size_t why_size) {
    *count = 0;
    if (!spec) return refuse(why, why_size, "no variants given");
    const char *at = spec;
    for (;;) {
        const char *end = strchr(at, ';');
        const size_t length = end ? (size_t)(end - at) : strlen(at);
        if (*count == max) return refuse(why, why_size, "more than %d variants", max);
        if (parse_variant(at, length, &variants[*count], why, why_size)) return -1;
        (*count)++;
        if (!end) break;
        at = end + 1;
    }
    return 0;
}

int env_variant_apply(const struct env_variant *variant, struct env_saved *saved) {
    memset(saved, 0, sizeof *saved);
    for (int i = 0; i < variant->count; i++) {
        const struct env_setting *s = &variant->settings[i];
        const char *previous = getenv(s->name);
        if ((previous && !(saved->previous[i] = strdup(previous))) ||
            setenv(s->name, s->value, 1) != 0) {
            /* setting i is as it was (a failed setenv changes nothing): put back those before */
            free(saved->previous[i]), saved->previous[i] = NULL;
            struct env_variant done = *variant;
            done.count = i;
            env_variant_restore(&done, saved);
            return -1;
        }
    }
    return 0;
}

void env_variant_restore(const struct env_variant *variant, struct env_saved *saved) {
    for (int i = 0; i < variant->count; i++) {
        if (saved->previous[i])
            setenv(variant->settings[i].name, saved->previous[i], 1);
        else
            unsetenv(variant->settings[i].name);
        free(saved->previous[i]), saved->previous[i] = NULL;
    }
}

static int compare_doubles(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double env_variants_median(double *values, int n) {
    qsort(values, (size_t)n, sizeof *values, compare_doubles);
    return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

int env_variants_parse_batches(const char *list, int *batches, int max, int *count) {
    *count = 0;
    const char *at = list;
    while (at && *at) {
        char *end;
        const long n = strtol(at, &end, 10);
        if (end == at || (*end && *end != ',') || n < 1 || n > 64 || *count == max) return -1;
        batches[(*count)++] = (int)n;
        at = *end ? end + 1 : end;
        if (*end && !*at) return -1; /* a trailing comma */
    }
    return *count > 0 ? 0 : -1;
}

static const struct env_variant no_settings; /* a base of NULL */

/* Sets base's settings, then the variant's; -1 (nothing left set) if either could not be. */
static int apply_both(const struct env_variant *base, const struct env_variant *variant,
                      struct env_saved *base_saved, struct env_saved *saved) {
    if (env_variant_apply(base ? base : &no_settings, base_saved)) return -1;
    if (env_variant_apply(variant, saved) == 0) return 0;
    env_variant_restore(base ? base : &no_settings, base_saved);
    return -1;
}

/* Undoes apply_both: the variant's settings, then base's. */
static void restore_both(const struct env_variant *base, const struct env_variant *variant,
                         struct env_saved *base_saved, struct env_saved *saved) {
    env_variant_restore(variant, saved);
    env_variant_restore(base ? base : &no_settings, base_saved);
}

static void print_summary(const struct env_variant *variants, int count, const int *batches,
                          int batch_count, int rounds, double *ms, double *percent,
                          const int *failed, FILE *out) {
    fprintf(out,
            "\nsummary over %d round%s: median ms/step (best), %% of the bandwidth limit at the "
            "median, median against the first variant's\n",
            rounds, rounds == 1 ? "" : "s");
    double first[ENV_SWEEP_BATCHES_MAX] = {0};
    for (int v = 0; v < count; v++) {
        fprintf(out, "%-64s", variants[v].label);
        for (int b = 0; b < batch_count; b++) {
            if (failed[v]) {
                fprintf(out, "  batch %d: failed", batches[b]);
                continue;
            }
            double *times = ms + ((size_t)v * batch_count + b) * rounds;
            double *shares = percent + ((size_t)v * batch_count + b) * rounds;
            const double median = env_variants_median(times, rounds); /* sorts: times[0] best */
            const double share = env_variants_median(shares, rounds);
            if (v == 0) first[b] = median;
            fprintf(out, "  batch %d: %7.3f (%7.3f) %3.0f%%", batches[b], median, times[0], share);
            if (first[b] > 0) fprintf(out, " %5.3fx", median / first[b]);
        }
        fprintf(out, "\n");
    }
}

int env_variants_sweep(const struct env_variant *variants, int count,
                       const struct env_variant *base, const int *batches, int batch_count,
                       int rounds, env_variant_measure measure, void *context, FILE *out) {
    if (count < 1 || rounds < 1 || rounds > ENV_SWEEP_ROUNDS_MAX || batch_count < 1 ||
        batch_count > ENV_SWEEP_BATCHES_MAX)
        return -1;
    /* [variant][batch][round] */
    const size_t cells = (size_t)count * (size_t)batch_count * (size_t)rounds;
    double *ms = calloc(cells, sizeof *ms), *percent = calloc(cells, sizeof *percent);
    int *failed = calloc((size_t)count, sizeof *failed);
    const int no_memory = !ms || !percent || !failed;
    int any_failed = no_memory;
    for (int r = 0; r < rounds && !no_memory; r++)
        for (int k = 0; k < count; k++) {
            const int v = r % 2 ? count - 1 - k : k;
            if (failed[v]) continue;
            fprintf(out, "\nround %d of %d, %s:\n", r + 1, rounds, variants[v].label);
            fflush(out);
            double run_ms[ENV_SWEEP_BATCHES_MAX], run_percent[ENV_SWEEP_BATCHES_MAX];
            char why[256] = "the environment could not be set";
            struct env_saved base_saved, saved;
            int rc = apply_both(base, &variants[v], &base_saved, &saved);
            if (rc == 0) {
                why[0] = '\0';
                rc = measure(context, batches, batch_count, run_ms, run_percent, why, sizeof why);
                restore_both(base, &variants[v], &base_saved, &saved);
            }
            if (rc) {
                fprintf(out, "FAILED: %s: %s\n", variants[v].label, why);
                failed[v] = any_failed = 1;
                continue;
            }
            for (int b = 0; b < batch_count; b++) {
                const size_t at = ((size_t)v * batch_count + b) * rounds + r;
                ms[at] = run_ms[b], percent[at] = run_percent[b];
            }
        }
    if (!no_memory)
        print_summary(variants, count, batches, batch_count, rounds, ms, percent, failed, out);
    fflush(out);
    free(ms), free(percent), free(failed);
    return any_failed ? -1 : 0;
}
