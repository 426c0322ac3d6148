#include "error_table.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "file_util.h"

/* ---------- hashing ---------- */

/* The primes and lane structure of xxHash64 (public domain design): four independent lanes
 * keep the multiplier pipeline busy, so hashing runs at memory speed. */
#define PRIME1 0x9E3779B185EBCA87ull
#define PRIME2 0xC2B2AE3D27D4EB4Full
#define PRIME3 0x165667B19E3779F9ull
#define PRIME4 0x85EBCA77C2B2AE63ull
#define PRIME5 0x27D4EB2F165667C5ull

static uint64_t rotate_left(uint64_t x, int r) {
    return (x << r) | (x >> (64 - r));
}

static uint64_t read64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static uint64_t lane_round(uint64_t lane, uint64_t input) {
    lane += input * PRIME2;
    return rotate_left(lane, 31) * PRIME1;
}

uint64_t lq_hash_bytes(const void *data, size_t length, uint64_t seed) {
    const unsigned char *p = data;
    size_t left = length;
    uint64_t h;
    if (left >= 32) {
        uint64_t v1 = seed + PRIME1 + PRIME2, v2 = seed + PRIME2, v3 = seed, v4 = seed - PRIME1;
        for (; left >= 32; left -= 32, p += 32) {
            v1 = lane_round(v1, read64(p));
            v2 = lane_round(v2, read64(p + 8));
            v3 = lane_round(v3, read64(p + 16));
            v4 = lane_round(v4, read64(p + 24));
        }
        h = rotate_left(v1, 1) + rotate_left(v2, 7) + rotate_left(v3, 12) + rotate_left(v4, 18);
        uint64_t lanes[4] = {v1, v2, v3, v4};
        for (int i = 0; i < 4; i++) h = (h ^ lane_round(0, lanes[i])) * PRIME1 + PRIME4;
    } else {
        h = seed + PRIME5;
    }
    h += (uint64_t)length;
    for (; left >= 8; left -= 8, p += 8)
        h = rotate_left(h ^ lane_round(0, read64(p)), 27) * PRIME1 + PRIME4;
    for (; left > 0; left--, p++) h = rotate_left(h ^ (*p * PRIME5), 11) * PRIME1;
    h ^= h >> 33;
    h *= PRIME2;
    h ^= h >> 29;
    h *= PRIME3;
    h ^= h >> 32;
    return h;
}

/* ---------- the key, serialized ---------- */

/* A growable byte buffer with little-endian fixed-width appends. */
struct bytes {
    unsigned char *data;
    size_t length, capacity;
    int failed;
};

static void bytes_append(struct bytes *b, const void *data, size_t length) {
    if (b->failed) return;
    if (b->length + length > b->capacity) {
        size_t capacity = b->capacity ? b->capacity : 256;
        while (capacity < b->length + length) capacity *= 2;
        unsigned char *grown = realloc(b->data, capacity);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->data = grown, b->capacity = capacity;
    }
    memcpy(b->data + b->length, data, length);
    b->length += length;
}

static void put_u64(struct bytes *b, uint64_t v) {
    bytes_append(b, &v, sizeof v);
}
static void put_i32(struct bytes *b, int32_t v) {
    bytes_append(b, &v, sizeof v);
}
static void put_f64(struct bytes *b, double v) {
    bytes_append(b, &v, sizeof v);
}
static void pad8(struct bytes *b) {
    static const unsigned char zeros[8] = {0};
    if (b->length % 8) bytes_append(b, zeros, 8 - b->length % 8);
}

/* Every field the table's values depend on, in a fixed order: equal keys, equal bytes. */
static void serialize_key(const struct lq_error_table_key *key, struct bytes *b) {
    const struct lq_decompose_options *d = &key->decompose;
    put_u64(b, key->source_hash);
    put_u64(b, key->n_matrices);
    put_u64(b, key->n_configs);
    for (size_t c = 0; c < key->n_configs; c++) {
        const struct lq_nf_config *g = &key->grid[c];
        put_i32(b, g->b0), put_i32(b, g->b1), put_i32(b, (int32_t)g->b2);
        put_i32(b, g->B0), put_i32(b, g->B1);
    }
    put_i32(b, d->rank), put_i32(b, d->max_iters), put_i32(b, (int32_t)d->init);
    put_f64(b, d->min_improvement);
    put_i32(b, (int32_t)d->svd.method), put_i32(b, d->svd.oversample);
    put_i32(b, d->svd.power_iters);
    put_u64(b, d->svd.seed);
    char weighting[LQ_WEIGHTING_NAME_SIZE] = {0};
    snprintf(weighting, sizeof weighting, "%s", key->weighting);
    bytes_append(b, weighting, sizeof weighting);
    pad8(b);
}

