/* The configuration grid and what one of its cells is: the options' defaults, a grid parsed
 * from text (lqd compress --configs, the jobs API), and the one decomposition that a (matrix,
 * configuration) cell of the error table stands for. lq_compress's worker threads and the MPI
 * ranks (core/compress_mpi_serve.c) both decompose through lq_compress_decompose_cell and
 * lq_compress_table_costs, so every process computes the same bits. */
#include "compress.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "error_table.h"
#include "file_util.h"
#include "lq.h"

#define MAX_GRID 65536

/* ---------- options and grids ---------- */

void lq_compress_options_default(struct lq_compress_options *o) {
    memset(o, 0, sizeof *o);
    o->rank = 64;
    o->iters = 20;
    o->use_cache = 1;
}

const char *lq_compress_phase_name(enum lq_compress_phase phase) {
    switch (phase) {
    case LQ_COMPRESS_TABLE:
        return "error table";
    case LQ_COMPRESS_ILP:
        return "allocation";
    case LQ_COMPRESS_FINAL:
        return "decomposition";
    }
    return "?";
}

static int grid_append(struct lq_nf_config **grid, size_t *count, const char *text,
                       struct lq_error *err) {
    struct lq_nf_config c;
    int rc = lq_nf_config_parse(text, &c, err);
    if (rc) return rc;
    for (size_t i = 0; i < *count; i++)
        if (memcmp(&(*grid)[i], &c, sizeof c) == 0)
            return lq_error_set(err, LQ_EINVAL, "configuration '%s' is listed twice", text);
    if (*count == MAX_GRID)
        return lq_error_set(err, LQ_EINVAL, "more than %d configurations", MAX_GRID);
    struct lq_nf_config *grown = realloc(*grid, (*count + 1) * sizeof *grown);
    if (!grown) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    grown[(*count)++] = c;
    *grid = grown;
    return LQ_OK;
}

/* Splits text at ';' and newlines, drops '#' comments and blanks, parses each piece. */
static int grid_parse_list(char *text, struct lq_nf_config **grid, size_t *count,
                           struct lq_error *err) {
    char *cursor = text;
    while (*cursor) {
        size_t length = strcspn(cursor, ";\n");
        char saved = cursor[length];
        cursor[length] = '\0';
        char *comment = strchr(cursor, '#');
        if (comment) *comment = '\0';
        char *start = cursor, *end = cursor + strlen(cursor);
        while (isspace((unsigned char)*start)) start++;
        while (end > start && isspace((unsigned char)end[-1])) *--end = '\0';
        if (*start) {
            int rc = grid_append(grid, count, start, err);
            if (rc) return rc;
        }
        cursor += length + (saved ? 1 : 0);
    }
    if (*count == 0) return lq_error_set(err, LQ_EINVAL, "no configurations");
    return LQ_OK;
}

int lq_compress_grid_parse(const char *text, struct lq_nf_config **grid, size_t *count,
                           struct lq_error *err) {
    *grid = NULL;
    *count = 0;
    if (strcmp(text, "table1") == 0) {
        *grid = malloc(LQ_NF_TABLE1_SIZE * sizeof **grid);
        if (!*grid) return lq_error_set(err, LQ_ENOMEM, "out of memory");
        lq_nf_grid_table1(*grid);
        *count = LQ_NF_TABLE1_SIZE;
        return LQ_OK;
    }
    char *copy;
    size_t length;
    int rc, is_file = lq_path_is_file(text);
    if (is_file) {
        rc = lq_file_read_all(text, 16 << 20, &copy, &length, err);
        if (rc) return rc;
    } else if (!(copy = strdup(text))) {
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    rc = grid_parse_list(copy, grid, count, err);
    free(copy);
    if (rc) {
        if (is_file) lq_error_prefix(err, "%s", text);
        free(*grid);
        *grid = NULL;
        *count = 0;
    }
    return rc;
}

/* ---------- one cell: a matrix decomposed at one configuration ---------- */

/* The seed of one decomposition: from the run's seed, the matrix and the configuration's
 * values (never the worker), so results are independent of scheduling, and the final phase
 * repeats the table's decomposition bit for bit. */
static uint64_t decomposition_seed(uint64_t seed, size_t matrix, const struct lq_nf_config *c) {
    int64_t words[7] = {(int64_t)seed, (int64_t)matrix, c->b0, c->b1, c->b2, c->B0, c->B1};
    return lq_hash_bytes(words, sizeof words, 0x73656564ull);
}

static void cell_options(const struct lq_compress_options *o, size_t matrix,
                         const struct lq_nf_config *c, const float *fisher,
                         struct lq_decompose_options *options) {
    lq_decompose_options_default(options);
    options->rank = o->rank;
    options->max_iters = o->iters;
    options->svd.seed = decomposition_seed(o->seed, matrix, c);
    options->fisher = fisher;
}

struct lq_backend *lq_compress_device(const struct lq_compress_options *o) {
    struct lq_backend *b = o->device;
    return b && b->ops->decompose && b->ops->decompose_errors ? b : NULL;
}

int lq_compress_decompose_cell(const struct lq_compress_options *o, const float *w, size_t rows,
                               size_t cols, size_t matrix, const char *name,
                               const struct lq_nf_config *c, const float *fisher,
                               struct lq_decomposition *d, struct lq_error *err) {
    struct lq_decompose_options options;
    cell_options(o, matrix, c, fisher, &options);
    struct lq_backend *device = lq_compress_device(o);
    int rc = device ? device->ops->decompose(device, w, rows, cols, c, &options, d, err)
                    : lq_decompose(w, rows, cols, c, &options, d, err);
    if (rc) {
        char text[64];
        lq_error_prefix(err, "%s at %s", name, lq_nf_config_format(c, text, sizeof text));
    }
    return rc;
}

int lq_compress_table_costs(const struct lq_compress_options *o, const float *w, size_t rows,
                            size_t cols, size_t matrix, const char *name,
                            const struct lq_nf_config *configs, size_t count, const float *fisher,
                            double *costs, struct lq_error *err) {
    struct lq_backend *device = lq_compress_device(o);
    if (!device) {
        for (size_t c = 0; c < count; c++) {
            struct lq_decomposition d;
            int rc = lq_compress_decompose_cell(o, w, rows, cols, matrix, name, &configs[c], fisher,
                                                &d, err);
            if (rc) return rc;
            costs[c] = d.error * d.error; /* the paper's cost: squared absolute error */
            lq_decomposition_free(&d);
        }
        return LQ_OK;
    }
    uint64_t *seeds = malloc((count ? count : 1) * sizeof *seeds);
    if (!seeds) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    struct lq_decompose_options options;
    cell_options(o, matrix, &configs[0], fisher, &options);
    for (size_t c = 0; c < count; c++) seeds[c] = decomposition_seed(o->seed, matrix, &configs[c]);
    int rc = device->ops->decompose_errors(device, w, rows, cols, configs, seeds, count, &options,
                                           costs, err);
    free(seeds);
    return rc ? lq_error_prefix(err, "%s", name) : LQ_OK;
}

uint64_t lq_compress_matrix_hash(const float *w, size_t rows, size_t cols) {
    uint64_t shape[2] = {rows, cols};
    return lq_hash_bytes(w, rows * cols * sizeof *w,
                         lq_hash_bytes(shape, sizeof shape, 0x6d6174ull));
}
