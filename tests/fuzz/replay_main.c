/* Replays a libFuzzer corpus without libFuzzer, so CI can run fuzz targets under gcc and
 * the sanitizers: every file given (or found in a directory given) goes to
 * LLVMFuzzerTestOneInput as is, then as a few thousand deterministic mutations of it (bit
 * flips, byte edits, insertions, deletions, truncations, JSON-flavoured tokens).
 *
 *   replay [--mutations=N] [--seed=S] DIR_OR_FILE...
 *
 * Exits 0 when every input ran. A crash (sanitizer report, trap, signal) writes the input
 * that caused it to ./crash-replay-<file>-<mutation> (or $LQ_FUZZ_CRASH_DIR) so that it
 * can be replayed alone or added to the corpus. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Present when a sanitizer runtime is linked: lets us save the input before it exits. */
extern void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

/* UBSan stops through its own runtime, which skips that callback: have it abort instead, so
 * that the SIGABRT handler below saves the input. Read by UBSan at start-up when linked. */
const char *__ubsan_default_options(void);
const char *__ubsan_default_options(void) {
    return "abort_on_error=1:print_stacktrace=1";
}

/* The input being run, for the crash handlers (which may only use async-signal-safe calls). */
static const uint8_t *current_data;
static size_t current_size;
static char crash_path[4096];

static void save_current_input(void) {
    static const char note[] = "replay: crashing input saved to ";
    int fd = open(crash_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return;
    size_t done = 0;
    while (done < current_size) {
        ssize_t n = write(fd, current_data + done, current_size - done);
        if (n <= 0) break;
        done += (size_t)n;
    }
    close(fd);
    if (write(2, note, sizeof note - 1) < 0 || write(2, crash_path, strlen(crash_path)) < 0 ||
        write(2, "\n", 1) < 0)
        return;
}

static void on_signal(int signal_number) {
    save_current_input();
    signal(signal_number, SIG_DFL);
    raise(signal_number);
}

/* Run one input from an exact-size heap copy, so that ASan sees any read past its end. */
static void run_input(const uint8_t *data, size_t size, const char *name, long mutation) {
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) {
        fprintf(stderr, "replay: out of memory for %zu bytes\n", size);
        exit(1);
    }
    if (size) memcpy(copy, data, size);
    const char *directory = getenv("LQ_FUZZ_CRASH_DIR");
    const char *base = strrchr(name, '/') ? strrchr(name, '/') + 1 : name;
    snprintf(crash_path, sizeof crash_path, "%s/crash-replay-%s-%ld",
             directory && *directory ? directory : ".", base, mutation);
    current_data = copy;
    current_size = size;
    LLVMFuzzerTestOneInput(copy, size);
    current_data = NULL;
    current_size = 0;
    free(copy);
}

static uint64_t rng_next(uint64_t *state) /* splitmix64: tiny, seedable, good enough */
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static size_t rng_below(uint64_t *state, size_t bound) {
    return bound ? (size_t)(rng_next(state) % bound) : 0;
}

/* Text that moves a JSON header across the reader's checks: limits, types, dtypes. */
static const char *const tokens[] = {
    "null",
    "true",
    "\"F16\"",
    "\"BF16\"",
    "\"F32\"",
    "\"U8\"",
    "\"shape\"",
    "[]",
    "{}",
    "[0,0]",
    ",",
    ":",
    "\"__metadata__\"",
    "\"dtype\"",
    "\"x\"",
    "[",
    "{",
    "]",
    "}",
    "\"\\u0000\"",
    "\"data_offsets\"",
    "\"\\ud800\"",
    "\"I64\"",
    "\"F8_E4M3\"",
};
static const char *const numbers[] = {
    "0",
    "1",
    "2",
    "3",
    "4",
    "8",
    "12",
    "16",
    "24",
    "-1",
    "2.5",
    "1e3",
    "1e400",
    "65536",
    "-0",
    "4294967296",
    "9007199254740992",
    "9007199254740993",
    "18446744073709551616",
};

#define PICK(state, array) (array)[rng_below(state, sizeof(array) / sizeof((array)[0]))]