uint64_t lq_error_table_key_hash(const struct lq_error_table_key *key) {
    struct bytes b = {0};
    serialize_key(key, &b);
    uint64_t h = b.failed ? 0 : lq_hash_bytes(b.data, b.length, 0x6c71642d7461626cull);
    free(b.data);
    return h;
}

/* ---------- the table ---------- */

int lq_error_table_create(size_t n_matrices, size_t n_configs, struct lq_error_table *out,
                          struct lq_error *err) {
    memset(out, 0, sizeof *out);
    if (n_configs && n_matrices > SIZE_MAX / sizeof(double) / n_configs)
        return lq_error_set(err, LQ_EINVAL, "error table of %zu x %zu is too large", n_matrices,
                            n_configs);
    out->cost = calloc(n_matrices * n_configs + 1, sizeof *out->cost);
    out->done = calloc(n_matrices + 1, 1);
    if (!out->cost || !out->done) {
        lq_error_table_free(out);
        return lq_error_set(err, LQ_ENOMEM, "out of memory for the error table");
    }
    out->n_matrices = n_matrices, out->n_configs = n_configs;
    return LQ_OK;
}

void lq_error_table_free(struct lq_error_table *table) {
    free(table->cost);
    free(table->done);
    memset(table, 0, sizeof *table);
}

size_t lq_error_table_rows_done(const struct lq_error_table *table) {
    size_t done = 0;
    for (size_t i = 0; i < table->n_matrices; i++) done += table->done[i] != 0;
    return done;
}

/* ---------- the cache file ---------- */

int lq_error_table_cache_dir_default(char *buffer, size_t size, struct lq_error *err) {
    const char *value = getenv("LQD_CACHE_DIR");
    int n;
    if (value && *value)
        n = snprintf(buffer, size, "%s", value);
    else if ((value = getenv("XDG_CACHE_HOME")) && *value)
        n = snprintf(buffer, size, "%s/lqd", value);
    else if ((value = getenv("HOME")) && *value)
        n = snprintf(buffer, size, "%s/.cache/lqd", value);
    else
        return lq_error_set(err, LQ_ENOTFOUND,
                            "no cache directory: set LQD_CACHE_DIR, XDG_CACHE_HOME or HOME");
    if (n < 0 || (size_t)n >= size)
        return lq_error_set(err, LQ_EINVAL, "cache directory path too long");
    return LQ_OK;
}

int lq_error_table_cache_path(const char *dir, const struct lq_error_table_key *key, char *buffer,
                              size_t size, struct lq_error *err) {
    int n = snprintf(buffer, size, "%s/error-table-%016llx.bin", dir,
                     (unsigned long long)lq_error_table_key_hash(key));
    if (n < 0 || (size_t)n >= size) return lq_error_set(err, LQ_EINVAL, "%s: path too long", dir);
    return LQ_OK;
}

/* File layout (native little-endian):
 *   "LQDERRTB" | u32 version | u32 key bytes | key (padded to 8) | done[n_matrices] (padded to 8)
 *   | f64 cost[n_matrices * n_configs] | u64 hash of everything before. */
static const char file_magic[8] = {'L', 'Q', 'D', 'E', 'R', 'R', 'T', 'B'};
#define FILE_VERSION 1u

static int make_dirs(const char *path, struct lq_error *err) {
    char copy[4096];
    if (snprintf(copy, sizeof copy, "%s", path) >= (int)sizeof copy)
        return lq_error_set(err, LQ_EINVAL, "%s: path too long", path);
    for (char *p = copy + 1;; p++) {
        if (*p != '/' && *p != '\0') continue;
        char saved = *p;
        *p = '\0';
        if (mkdir(copy, 0755) != 0 && errno != EEXIST)
            return lq_error_set(err, LQ_EIO, "%s: %s", copy, strerror(errno));
        *p = saved;
        if (saved == '\0') break;
    }
    if (!lq_path_is_dir(path)) return lq_error_set(err, LQ_EIO, "%s: not a directory", path);
    return LQ_OK;
}

