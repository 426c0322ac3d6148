/* lqd compress: a full-precision model to a mixed-configuration LQ model directory
 * (LQ-LoRA Algorithm 1: error table, ILP at the budget, final decompositions). */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/compress.h"
#include "core/compress_mpi.h"
#include "core/file_util.h"
#include "core/fisher.h"
#include "core/ilp.h"
#include "core/lq_model_file.h"
#include "core/model.h"
#include "core/parallel.h"
#include "kernels/backend_select.h"
#include "kernels/device_probe.h"
#include "server/cli.h"
#include "server/cli_model.h"

static const char compress_usage[] =
    "usage: lqd compress --model SRC --bits B --rank R --out DIR [--tokenizer T]\n"
    "                    [--configs GRID] [--iters T] [--seed S] [--threads N]\n"
    "                    [--cache-dir DIR | --no-cache] [--ilp-time-limit SECONDS]\n"
    "                    [--force] [--quiet] [--json] [--progress-json]\n"
    "                    [--fisher FILE --fisher-samples N [--fisher-seq-len L] [--fisher-seed S]\n"
    "                     [--fisher-save PATH] | --fisher-load PATH]\n"
    "\n"
    "Compresses a LLaMA-family model (HuggingFace directory, llama2.c .bin or GGUF) to an LQ "
    "model\n"
    "directory: every linear matrix W of every layer becomes W = Q + L1 L2, Q NormalFloat-\n"
    "quantized with a configuration (b0, b1, b2, B0, B1) chosen per matrix, L1 L2 of rank R.\n"
    "LQ-LoRA Algorithm 1: the decomposition error of every matrix under every configuration\n"
    "of the grid (the error table), an integer program choosing one configuration per matrix\n"
    "to minimise the total squared error at an average of B bits per parameter (quantized\n"
    "part, over the 7 linear matrices of each layer), then the final decompositions.\n"
    "\n"
    "  --model SRC          the full-precision source model\n"
    "  --bits B             the budget: average bits/param of the quantized part (e.g. 2.75)\n"
    "  --rank R             rank of L1 L2 (0: plain quantization with the same allocation)\n"
    "  --out DIR            the LQ model directory to write (config.json, model.safetensors,\n"
    "                       tokenizer); built beside DIR and renamed into place\n"
    "  --tokenizer T        tokenizer file or directory to copy into DIR (default: the\n"
    "                       tokenizer.json/.model/.bin found in or beside SRC)\n"
    "  --configs GRID       'table1' (default: the paper's Table 1, 243 configurations), a\n"
    "                       ';'-separated list ('4,8,fp32,64,256;3,8,fp32,64,256'), or a\n"
    "                       file with one configuration per line\n"
    "  --iters T            decomposition steps at most (default 20)\n"
    "  --seed S             seed of the randomized SVDs (default 0)\n"
    "  --threads N          worker threads, each running whole decompositions (default:\n"
    "                       all CPUs, or LQ_THREADS; per rank under mpirun)\n"
    "  --cache-dir DIR      where the error table is cached (default $LQD_CACHE_DIR, else\n"
    "                       $XDG_CACHE_HOME/lqd, else ~/.cache/lqd); the same source, rank,\n"
    "                       grid, iters and seed at another budget then skips the table, and\n"
    "                       an interrupted run resumes\n"
    "  --no-cache           neither read nor write the cache\n"
    "  --device D           cpu (default), cuda, cuda:N or auto: with a GPU the error table and\n"
    "                       the final decompositions run on it (cuBLAS + cuSOLVER)\n"
    "  --gpu-memory SIZE    most GPU memory to take (default: what is free)\n"
    "  --ilp-time-limit S   stop the integer program after S seconds (default: solve exactly)\n"
    "  --force              replace DIR if it is an existing LQ model directory\n"
    "  --quiet              no progress on stderr\n"
    "  --json               print the report as one JSON object\n"
    "  --progress-json      progress on stderr as one JSON object per line (for programs, e.g.\n"
    "                       lqd serve running compress jobs through a launcher)\n"
    "\n"
    "Over MPI ranks: mpirun -n K lqd compress ... (the same options). Rank 0 loads the model,\n"
    "keeps the cache, solves the ILP and writes DIR; the other ranks read the matrices they\n"
    "are given from the same (shared or copied) model files and decompose on request, each\n"
    "on --threads CPUs or, with --device cuda, GPU N = its local rank mod the host's GPUs.\n"
    "The cache and DIR are the single-process ones byte for byte, whatever K; a rerun after\n"
    "a failure resumes from the cache with any K. Only rank 0 prints progress.\n"
    "\n"
    "Fisher-weighted LQ (LQ-LoRA paper section 3.3): every decomposition minimises\n"
    "||sqrt(F) * (W - Q - L1 L2)||, F the diagonal empirical Fisher information of W, and the\n"
    "error table, the allocation and the report use that weighted error.\n"
    "  --fisher FILE        estimate F (on the --device GPU, else the CPU) from calibration\n"
    "                       text FILE: each non-empty\n"
    "                       line is a document (as lqd eval --ppl reads it), tokenized with BOS\n"
    "  --fisher-samples N   sequences averaged: N documents drawn without replacement\n"
    "  --fisher-seq-len L   tokens per sequence at most, BOS included (default 1024, at most\n"
    "                       the model's context); longer documents are cut\n"
    "  --fisher-seed S      seed of the draw (default 0): the same seed draws the same lines\n"
    "  --fisher-save PATH   also write F (safetensors, one F32 tensor per matrix under its\n"
    "                       weight's name; lqd decompose --fisher PATH:NAME reads it)\n"
    "  --fisher-load PATH   use F from a --fisher-save file instead of estimating it\n"
    "\n"
    "example: lqd compress --model models/stories260K-hf --bits 3 --rank 8 --out stories-3bit\n"
    "         lqd compress --model models/stories260K-hf --bits 3 --rank 8 --out stories-3f \\\n"
    "             --fisher calibration.txt --fisher-samples 128\n";

