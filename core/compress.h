/* Compression of a full-precision model to mixed-configuration LQ (LQ-LoRA Algorithm 1):
 * the error table over every linear matrix x NF configuration (cached, core/error_table.h),
 * the ILP at the bit budget (core/ilp.h), and the final decomposition of each matrix with its
 * chosen configuration. Matrices and configurations are independent: a pool of worker threads
 * runs whole decompositions, with OpenBLAS single-threaded meanwhile (a process-wide setting,
 * restored afterwards) so that every result is the same whatever the scheduling. */
#ifndef LQ_COMPRESS_H
#define LQ_COMPRESS_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/error_table.h"
#include "core/model.h"
#include "core/nf.h"
#include "kernels/backend.h"

/* Parses a configuration grid: "table1" (the paper's Table 1, 243 configurations), a list of
 * configurations separated by ';' ("4,8,fp32,64,256;3,8,fp32,64,256"), or the name of a file
 * holding one configuration per line (or ';'-separated; '#' starts a comment). Duplicates
 * are refused. *grid is malloc'ed (the caller frees it). */
int lq_compress_grid_parse(const char *text, struct lq_nf_config **grid, size_t *count,
                           struct lq_error *err);

enum lq_compress_phase {
    LQ_COMPRESS_TABLE, /* error table: one decomposition per (matrix, configuration) */
    LQ_COMPRESS_ILP,   /* allocation */
    LQ_COMPRESS_FINAL, /* one decomposition per matrix at its chosen configuration */
};
const char *lq_compress_phase_name(enum lq_compress_phase phase); /* "error table", ... */

struct lq_compress_progress {
    enum lq_compress_phase phase;
    size_t matrices_done, matrices_total; /* rows of the table, or final matrices */
    size_t cells_done, cells_total;       /* decompositions of this phase, cached ones included */
    size_t cells_cached;                  /* of cells_done, read from the cache */
    double elapsed_seconds;               /* since the phase began */
    double eta_seconds;                   /* remaining, from this run's rate; < 0: unknown */
    int finished;                         /* 1 on the phase's last report */
};

/* Called on the thread that called lq_compress (never concurrently): at each phase's start
 * and end, and a few times a second in between. Return 0 to go on; a negative LQ_E* code
 * stops the run, and lq_compress returns that code (finished table rows stay cached). */
typedef int (*lq_compress_progress_fn)(void *context, const struct lq_compress_progress *p);
/* Non-fatal notices (an unreadable cache ignored, ...), on the calling thread. */
typedef void (*lq_compress_warning_fn)(void *context, const char *message);

struct lq_compress_options {
    double budget;                   /* average bits per linear parameter (quantized part) */
    int rank;                        /* of L1 L2, >= 0 (0: plain quantization + ILP) */
    const struct lq_nf_config *grid; /* borrowed; NULL: Table 1 */
    size_t grid_size;
    int iters;                     /* decomposition steps at most (default 20) */
    uint64_t seed;                 /* mixed with each (matrix, configuration) */
    const char *cache_dir;         /* NULL: lq_error_table_cache_dir_default */
    int use_cache;                 /* 0: neither read nor write a cache */
    int threads;                   /* workers; 0: lq_parallel_threads() */
    double ilp_time_limit_seconds; /* 0: solve to proven optimality */
    /* Fisher-weighted compression (§3.3), or NULL: one array per linear matrix in the model's
     * order (layer-major, enum lq_linear_kind order), rows·cols values, finite and >= 0, not all
     * zero (borrowed; core/fisher.h computes them). Every decomposition then minimises
     * ||sqrt(F) ⊙ (W − Q − L1·L2)||_F (lq_decompose's `fisher`), the table's cost is its square
     * (Algorithm 4's weighted error), and the cache key's weighting is "fisher-<hash of F and
     * fisher_source>", so weighted and unweighted tables never mix. */
    const float *const *fisher;
    const char *fisher_source; /* how F was estimated (any text; NULL: ""), hashed into the key */
    /* A backend that decomposes on its device (ops->decompose_errors, ops->decompose; borrowed),
     * or NULL for the CPU. The table then goes row by row, one matrix's whole grid per call,
     * on `device_workers` threads (default 2: one uploads while the other computes). */
    struct lq_backend *device;
    int device_workers;
    lq_compress_progress_fn progress;
    lq_compress_warning_fn warning;
    void *context; /* passed to progress and warning */
    /* Other processes that decompose beside the worker threads (MPI ranks:
     * core/compress_mpi.h), or NULL. Borrowed. */
    const struct lq_compress_remote *remote;
};

/* ---------- work handed to other processes ---------- */

/* A slice of one phase: configurations [config_begin, config_end) of one matrix for the
 * table, or one matrix at its chosen configuration (config_end = config_begin + 1) for the
 * final phase. */
struct lq_compress_item {
    size_t matrix, config_begin, config_end;
};

/* One phase as lq_compress offers it to a remote executor. Everything a decomposition
 * depends on is here, so that another process computes exactly what a worker thread would;
 * the callbacks are safe to call from the executor's thread. */