/* The header's byte range when the 8-byte length is sane, else the whole buffer. */
static void header_range(const uint8_t *data, size_t size, size_t *begin, size_t *end) {
    uint64_t length = 0;
    for (int i = 0; i < 8 && (size_t)i < size; i++) length |= (uint64_t)data[i] << (8 * i);
    *begin = size >= 8 && length <= size - 8 ? 8 : 0;
    *end = *begin ? 8 + (size_t)length : size;
}

static void set_header_length(uint8_t *data, size_t size, uint64_t length) {
    for (int i = 0; i < 8 && (size_t)i < size; i++) data[i] = (uint8_t)(length >> (8 * i));
}

/* Replaces data[at, at + old_length) by text; returns the change in size (0 if no room). */
static long replace(uint8_t *data, size_t *size, size_t capacity, size_t at, size_t old_length,
                    const char *text) {
    size_t length = strlen(text);
    if (at + old_length > *size || *size - old_length + length > capacity) return 0;
    memmove(data + at + length, data + at + old_length, *size - at - old_length);
    memcpy(data + at, text, length);
    *size = *size - old_length + length;
    return (long)length - (long)old_length;
}

/* Length of the run at data[at] of bytes in set (a digit run, a quoted string's body). */
static size_t span(const uint8_t *data, size_t size, size_t at, const char *set) {
    size_t length = 0;
    while (at + length < size && data[at + length] && strchr(set, data[at + length])) length++;
    return length;
}

/* Applies one random edit to data[0..*size) (capacity bytes available). Most edits keep the
 * header JSON-like and its 8-byte length in step, so inputs get past the parser into the
 * checks behind it; a few break the framing itself. */