struct compress_args {
    const char *model, *out, *tokenizer, *configs, *cache_dir;
    double bits, ilp_time_limit;
    int rank, iters, threads, no_cache, force, quiet, json, progress_json;
    unsigned long long seed;
    int have_bits, have_rank;
    const char *fisher, *fisher_save, *fisher_load; /* calibration text, F files */
    int fisher_samples, fisher_seq_len, have_fisher_seq_len, have_fisher_seed;
    unsigned long long fisher_seed;
    struct lq_cli_device device;
};

#define usage_error(format, value) lq_cli_usage_error("compress", format, value)

static int parse_args(int argc, char **argv, struct compress_args *a) {
    enum {
        OPT_TOKENIZER = 256,
        OPT_CONFIGS,
        OPT_ITERS,
        OPT_SEED,
        OPT_THREADS,
        OPT_CACHE_DIR,
        OPT_NO_CACHE,
        OPT_ILP_TIME,
        OPT_FORCE,
        OPT_QUIET,
        OPT_JSON,
        OPT_PROGRESS_JSON,
        OPT_DEVICE,
        OPT_GPU_MEMORY,
        OPT_FISHER,
        OPT_FISHER_SAMPLES,
        OPT_FISHER_SEQ_LEN,
        OPT_FISHER_SEED,
        OPT_FISHER_SAVE,
        OPT_FISHER_LOAD
    };
    static const struct option long_options[] = {
        {"model", required_argument, NULL, 'm'},
        {"bits", required_argument, NULL, 'b'},
        {"rank", required_argument, NULL, 'r'},
        {"out", required_argument, NULL, 'o'},
        {"tokenizer", required_argument, NULL, OPT_TOKENIZER},
        {"configs", required_argument, NULL, OPT_CONFIGS},
        {"iters", required_argument, NULL, OPT_ITERS},
        {"seed", required_argument, NULL, OPT_SEED},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"cache-dir", required_argument, NULL, OPT_CACHE_DIR},
        {"no-cache", no_argument, NULL, OPT_NO_CACHE},
        {"ilp-time-limit", required_argument, NULL, OPT_ILP_TIME},
        {"force", no_argument, NULL, OPT_FORCE},
        {"quiet", no_argument, NULL, OPT_QUIET},
        {"json", no_argument, NULL, OPT_JSON},
        {"progress-json", no_argument, NULL, OPT_PROGRESS_JSON},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"gpu-memory", required_argument, NULL, OPT_GPU_MEMORY},
        {"fisher", required_argument, NULL, OPT_FISHER},
        {"fisher-samples", required_argument, NULL, OPT_FISHER_SAMPLES},
        {"fisher-seq-len", required_argument, NULL, OPT_FISHER_SEQ_LEN},
        {"fisher-seed", required_argument, NULL, OPT_FISHER_SEED},
        {"fisher-save", required_argument, NULL, OPT_FISHER_SAVE},
        {"fisher-load", required_argument, NULL, OPT_FISHER_LOAD},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    memset(a, 0, sizeof *a);
    a->iters = 20;
    a->configs = "table1";
    a->fisher_seq_len = 1024; /* the paper's sequence length */
    long number;
    double real;
    optind = 1;
    opterr = 0;
    int option;
    while ((option = getopt_long(argc, argv, "m:b:r:o:h", long_options, NULL)) != -1) {
        switch (option) {
        case 'm':
            a->model = optarg;
            break;
        case 'o':
            a->out = optarg;
            break;
        case 'b':
            if (lq_cli_parse_double(optarg, 0.001, 64.0, &real))
                return usage_error("--bits '%s': expected a number of bits per parameter", optarg);
            a->bits = real, a->have_bits = 1;
            break;
        case 'r':
            if (lq_cli_parse_int(optarg, 0, 1 << 20, &number))
                return usage_error("--rank '%s': expected an integer >= 0", optarg);
            a->rank = (int)number, a->have_rank = 1;
            break;
        case OPT_TOKENIZER:
            a->tokenizer = optarg;
            break;
        case OPT_CONFIGS:
            a->configs = optarg;
            break;
        case OPT_ITERS:
            if (lq_cli_parse_int(optarg, 1, 100000, &number))
                return usage_error("--iters '%s': expected an integer >= 1", optarg);
            a->iters = (int)number;
            break;
        case OPT_SEED:
            if (lq_cli_parse_int(optarg, 0, __LONG_MAX__, &number))
                return usage_error("--seed '%s': expected an integer >= 0", optarg);
            a->seed = (unsigned long long)number;
            break;
        case OPT_THREADS:
            if (lq_cli_parse_int(optarg, 1, 1024, &number))
                return usage_error("--threads '%s': expected an integer >= 1", optarg);
            a->threads = (int)number;
            break;
        case OPT_CACHE_DIR:
            a->cache_dir = optarg;
            break;
        case OPT_NO_CACHE:
            a->no_cache = 1;
            break;
        case OPT_ILP_TIME:
            if (lq_cli_parse_double(optarg, 0.0, 1e9, &real))
                return usage_error("--ilp-time-limit '%s': expected seconds >= 0", optarg);
            a->ilp_time_limit = real;
            break;
        case OPT_FORCE:
            a->force = 1;
            break;
        case OPT_QUIET:
            a->quiet = 1;
            break;
        case OPT_JSON:
            a->json = 1;
            break;
        case OPT_PROGRESS_JSON:
            a->progress_json = 1;
            break;
        case OPT_DEVICE:
        case OPT_GPU_MEMORY:
            if (lq_cli_device_option("compress", option == OPT_DEVICE ? "device" : "gpu-memory",
                                     optarg, &a->device) == 2)
                return 2;
            break;
        case OPT_FISHER:
            a->fisher = optarg;
            break;
        case OPT_FISHER_SAMPLES:
            if (lq_cli_parse_int(optarg, 1, 100000000, &number))
                return usage_error("--fisher-samples '%s': expected an integer >= 1", optarg);
            a->fisher_samples = (int)number;
            break;
        case OPT_FISHER_SEQ_LEN:
            if (lq_cli_parse_int(optarg, 2, 1 << 24, &number))
                return usage_error("--fisher-seq-len '%s': expected an integer >= 2", optarg);
            a->fisher_seq_len = (int)number, a->have_fisher_seq_len = 1;
            break;
        case OPT_FISHER_SEED:
            if (lq_cli_parse_int(optarg, 0, __LONG_MAX__, &number))
                return usage_error("--fisher-seed '%s': expected an integer >= 0", optarg);
            a->fisher_seed = (unsigned long long)number, a->have_fisher_seed = 1;
            break;
        case OPT_FISHER_SAVE:
            a->fisher_save = optarg;
            break;
        case OPT_FISHER_LOAD:
            a->fisher_load = optarg;
            break;
        case 'h':
            fputs(compress_usage, stdout);
            return -1;
        default:
            return usage_error("unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (!a->model) return usage_error("%s", "--model SRC is required");
    if (!a->have_bits) return usage_error("%s", "--bits B is required");
    if (!a->have_rank) return usage_error("%s", "--rank R is required");
    if (!a->out) return usage_error("%s", "--out DIR is required");
    if (a->cache_dir && a->no_cache)
        return usage_error("%s", "--cache-dir and --no-cache exclude each other");
    if (a->fisher && a->fisher_load)
        return usage_error("%s", "--fisher and --fisher-load exclude each other");
    if (a->fisher && !a->fisher_samples)
        return usage_error("%s", "--fisher FILE needs --fisher-samples N");
    if (!a->fisher &&
        (a->fisher_samples || a->have_fisher_seq_len || a->have_fisher_seed || a->fisher_save))
        return usage_error("%s", "--fisher-samples, --fisher-seq-len, --fisher-seed and "
                                 "--fisher-save need --fisher FILE");
    return 0;
}

/* ---------- progress on stderr ---------- */

static volatile sig_atomic_t interrupted;

static void on_signal(int signal_number) {
    (void)signal_number;
    interrupted = 1;
}

struct progress_state {
    int quiet, tty, json;
    double last_line; /* elapsed seconds of the last plain line */
    enum lq_compress_phase phase;
    int phase_started;
    double fisher_start; /* monotonic seconds when the Fisher estimate began */
};

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void format_seconds(double seconds, char *buffer, size_t size) {
    if (seconds < 0)
        snprintf(buffer, size, "?");
    else if (seconds < 60)
        snprintf(buffer, size, "%.0fs", seconds);
    else if (seconds < 3600)
        snprintf(buffer, size, "%dm%02ds", (int)seconds / 60, (int)seconds % 60);
    else
        snprintf(buffer, size, "%dh%02dm", (int)seconds / 3600, (int)seconds / 60 % 60);
}

static int on_progress(void *context, const struct lq_compress_progress *p) {
    struct progress_state *s = context;
    if (interrupted) return LQ_EINVAL; /* stops the run; the table rows done stay cached */
    if (s->quiet) return 0;
    if (!s->phase_started || s->phase != p->phase)
        s->phase = p->phase, s->phase_started = 1, s->last_line = -1e9;
    if (s->json) {
        /* One line per report at most once a second, and always at a phase's start and end. */
        if (!p->finished && p->cells_done && p->elapsed_seconds - s->last_line < 1.0) return 0;
        s->last_line = p->elapsed_seconds;
        fprintf(stderr,
                "{\"event\":\"progress\",\"phase\":\"%s\",\"matrices_done\":%zu,"
                "\"matrices_total\":%zu,\"cells_done\":%zu,\"cells_total\":%zu,"
                "\"cells_cached\":%zu,\"elapsed_seconds\":%.3f,\"eta_seconds\":%.3f,"
                "\"finished\":%s}\n",
                lq_compress_phase_name(p->phase), p->matrices_done, p->matrices_total,
                p->cells_done, p->cells_total, p->cells_cached, p->elapsed_seconds, p->eta_seconds,
                p->finished ? "true" : "false");
        fflush(stderr);
        return 0;
    }
    double fraction = p->cells_total ? (double)p->cells_done / (double)p->cells_total : 1.0;
    char elapsed[32], eta[32], counts[160];
    format_seconds(p->elapsed_seconds, elapsed, sizeof elapsed);
    format_seconds(p->eta_seconds, eta, sizeof eta);
    if (p->phase == LQ_COMPRESS_ILP)
        snprintf(counts, sizeof counts, "%s", p->finished ? "solved" : "solving");
    else if (p->phase == LQ_COMPRESS_TABLE)
        snprintf(counts, sizeof counts, "%zu/%zu matrices, %zu/%zu decompositions (%zu cached)",
                 p->matrices_done, p->matrices_total, p->cells_done, p->cells_total,
                 p->cells_cached);
    else
        snprintf(counts, sizeof counts, "%zu/%zu matrices", p->matrices_done, p->matrices_total);
    if (s->tty) {
        char bar[31];
        int filled = (int)(fraction * 30.0 + 0.5);
        for (int i = 0; i < 30; i++) bar[i] = i < filled ? '#' : '-';
        bar[30] = '\0';
        fprintf(stderr, "\r\033[K%-13s [%s] %3.0f%%  %s  %s  ETA %s",
                lq_compress_phase_name(p->phase), bar, 100.0 * fraction, counts, elapsed, eta);
        if (p->finished) fputc('\n', stderr);
        fflush(stderr);
    } else if (p->finished || p->elapsed_seconds - s->last_line >= 5.0) {
        /* Logs get a line at each phase's start and end and every 5 seconds between. */
        s->last_line = p->elapsed_seconds;
        fprintf(stderr, "lqd compress: %s: %s, %s elapsed, ETA %s%s\n",
                lq_compress_phase_name(p->phase), counts, elapsed, eta,
                p->finished ? " (done)" : "");
    }
    return 0;
}

static void on_warning(void *context, const char *message) {
    (void)context;
    fprintf(stderr, "lqd compress: warning: %s\n", message);
}

/* The Fisher estimate's progress: one forward and backward pass per sequence. */
static int on_fisher_progress(void *context, int done, int total) {
    struct progress_state *s = context;
    if (interrupted) return LQ_EINVAL;
    if (s->quiet) return 0;
    double elapsed = seconds_now() - s->fisher_start;
    double eta = done ? elapsed / done * (total - done) : -1.0;
    char elapsed_text[32], eta_text[32];
    format_seconds(elapsed, elapsed_text, sizeof elapsed_text);
    format_seconds(eta, eta_text, sizeof eta_text);
    if (s->json) {
        if (done == total || elapsed - s->last_line >= 1.0) {
            s->last_line = elapsed;
            fprintf(stderr,
                    "{\"event\":\"progress\",\"phase\":\"fisher\",\"sequences_done\":%d,"
                    "\"sequences_total\":%d,\"elapsed_seconds\":%.3f,\"eta_seconds\":%.3f,"
                    "\"finished\":%s}\n",
                    done, total, elapsed, eta, done == total ? "true" : "false");
            fflush(stderr);
        }
    } else if (s->tty) {
        fprintf(stderr, "\r\033[KFisher        %d/%d sequences  %s  ETA %s", done, total,
                elapsed_text, eta_text);
        if (done == total) fputc('\n', stderr);
        fflush(stderr);
    } else if (done == total || elapsed - s->last_line >= 5.0) {
        s->last_line = elapsed;
        fprintf(stderr, "lqd compress: Fisher information: %d/%d sequences, %s elapsed, ETA %s%s\n",
                done, total, elapsed_text, eta_text, done == total ? " (done)" : "");
    }
    return 0;
}

/* ---------- the Fisher information ---------- */

struct fisher_summary {
    int samples, seq_len;
    size_t tokens, documents;
    double seconds;
};

/* Refuses an LQ source, an infeasible budget or too large a rank before the Fisher estimate
 * (lq_compress checks them too, but only after it). */
static int check_before_fisher(const struct lq_model *model, const struct lq_nf_config *grid,
                               size_t G, double bits, int rank, struct lq_error *err) {
    size_t n = (size_t)model->config.n_layers * LQ_LINEARS_PER_LAYER;
    double *storage = malloc(n * G * sizeof *storage), *cost = calloc(n * G, sizeof *cost);
    size_t *numel = malloc(n * sizeof *numel);
    int rc = storage && cost && numel ? LQ_OK : lq_error_set(err, LQ_ENOMEM, "out of memory");
    for (size_t i = 0; i < n && !rc; i++) {
        const struct lq_linear *linear =
            &model->layers[i / LQ_LINEARS_PER_LAYER].linear[i % LQ_LINEARS_PER_LAYER];
        numel[i] = (size_t)linear->rows * (size_t)linear->cols;
        for (size_t c = 0; c < G; c++) storage[i * G + c] = lq_nf_storage_bits(numel[i], &grid[c]);
        char name[128];
        lq_model_linear_name((int)(i / LQ_LINEARS_PER_LAYER),
                             (enum lq_linear_kind)(i % LQ_LINEARS_PER_LAYER), name, sizeof name);
        if (linear->is_lq || !linear->dense)
            rc = lq_error_set(err, LQ_EINVAL,
                              "%s: %s is already LQ-compressed; the Fisher estimate and "
                              "compression need the full-precision source",
                              model->path ? model->path : "model", name);
        else if (rank > linear->rows || rank > linear->cols)
            rc = lq_error_set(err, LQ_EINVAL, "rank %d is larger than %s (%d x %d): at most %d",
                              rank, name, linear->rows, linear->cols,
                              linear->rows < linear->cols ? linear->rows : linear->cols);
    }
    if (!rc) {
        struct lq_ilp_problem problem = {n, G, cost, storage, numel, bits};
        double minimum = lq_ilp_min_budget(&problem);
        if (bits < minimum)
            rc = lq_error_set(err, LQ_EINFEASIBLE,
                              "budget %g bits/param is infeasible: the smallest feasible budget "
                              "for this grid is %.17g bits/param",
                              bits, minimum);
    }
    free(storage), free(cost), free(numel);
    return rc;
}

/* The tokenizer of the calibration text: the one DIR gets. */
static int load_tokenizer(const struct lq_tokenizer_files *files, struct lq_tokenizer **out,
                          struct lq_error *err) {
    const char *path = lq_tokenizer_files_primary(files);
    if (path) return lq_tokenizer_load(path, out, err);
    return lq_error_set(
        err, LQ_ENOTFOUND,
        "--fisher needs a tokenizer: none found beside the model (use --tokenizer)");
}

/* The draw is made: said (unless --quiet), and the estimate's clock started. */
struct fisher_drawn {
    const struct compress_args *a;
    struct progress_state *progress;
    int seq_len;
    const char *where; /* "the CPU", "cuda" */
};

static int on_fisher_drawn(void *context, const struct lq_fisher_calibration *calibration) {
    const struct fisher_drawn *d = context;
    if (!d->a->quiet)
        fprintf(stderr,
                "lqd compress: Fisher information from %d of %zu lines of %s (%zu tokens, at "
                "most %d per sequence, seed %llu) on %s\n",
                calibration->count, calibration->documents, d->a->fisher, calibration->tokens,
                d->seq_len, d->a->fisher_seed, d->where);
    d->progress->fisher_start = seconds_now(), d->progress->last_line = -1e9;
    return 0;
}

/* Whether backend has the ops the Fisher estimate runs (the training ops). */
static int can_train(const struct lq_backend *backend) {
    const struct lq_backend_ops *o = backend ? backend->ops : NULL;
    return o && o->linear_backward && o->attention_backward && o->cross_entropy &&
           o->accumulate_squares && o->rmsnorm_backward && o->swiglu_backward && o->rope_backward;
}

/* F from --fisher-load, or estimated from --fisher's text on the --device GPU when it has the
 * training ops, else on a CPU backend. */
static int fisher_obtain(const struct compress_args *a, const struct lq_model *source,
                         const struct lq_tokenizer_files *tokenizer_files,
                         struct lq_backend *device, struct progress_state *progress,
                         struct lq_fisher *fisher, struct fisher_summary *summary,
                         struct lq_error *err) {
    memset(summary, 0, sizeof *summary);
    double start = seconds_now();
    if (a->fisher_load) {
        int rc = lq_fisher_load(a->fisher_load, source, fisher, err);
        summary->samples = fisher->samples;
        summary->seconds = seconds_now() - start;
        return rc ? lq_error_prefix(err, "--fisher-load") : LQ_OK;
    }
    struct lq_tokenizer *tokenizer = NULL;
    struct lq_fisher_calibration calibration = {0};
    char *text = NULL;
    size_t length = 0;
    int context = source->config.max_seq_len;
    summary->seq_len = a->fisher_seq_len < context ? a->fisher_seq_len : context;
    int rc = lq_file_read_all(a->fisher, (size_t)1 << 32, &text, &length, err);
    if (rc) {
        lq_error_prefix(err, "--fisher");
        goto done;
    }
    if ((rc = load_tokenizer(tokenizer_files, &tokenizer, err))) goto done;
    char draw_label[LQ_ERROR_MESSAGE_SIZE];
    snprintf(draw_label, sizeof draw_label, "--fisher %s", a->fisher);
    struct lq_backend *on = can_train(device) ? device : NULL;
    struct fisher_drawn drawn = {a, progress, summary->seq_len, on ? on->ops->name : "the CPU"};
    struct lq_fisher_text_options options = {
        .samples = a->fisher_samples,
        .max_seq_len = summary->seq_len,
        .seed = a->fisher_seed,
        .draw_label = draw_label,
        .backend = on,
        .create_backend = lq_backend_cpu_create,
        .drawn = on_fisher_drawn,
        .drawn_context = &drawn,
        .progress = on_fisher_progress,
        .progress_context = progress,
    };
    rc = lq_fisher_estimate_text(source, tokenizer, text, length, &options, &calibration, fisher,
                                 err);
    if (calibration.count) { /* drawn */
        summary->samples = calibration.count, summary->tokens = calibration.tokens;
        summary->documents = calibration.documents;
    }
    if (rc) goto done;
    /* F carries how it was made (fisher->source): saved with it, and hashed into the error
     * table's cache key with it */
    if (a->fisher_save && (rc = lq_fisher_save(fisher, source, a->fisher_save, err))) {
        lq_error_prefix(err, "--fisher-save");
        goto done;
    }
done:
    summary->seconds = seconds_now() - start;
    if (rc) lq_fisher_free(fisher);
    lq_fisher_calibration_free(&calibration);
    lq_tokenizer_free(tokenizer);
    free(text);
    return rc;
}

/* ---------- the report ---------- */

/* The configurations chosen, each with how many matrices took it, in grid order. */
static size_t count_configs(const struct lq_compress_report *r, int *counts) {
    size_t distinct = 0;
    for (size_t c = 0; c < r->n_configs; c++) counts[c] = 0;
    for (size_t i = 0; i < r->n_matrices; i++)
        if (counts[r->choice[i]]++ == 0) distinct++;
    return distinct;
}

static double total_norm(const struct lq_compress_report *r) {
    double sum = 0.0;
    for (size_t i = 0; i < r->n_matrices; i++) sum += r->norm[i];
    return sum;
}

static void print_text(const struct compress_args *a, const struct lq_compress_report *r,
                       const struct lq_nf_config *grid, const int *counts,
                       const struct fisher_summary *fisher, const char *ranks_note) {
    printf("source          %s\n", a->model);
    printf("budget          %g bits/param (smallest feasible %.6f)\n", a->bits, r->min_budget);
    printf("achieved        %.6f bits/param quantized, %.6f effective with L1 L2 (rank %d, fp32)\n",
           r->bits_per_param, r->effective_bits, a->rank);
    if (a->fisher)
        printf("fisher          %d sequences, %zu tokens (at most %d each) of %s in %.2f s%s%s\n",
               fisher->samples, fisher->tokens, fisher->seq_len, a->fisher, fisher->seconds,
               a->fisher_save ? "; saved to " : "", a->fisher_save ? a->fisher_save : "");
    else if (a->fisher_load)
        printf("fisher          %s (%d sequences)\n", a->fisher_load, fisher->samples);
    printf("error           %.6g total squared, %.6f relative (sqrt(sum err^2 / sum ||W||^2))%s\n",
           r->total_error, sqrt(r->total_error / total_norm(r)),
           strcmp(r->weighting, "none") ? ", Fisher-weighted" : "");
    printf("configurations ");
    for (size_t c = 0; c < r->n_configs; c++) {
        if (!counts[c]) continue;
        char text[64];
        printf(" %s x%d", lq_nf_config_format(&grid[c], text, sizeof text), counts[c]);
    }
    printf("\n");
    printf("error table     %zu x %zu: %zu decompositions in %.2f s, %zu cells cached (%s)\n",
           r->n_matrices, r->n_configs, r->decompositions, r->seconds_table, r->cells_cached,
           r->cache_used ? r->cache_path : "no cache");
    printf("allocation      %.3f s%s\n", r->seconds_ilp,
           r->ilp_proven_optimal ? " (proven optimal)" : "");
    printf("decomposition   %zu matrices in %.2f s on %d threads%s\n", r->n_matrices,
           r->seconds_final, r->threads, ranks_note);
    printf("written         %s\n", a->out);
}

static int print_json(const struct compress_args *a, const struct lq_compress_report *r,
                      const struct lq_nf_config *grid, const int *counts,
                      const struct fisher_summary *fisher, const struct lq_compress_mpi *mpi) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "source", a->model);
    cJSON_AddStringToObject(root, "out", a->out);
    cJSON_AddNumberToObject(root, "budget", a->bits);
    cJSON_AddNumberToObject(root, "min_budget", r->min_budget);
    cJSON_AddNumberToObject(root, "rank", a->rank);
    cJSON_AddNumberToObject(root, "bits_per_param", r->bits_per_param);
    cJSON_AddNumberToObject(root, "effective_bits", r->effective_bits);
    cJSON_AddNumberToObject(root, "total_error", r->total_error);
    cJSON_AddNumberToObject(root, "relative_error", sqrt(r->total_error / total_norm(r)));
    cJSON_AddStringToObject(root, "weighting", r->weighting);
    if (a->fisher || a->fisher_load) {
        cJSON *f = cJSON_AddObjectToObject(root, "fisher");
        cJSON_AddStringToObject(f, a->fisher ? "text" : "file",
                                a->fisher ? a->fisher : a->fisher_load);
        cJSON_AddNumberToObject(f, "samples", fisher->samples);
        if (a->fisher) {
            cJSON_AddNumberToObject(f, "tokens", (double)fisher->tokens);
            cJSON_AddNumberToObject(f, "documents", (double)fisher->documents);
            cJSON_AddNumberToObject(f, "seq_len", fisher->seq_len);
            cJSON_AddNumberToObject(f, "seed", (double)a->fisher_seed);
        }
        cJSON_AddNumberToObject(f, "seconds", fisher->seconds);
    } else {
        cJSON_AddNullToObject(root, "fisher");
    }
    cJSON_AddNumberToObject(root, "n_matrices", (double)r->n_matrices);
    cJSON_AddNumberToObject(root, "n_configs", (double)r->n_configs);
    cJSON_AddNumberToObject(root, "decompositions", (double)r->decompositions);
    cJSON_AddNumberToObject(root, "cells_cached", (double)r->cells_cached);
    if (r->cache_used)
        cJSON_AddStringToObject(root, "cache", r->cache_path);
    else
        cJSON_AddNullToObject(root, "cache");
    cJSON_AddBoolToObject(root, "ilp_proven_optimal", r->ilp_proven_optimal);
    cJSON_AddNumberToObject(root, "threads", r->threads);
    /* decompositions per MPI rank (rank 0's threads did the rest) */
    int ranks = mpi ? lq_compress_mpi_size(mpi) : 1;
    cJSON_AddNumberToObject(root, "ranks", ranks);
    cJSON *rank_cells = cJSON_AddArrayToObject(root, "rank_decompositions");
    size_t others = 0;
    for (int k = 1; k < ranks; k++) others += lq_compress_mpi_cells(mpi, k);
    cJSON_AddItemToArray(rank_cells,
                         cJSON_CreateNumber((double)(r->decompositions + r->n_matrices - others)));
    for (int k = 1; k < ranks; k++)
        cJSON_AddItemToArray(rank_cells, cJSON_CreateNumber((double)lq_compress_mpi_cells(mpi, k)));
    cJSON *seconds = cJSON_AddObjectToObject(root, "seconds");
    cJSON_AddNumberToObject(seconds, "table", r->seconds_table);
    cJSON_AddNumberToObject(seconds, "ilp", r->seconds_ilp);
    cJSON_AddNumberToObject(seconds, "final", r->seconds_final);
    cJSON *configs = cJSON_AddObjectToObject(root, "configs");
    for (size_t c = 0; c < r->n_configs; c++) {
        if (!counts[c]) continue;
        char text[96];
        snprintf(text, sizeof text, "%d,%d,%s,%d,%d", grid[c].b0, grid[c].b1,
                 lq_scale_dtype_name(grid[c].b2), grid[c].B0, grid[c].B1);
        cJSON_AddNumberToObject(configs, text, counts[c]);
    }
    /* per matrix: the squared error and ||W||^2, Fisher-weighted when F is given */
    cJSON *matrices = cJSON_AddArrayToObject(root, "matrices");
    for (size_t i = 0; i < r->n_matrices; i++) {
        cJSON *m = cJSON_CreateObject();
        char name[128], config[96];
        lq_model_linear_name((int)(i / LQ_LINEARS_PER_LAYER),
                             (enum lq_linear_kind)(i % LQ_LINEARS_PER_LAYER), name, sizeof name);
        char *suffix = strstr(name, ".weight");
        if (suffix && suffix[7] == '\0') *suffix = '\0';
        const struct lq_nf_config *c = &r->chosen[i];
        snprintf(config, sizeof config, "%d,%d,%s,%d,%d", c->b0, c->b1, lq_scale_dtype_name(c->b2),
                 c->B0, c->B1);
        cJSON_AddStringToObject(m, "name", name);
        cJSON_AddStringToObject(m, "config", config);
        cJSON_AddNumberToObject(m, "error", r->error[i]);
        cJSON_AddNumberToObject(m, "norm", r->norm[i]);
        cJSON_AddItemToArray(matrices, m);
    }
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!text) return -1;
    puts(text);
    cJSON_free(text);
    return 0;
}