struct lq_compress_phase_work {
    enum lq_compress_phase phase; /* LQ_COMPRESS_TABLE or LQ_COMPRESS_FINAL */
    const struct lq_compress_options *options;
    const struct lq_nf_config *grid;
    size_t n_configs, n_matrices;
    const uint64_t *matrix_hash; /* lq_compress_matrix_hash of each source matrix */
    const size_t *matrix_numel;  /* rows * cols of each source matrix */
    const int *choice;           /* final phase: the grid index of each matrix */
    /* The next item, at most max_cells cells of one matrix (0: a whole row); 1 when one is
     * taken, 0 when none is left or the run is stopping. */
    int (*take)(struct lq_compress_phase_work *work, size_t max_cells,
                struct lq_compress_item *item);
    /* A table item's costs (squared errors, config_end - config_begin of them). */
    void (*table_result)(struct lq_compress_phase_work *work, const struct lq_compress_item *item,
                         const double *costs);
    /* A final item's decomposition; ownership of d's buffers moves to lq_compress. */
    void (*final_result)(struct lq_compress_phase_work *work, size_t matrix,
                         struct lq_decomposition *d);
    /* Stops the run with rc and err's message (the first failure wins). */
    void (*fail)(struct lq_compress_phase_work *work, int rc, const struct lq_error *err);
    int (*stopping)(struct lq_compress_phase_work *work); /* 1 once the run is stopping */
    void *internal;                                       /* lq_compress's own */
};

struct lq_compress_remote {
    /* Optional: called on lq_compress's thread before each phase's workers start (so that
     * the other processes are ready when the work begins); an error stops the run. */
    int (*prepare)(void *context, struct lq_compress_phase_work *work, struct lq_error *err);
    /* Runs items of the phase elsewhere, on a thread lq_compress starts beside its workers,
     * until take() returns 0 and every item taken has its result, or until stopping() (then
     * promptly, results in flight dropped). Failures go through work->fail. */
    void (*run_phase)(void *context, struct lq_compress_phase_work *work);
    void *context;
};

/* What every decomposition of lq_compress is, for another process to repeat it bit for bit:
 * matrix `matrix` (its index in the model, which seeds it) decomposed under c with
 * o->rank, o->iters and o->seed, on o->device when it decomposes, else the CPU; fisher is
 * the matrix's F or NULL. Errors name the matrix (name) and the configuration. */
int lq_compress_decompose_cell(const struct lq_compress_options *o, const float *w, size_t rows,
                               size_t cols, size_t matrix, const char *name,
                               const struct lq_nf_config *c, const float *fisher,
                               struct lq_decomposition *d, struct lq_error *err);
/* The table's costs of configurations[0 .. count) for one matrix: on o->device in one call
 * when it computes tables, else one lq_compress_decompose_cell each. */
int lq_compress_table_costs(const struct lq_compress_options *o, const float *w, size_t rows,
                            size_t cols, size_t matrix, const char *name,
                            const struct lq_nf_config *configs, size_t count, const float *fisher,
                            double *costs, struct lq_error *err);
/* The backend that decomposes o's cells: o->device when it has ops->decompose and
 * ops->decompose_errors, else NULL (the CPU). */
struct lq_backend *lq_compress_device(const struct lq_compress_options *o);
/* The identity of one source matrix (shape and floats), checked by other processes that read
 * the model files themselves. */
uint64_t lq_compress_matrix_hash(const float *w, size_t rows, size_t cols);

/* Budget 0 (must be set), rank 64, Table 1, 20 steps, seed 0, default cache, all CPUs, no
 * Fisher weighting. */
void lq_compress_options_default(struct lq_compress_options *options);

struct lq_compress_report {
    size_t n_matrices, n_configs;
    struct lq_nf_config *chosen; /* chosen[i]: configuration of matrix i (owned) */
    int *choice;                 /* choice[i]: its index in the grid (owned) */
    /* With Fisher information, error, table_error, norm, total_error and table_min/max are
     * all Fisher-weighted (||sqrt(F) ⊙ ·||): the objective the table and the ILP minimise. */
    char weighting[LQ_WEIGHTING_NAME_SIZE]; /* "none" or "fisher-<16 hex digits>": the key's */
    double *error;               /* error[i]: squared error of the final decomposition (owned) */
    double *table_error;         /* table_error[i]: the table's cell for choice[i]; equals
                                    error[i] unless the cache came from another machine (owned) */
    double *norm;                /* norm[i]: ||W_i||_F^2, weighted like error (owned) */
    double bits_per_param;       /* achieved average of the quantized part, <= budget */
    double effective_bits;       /* with L1 L2 at fp32 */
    double min_budget;           /* smallest feasible budget for this grid */
    double total_error;          /* sum of error[] */
    double table_min, table_max; /* smallest and largest relative error (sqrt(cost)/||W||) */
    size_t decompositions;       /* lq_decompose calls of the table phase (0 on a cache hit) */
    size_t cells_cached;         /* table cells read from the cache */
    int cache_used;              /* 1 when a cache file was read or written */
    char cache_path[4096];
    int ilp_proven_optimal;
    int threads;
    double seconds_hash; /* hashing the source for the cache key, and the norms */
    double seconds_table, seconds_ilp, seconds_final;
};

/* Compresses source (dense linears; borrowed) into *out, a new model holding copies of the
 * embeddings, norms and head and an LQ linear (is_lq, q, rank, lora_A = L2, lora_B = L1) per
 * matrix, chosen by the ILP at options->budget. Errors: LQ_EINVAL for a rank larger than a
 * matrix (naming it) or bad options, LQ_EINFEASIBLE for a budget below the grid's cheapest
 * assignment (message names the smallest feasible budget; checked before any work), and
 * whatever a decomposition, the solver or the progress callback returned. On success the
 * caller frees *out with lq_model_free and report with lq_compress_report_free. */
int lq_compress(const struct lq_model *source, const struct lq_compress_options *options,
                struct lq_model **out, struct lq_compress_report *report, struct lq_error *err);

void lq_compress_report_free(struct lq_compress_report *report);

#endif