static void mutate(uint8_t *data, size_t *size, size_t capacity, uint64_t *state) {
    size_t begin, end;
    header_range(data, *size, &begin, &end);
    int in_header = begin == 8 && end > begin && rng_below(state, 8) != 0;
    size_t at = in_header ? begin + rng_below(state, end - begin) : rng_below(state, *size);
    long delta = 0;
    if (*size == 0) return;
    switch (rng_below(state, 16)) {
    case 0: /* flip a bit */
        data[at] ^= (uint8_t)(1u << rng_below(state, 8));
        break;
    case 1: /* any byte */
        data[at] = (uint8_t)rng_next(state);
        break;
    case 2: /* a printable byte */
        data[at] = (uint8_t)(' ' + rng_below(state, 95));
        break;
    case 3:
    case 4: /* insert a token */
        delta = replace(data, size, capacity, at, 0, PICK(state, tokens));
        break;
    case 5: /* delete a few bytes */
        delta = replace(data, size, capacity, at, 1 + rng_below(state, 8), "");
        break;
    case 6: /* truncate */
        *size = rng_below(state, *size + 1);
        break;
    case 7: { /* copy a chunk over another: repeated entries, shifted values */
        size_t length = 1 + rng_below(state, 32), from = rng_below(state, *size);
        if (from + length <= *size && at + length <= *size) memmove(data + at, data + from, length);
        break;
    }
    case 8: /* header length: near the true one, or anything */
        if (*size >= 8)
            set_header_length(data, *size,
                              rng_below(state, 2)
                                  ? (uint64_t)(end - begin) + rng_below(state, 5) - 2
                                  : rng_next(state) >> rng_below(state, 64));
        break;
    case 9:
    case 10:
    case 11: { /* the number at or after `at` replaced: shapes and offsets that nearly agree */
        while (at < end && !(data[at] >= '0' && data[at] <= '9')) at++;
        delta = replace(data, size, capacity, at, span(data, *size, at, "0123456789.eE+-"),
                        PICK(state, numbers));
        break;
    }
    case 12:
    case 13: /* one digit changed */
        if (data[at] >= '0' && data[at] <= '9') data[at] = (uint8_t)('0' + rng_below(state, 10));
        break;
    default: { /* the string at or after `at` replaced: dtypes, field names, duplicates */
        while (at < end && data[at] != '"') at++;
        size_t length = at < end ? 2 + span(data, *size, at + 1,
                                            "abcdefghijklmnopqrstuvwxyz"
                                            "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                            "0123456789_.")
                                 : 0;
        if (at + length <= *size && length >= 2 && data[at + length - 1] == '"')
            delta = replace(data, size, capacity, at, length, PICK(state, tokens));
        break;
    }
    }
    if (delta && in_header && rng_below(state, 8) != 0)
        set_header_length(data, *size, (uint64_t)((long)(end - begin) + delta));
}

static int load(const char *path, uint8_t **data, size_t *size) {
    FILE *file = fopen(path, "rb");
    if (!file) return -1;
    size_t capacity = 4096, length = 0;
    uint8_t *buffer = malloc(capacity);
    while (buffer) {
        length += fread(buffer + length, 1, capacity - length, file);
        if (length < capacity) break;
        uint8_t *bigger = realloc(buffer, capacity * 2);
        if (!bigger) free(buffer);
        buffer = bigger;
        capacity *= 2;
    }
    int failed = ferror(file) || !buffer;
    fclose(file);
    if (failed) {
        free(buffer);
        return -1;
    }
    *data = buffer;
    *size = length;
    return 0;
}

static int compare_strings(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int append(char ***list, size_t *count, char *name) {
    char **bigger = name ? realloc(*list, (*count + 1) * sizeof **list) : NULL;
    if (!bigger) {
        free(name);
        return -1;
    }
    *list = bigger;
    (*list)[(*count)++] = name;
    return 0;
}

/* Appends path, or the regular files directly inside it in name order, to *list. */
static int collect(const char *path, char ***list, size_t *count) {
    struct stat info;
    if (stat(path, &info) != 0) return -1;
    if (!S_ISDIR(info.st_mode)) return append(list, count, strdup(path));
    DIR *dir = opendir(path);
    if (!dir) return -1;
    size_t first = *count;
    int rc = 0;
    struct dirent *entry;
    while (rc == 0 && (entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.') continue;
        size_t length = strlen(path) + strlen(entry->d_name) + 2;
        char *name = malloc(length);
        if (!name) return closedir(dir), -1;
        snprintf(name, length, "%s/%s", path, entry->d_name);
        struct stat child;
        if (stat(name, &child) != 0 || !S_ISREG(child.st_mode)) {
            free(name);
            continue;
        }
        rc = append(list, count, name);
    }
    closedir(dir);
    qsort(*list + first, *count - first, sizeof **list, compare_strings);
    return rc;
}

int main(int argc, char **argv) {
    long mutations = 2000;
    uint64_t seed = 1;
    char **files = NULL;
    size_t file_count = 0;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--mutations=", 12) == 0) {
            mutations = strtol(argv[i] + 12, NULL, 10);
        } else if (strncmp(argv[i], "--seed=", 7) == 0) {
            seed = strtoull(argv[i] + 7, NULL, 10);
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "usage: %s [--mutations=N] [--seed=S] DIR_OR_FILE...\n", argv[0]);
            return 2;
        } else if (collect(argv[i], &files, &file_count) != 0) {
            fprintf(stderr, "replay: cannot read %s: %s\n", argv[i], strerror(errno));
            return 1;
        }
    }
    if (file_count == 0) {
        fprintf(stderr, "replay: no inputs (usage: %s [--mutations=N] DIR_OR_FILE...)\n", argv[0]);
        return 1;
    }
    if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(save_current_input);
    int signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
    for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++) signal(signals[i], on_signal);

    long inputs = 0;
    for (size_t f = 0; f < file_count; f++) {
        uint8_t *original = NULL;
        size_t size = 0;
        if (load(files[f], &original, &size) != 0) {
            fprintf(stderr, "replay: cannot read %s\n", files[f]);
            return 1;
        }
        run_input(original, size, files[f], -1);
        inputs++;
        /* Seeded by the file's name, so adding a file leaves the others' mutations alone. */
        uint64_t state = seed;
        for (const char *p = strrchr(files[f], '/') ? strrchr(files[f], '/') : files[f]; *p; p++)
            state = (state ^ (uint8_t)*p) * 0x100000001b3ull;
        size_t capacity = size + 256;
        uint8_t *buffer = malloc(capacity);
        for (long m = 0; buffer && m < mutations; m++) {
            memcpy(buffer, original, size);
            size_t length = size;
            int edits = 1 + (int)rng_below(&state, 4);
            for (int e = 0; e < edits; e++) mutate(buffer, &length, capacity, &state);
            run_input(buffer, length, files[f], m);
            inputs++;
        }
        free(buffer);
        free(original);
        free(files[f]);
    }
    free(files);
    printf("replay: %zu files, %ld inputs (%ld mutations each), no crash\n", file_count, inputs,
           mutations);
    return 0;
}