/* ---------- over MPI ranks ---------- */

/* One GPU per rank: under mpirun, "cuda" and "auto" become cuda:N, N = the rank's local rank
 * modulo the GPUs of its host (lq_compress_mpi_rank_device; an explicit cuda:N stays). */
static const char *rank_device(const char *device, int local_rank, char *buffer, size_t size) {
    int count = 0;
    struct lq_error err = {0};
    if (device && strcmp(device, "cpu") != 0 && lq_cuda_device_count(&count, &err)) count = 0;
    return lq_compress_mpi_rank_device(device, local_rank, count, buffer, size);
}

/* A rank > 0: decomposes what rank 0 hands out, quietly; errors go to rank 0, which names
 * this rank when it prints them. */
static int serve_rank(const struct compress_args *a, struct lq_compress_mpi *mpi, int local_rank) {
    struct lq_error err = {0};
    struct lq_backend *backend = NULL;
    int rc = LQ_OK, reported = 0;
    if (a->device.device && strcmp(a->device.device, "cpu") != 0) {
        char name[32], notice[LQ_BACKEND_NOTICE_SIZE];
        const char *device = rank_device(a->device.device, local_rank, name, sizeof name);
        rc = lq_backend_open(device, a->device.memory_limit, &backend, notice, &err);
        /* which GPU each rank took: the one line a rank > 0 prints itself */
        if (!rc && !a->quiet)
            fprintf(stderr, "lqd compress: rank %d (local rank %d, --device %s): %s\n",
                    lq_compress_mpi_rank(mpi), local_rank, a->device.device, notice);
    }
    if (!rc) {
        struct lq_compress_mpi_worker_options options = {a->model, a->threads, NULL, 0};
        /* a CPU fallback backend does not decompose: the worker then uses core's CPU code */
        options.device = backend && backend->ops->decompose ? backend : NULL;
        rc = lq_compress_mpi_serve(mpi, &options, &reported, &err);
    }
    if (rc && !reported)
        fprintf(stderr, "lqd compress: rank %d: %s\n", lq_compress_mpi_rank(mpi), err.message);
    lq_compress_mpi_finish(mpi, rc != 0, 0);
    if (backend) backend->ops->destroy(backend);
    return rc ? 1 : 0;
}