int lq_error_table_save(const char *path, const struct lq_error_table_key *key,
                        const struct lq_error_table *table, struct lq_error *err) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = '\0';
        int rc = make_dirs(dir, err);
        if (rc) return rc;
    }
    struct bytes serialized = {0}, file = {0};
    serialize_key(key, &serialized);
    bytes_append(&file, file_magic, sizeof file_magic);
    uint32_t header[2] = {FILE_VERSION, (uint32_t)serialized.length};
    bytes_append(&file, header, sizeof header);
    if (!serialized.failed) bytes_append(&file, serialized.data, serialized.length);
    bytes_append(&file, table->done, table->n_matrices);
    pad8(&file);
    bytes_append(&file, table->cost, table->n_matrices * table->n_configs * sizeof(double));
    put_u64(&file, file.failed ? 0 : lq_hash_bytes(file.data, file.length, 0));
    int rc;
    if (serialized.failed || file.failed)
        rc = lq_error_set(err, LQ_ENOMEM, "%s: out of memory", path);
    else
        rc = lq_file_write_atomic(path, file.data, file.length, err);
    free(serialized.data);
    free(file.data);
    return rc;
}

int lq_error_table_load(const char *path, const struct lq_error_table_key *key,
                        struct lq_error_table *table, struct lq_error *err) {
    if (!lq_path_is_file(path)) return lq_error_set(err, LQ_ENOTFOUND, "%s: no cache file", path);
    struct bytes serialized = {0};
    serialize_key(key, &serialized);
    if (serialized.failed) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", path);
    size_t n = table->n_matrices, cells = n * table->n_configs;
    size_t done_bytes = (n + 7) / 8 * 8;
    size_t expected = sizeof file_magic + 8 + serialized.length + done_bytes + cells * 8 + 8;
    char *data = NULL;
    size_t length = 0;
    int rc = lq_file_read_all(path, expected + 1, &data, &length, err);
    if (rc) {
        free(serialized.data);
        /* A file larger than the table it should hold is corrupt, not unreadable. */
        if (rc == LQ_EFORMAT) return lq_error_set(err, LQ_EFORMAT, "%s: wrong size", path);
        return rc;
    }
    const unsigned char *p = (const unsigned char *)data;
    uint32_t header[2] = {0, 0};
    uint64_t checksum = 0;
    if (length == expected) {
        memcpy(header, p + sizeof file_magic, sizeof header);
        memcpy(&checksum, p + length - 8, sizeof checksum);
    }
    if (length != expected)
        rc = lq_error_set(err, LQ_EFORMAT,
                          "%s: %zu bytes, expected %zu (truncated or another table)", path, length,
                          expected);
    else if (memcmp(p, file_magic, sizeof file_magic) != 0 || header[0] != FILE_VERSION)
        rc = lq_error_set(err, LQ_EFORMAT, "%s: not an lqd error table (version %u)", path,
                          header[0]);
    else if (lq_hash_bytes(p, length - 8, 0) != checksum)
        rc = lq_error_set(err, LQ_EFORMAT, "%s: checksum mismatch", path);
    else if (header[1] != serialized.length ||
             memcmp(p + sizeof file_magic + 8, serialized.data, serialized.length) != 0)
        rc = lq_error_set(err, LQ_EFORMAT, "%s: made for another model, rank, grid or setting",
                          path);
    free(serialized.data);
    if (rc) {
        free(data);
        return rc;
    }
    const unsigned char *done = p + sizeof file_magic + 8 + header[1];
    const unsigned char *costs = done + done_bytes;
    for (size_t i = 0; i < n && !rc; i++) {
        if (done[i] > 1) {
            rc = lq_error_set(err, LQ_EFORMAT, "%s: bad row flag %u", path, done[i]);
            break;
        }
        table->done[i] = done[i];
        memcpy(table->cost + i * table->n_configs, costs + i * table->n_configs * 8,
               table->n_configs * 8);
        for (size_t c = 0; done[i] && c < table->n_configs; c++) {
            double v = table->cost[i * table->n_configs + c];
            if (!isfinite(v) || v < 0.0) {
                rc =
                    lq_error_set(err, LQ_EFORMAT,
                                 "%s: error of matrix %zu, configuration %zu is %g", path, i, c, v);
                break;
            }
        }
    }
    free(data);
    if (rc) {
        memset(table->done, 0, n);
        memset(table->cost, 0, cells * sizeof(double));
    }
    return rc;
}
