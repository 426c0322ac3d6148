/* The error table of Algorithm 1 (LQ-LoRA §3.2): for every linear matrix and every NF
 * configuration of the grid, the squared Frobenius error of the LQ decomposition. It is the
 * expensive part of compression, so it is cached on disk, keyed by everything it depends on;
 * a second budget then costs one ILP solve. Rows are saved as they finish, so an interrupted
 * run resumes where it stopped. */
#ifndef LQ_ERROR_TABLE_H
#define LQ_ERROR_TABLE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/lq.h"
#include "core/nf.h"

/* A fast 64-bit hash of bytes (not cryptographic): 4 multiply-rotate lanes over 8-byte
 * words, then a final avalanche. Chain calls through `seed`. Same bytes, same hash on every
 * little-endian machine. */
uint64_t lq_hash_bytes(const void *data, size_t length, uint64_t seed);

#define LQ_WEIGHTING_NAME_SIZE 32

/* Everything a table's values depend on. Two runs with equal keys compute equal tables. */
struct lq_error_table_key {
    uint64_t source_hash; /* hash of the linear matrices' shapes and float data */
    size_t n_matrices;
    const struct lq_nf_config *grid; /* n_configs entries (borrowed) */
    size_t n_configs;
    struct lq_decompose_options decompose;  /* rank, steps, init, SVD settings, seed */
    char weighting[LQ_WEIGHTING_NAME_SIZE]; /* "none"; later the Fisher data's hash */
};

/* 64-bit digest of the whole key: names the cache file. */
uint64_t lq_error_table_key_hash(const struct lq_error_table_key *key);

struct lq_error_table {
    size_t n_matrices, n_configs;
    double *cost;  /* cost[i * n_configs + c]: squared error, valid where done[i] (owned) */
    uint8_t *done; /* done[i]: 1 when row i is complete (owned) */
};

/* Allocates an empty table (nothing done). Free with lq_error_table_free. */
int lq_error_table_create(size_t n_matrices, size_t n_configs, struct lq_error_table *out,
                          struct lq_error *err);
void lq_error_table_free(struct lq_error_table *table);
size_t lq_error_table_rows_done(const struct lq_error_table *table);

/* The default cache directory: $LQD_CACHE_DIR, else $XDG_CACHE_HOME/lqd, else
 * $HOME/.cache/lqd. LQ_ENOTFOUND when none of them is set. */
int lq_error_table_cache_dir_default(char *buffer, size_t size, struct lq_error *err);
/* "<dir>/error-table-<key hash>.bin". */
int lq_error_table_cache_path(const char *dir, const struct lq_error_table_key *key, char *buffer,
                              size_t size, struct lq_error *err);

/* Reads the rows done from a cache file into table (sized for key). LQ_ENOTFOUND when the
 * file does not exist; LQ_EFORMAT when it is truncated, fails its checksum, holds
 * non-finite or negative errors, or was made for another key: the caller warns and starts
 * afresh (table is then left empty). */
int lq_error_table_load(const char *path, const struct lq_error_table_key *key,
                        struct lq_error_table *table, struct lq_error *err);

/* Writes the table (its done rows) atomically, creating the directory if needed. */
int lq_error_table_save(const char *path, const struct lq_error_table_key *key,
                        const struct lq_error_table *table, struct lq_error *err);

#endif