/* ---------- the command ---------- */

int lq_cli_compress(int argc, char **argv) {
    struct compress_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc) return rc < 0 ? 0 : rc;

    /* Under mpirun every rank runs this command; ranks > 0 serve rank 0. */
    int mpi_rank = 0, mpi_size = 1, local_rank = 0;
    struct lq_compress_mpi *mpi = NULL;
    if (lq_compress_mpi_launched(&mpi_rank, &mpi_size, &local_rank) && mpi_size > 1) {
        struct lq_error mpi_err = {0};
        if (lq_compress_mpi_start(&mpi, &mpi_err)) {
            if (mpi_rank == 0)
                fprintf(stderr, "lqd compress: started by mpirun with %d ranks, but %s\n", mpi_size,
                        mpi_err.message);
            return 2;
        }
        mpi_rank = lq_compress_mpi_rank(mpi), mpi_size = lq_compress_mpi_size(mpi);
        if (mpi_rank > 0) return serve_rank(&a, mpi, local_rank);
    }

    struct lq_error err = {0};
    struct lq_nf_config *grid = NULL;
    size_t grid_size = 0;
    struct lq_model *source = NULL, *compressed = NULL;
    struct lq_backend *backend = NULL;
    struct lq_compress_report report = {0};
    int *counts = NULL, status = 1;
    struct lq_tokenizer_files tokenizer;
    struct lq_fisher fisher = {0};
    struct fisher_summary fisher_summary = {0};
    char ranks_note[64] = "";
    if (mpi) snprintf(ranks_note, sizeof ranks_note, " per rank, %d MPI ranks", mpi_size);
    if (lq_compress_grid_parse(a.configs, &grid, &grid_size, &err)) {
        fprintf(stderr, "lqd compress: --configs: %s\n", err.message);
        status = 2;
        goto done;
    }
    /* Refuse what would fail at the end before hours of work. */
    if (lq_model_file_check_destination(a.out, a.force, &err)) goto fail;
    if (a.tokenizer ? lq_model_file_find_tokenizer(a.tokenizer, 0, &tokenizer, &err)
                    : lq_model_file_find_tokenizer(a.model, 1, &tokenizer, &err))
        goto fail;
    if (!a.tokenizer && tokenizer.count == 0 && !tokenizer.gguf[0])
        fprintf(stderr,
                "lqd compress: warning: no tokenizer found in or beside %s (use "
                "--tokenizer): %s will have none\n",
                a.model, a.out);
    if (lq_model_load(a.model, &source, &err)) goto fail;

    struct progress_state progress = {a.quiet,
                                      isatty(STDERR_FILENO) && !a.progress_json,
                                      a.progress_json,
                                      0,
                                      LQ_COMPRESS_TABLE,
                                      0,
                                      0};
    struct lq_compress_options options;
    lq_compress_options_default(&options);
    options.budget = a.bits, options.rank = a.rank, options.iters = a.iters;
    options.grid = grid, options.grid_size = grid_size, options.seed = a.seed;
    options.cache_dir = a.cache_dir, options.use_cache = !a.no_cache, options.threads = a.threads;
    options.ilp_time_limit_seconds = a.ilp_time_limit;
    options.progress = on_progress, options.warning = on_warning, options.context = &progress;
    options.remote = mpi ? lq_compress_mpi_remote(mpi) : NULL;
    if (a.device.device && strcmp(a.device.device, "cpu") != 0) {
        char notice[LQ_BACKEND_NOTICE_SIZE], name[32];
        const char *device =
            mpi ? rank_device(a.device.device, local_rank, name, sizeof name) : a.device.device;
        if (lq_backend_open(device, a.device.memory_limit, &backend, notice, &err)) goto fail;
        if (mpi)
            fprintf(stderr, "lqd compress: rank 0 (local rank %d, --device %s): %s\n", local_rank,
                    a.device.device, notice);
        else
            fprintf(stderr, "lqd compress: %s\n", notice);
        options.device = backend;
    }
    if (!a.quiet)
        fprintf(stderr,
                "lqd compress: %s: %d layers x 7 matrices, %zu parameters; %zu "
                "configurations, rank %d, budget %g bits/param, %d threads%s\n",
                a.model, source->config.n_layers, lq_model_linear_params(&source->config),
                grid_size, a.rank, a.bits, a.threads ? a.threads : lq_parallel_threads(),
                ranks_note);

    struct sigaction action = {0}, old_int, old_term;
    action.sa_handler = on_signal;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &old_int);
    sigaction(SIGTERM, &action, &old_term);
    rc = a.fisher ? check_before_fisher(source, grid, grid_size, a.bits, a.rank, &err) : LQ_OK;
    if (!rc && (a.fisher || a.fisher_load))
        rc = fisher_obtain(&a, source, &tokenizer, backend, &progress, &fisher, &fisher_summary,
                           &err);
    int in_fisher = rc != LQ_OK;
    options.fisher = (const float *const *)fisher.matrices;
    options.fisher_source = fisher.source;
    if (!rc) rc = lq_compress(source, &options, &compressed, &report, &err);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (progress.tty && !a.quiet && rc) fputc('\n', stderr);
    if (rc && interrupted && mpi) {
        /* mpirun stops every rank (SIGTERM) when one fails; its message names that rank */
        fprintf(stderr,
                "lqd compress: stopped by a signal%s (when a rank fails, mpirun stops the others "
                "and its message names the rank)%s\n",
                in_fisher ? " during the Fisher estimate" : "",
                in_fisher ? ""
                          : "; the error-table rows finished are cached: the same command "
                            "resumes, with any number of ranks");
        status = 143;
        goto done;
    }
    if (rc && interrupted) {
        fprintf(stderr, in_fisher ? "lqd compress: interrupted during the Fisher estimate\n"
                                  : "lqd compress: interrupted; the error-table rows finished "
                                    "are cached: the same command resumes\n");
        status = 130;
        goto done;
    }
    if (rc) goto fail;

    struct lq_model_file_options file_options;
    lq_model_file_options_default(&file_options);
    file_options.source = a.model;
    file_options.budget = a.bits;
    file_options.achieved_bits = report.bits_per_param;
    file_options.rank = a.rank;
    file_options.grid_size = grid_size;
    file_options.iters = a.iters;
    file_options.seed = a.seed;
    file_options.weighting = report.weighting;
    file_options.tokenizer = &tokenizer;
    file_options.force = a.force;
    if (lq_model_file_write(compressed, a.out, &file_options, &err)) goto fail;

    counts = calloc(grid_size, sizeof *counts);
    if (!counts) {
        lq_error_set(&err, LQ_ENOMEM, "out of memory");
        goto fail;
    }
    count_configs(&report, counts);
    if (a.json) {
        if (print_json(&a, &report, grid, counts, &fisher_summary, mpi)) {
            lq_error_set(&err, LQ_ENOMEM, "out of memory printing JSON");
            goto fail;
        }
    } else {
        print_text(&a, &report, grid, counts, &fisher_summary, ranks_note);
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "lqd compress: %s\n", err.message);
done:
    free(counts);
    free(grid);
    lq_fisher_free(&fisher);
    lq_compress_report_free(&report);
    lq_model_free(compressed);
    lq_model_free(source);
    if (backend) backend->ops->destroy(backend);
    /* after a signal mpirun is tearing the job down: finalizing would wait for ranks gone */
    if (mpi) lq_compress_mpi_finish(mpi, status != 0, interrupted);
    return status;
}
