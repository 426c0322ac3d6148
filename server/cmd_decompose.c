/* lqd decompose: LQ decomposition of one matrix read from a safetensors file. */
#include <cblas.h>
#include <cjson/cJSON.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/lq.h"
#include "core/lq_store.h"
#include "core/safetensors.h"
#include "server/cli.h"

static const char decompose_usage[] =
    "usage: lqd decompose --tensor FILE.safetensors:NAME --config b0,b1,b2,B0,B1 --rank R\n"
    "                     [--iters T] [--init zero|quantized] [--min-improvement F]\n"
    "                     [--svd auto|exact|randomized] [--oversample P] [--power-iters K]\n"
    "                     [--seed S] [--fisher FILE.safetensors:NAME] [--out FILE.safetensors]\n"
    "                     [--threads N] [--json]\n"
    "\n"
    "Decomposes one matrix W (F32, F16 or BF16, 2-D) as W = Q + L1 L2: Q NormalFloat-quantized\n"
    "with configuration c = (b0, b1, b2, B0, B1) (LQ-LoRA Eq. 3; b2 is bf16, fp16 or fp32),\n"
    "L1 L2 of rank R (0 = plain quantization). Prints the relative errors ||W-Q-L1L2||/||W||\n"
    "and ||W-Quantize(W)||/||W||, the steps run, bits/param and time.\n"
    "\n"
    "  --iters T            at most T alternating steps (default 20); the loop also stops\n"
    "                       when a step does not lower the error, and keeps the best step\n"
    "  --init zero|quantized start from Q = 0 (Algorithm 2, default) or Q = Quantize(W)\n"
    "  --min-improvement F  also stop when a step lowers the error by less than F (relative)\n"
    "  --svd METHOD         auto (default: exact for small matrices), exact or randomized\n"
    "  --oversample P       randomized SVD oversampling (default 10)\n"
    "  --power-iters K      randomized SVD power iterations (default 2)\n"
    "  --seed S             seed of the randomized SVD (default 0)\n"
    "  --fisher FILE:NAME   Fisher information (same shape, >= 0): weighted decomposition\n"
    "  --out FILE           write Q (packed), lora_A = L2, lora_B = L1 as safetensors\n"
    "  --threads N          OpenBLAS threads (default: OpenBLAS's own choice)\n"
    "  --json               print one JSON object instead of text\n"
    "\n"
    "example: lqd decompose --tensor models/stories260K-hf/model.safetensors:"
    "model.layers.0.self_attn.q_proj.weight --config 3,8,fp32,64,256 --rank 8\n";

struct decompose_args {
    const char *tensor_spec, *fisher_spec, *out_path;
    struct lq_nf_config config;
    struct lq_decompose_options options;
    int have_config, have_rank, json, threads;
};

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

#define usage_error(format, value) lq_cli_usage_error("decompose", format, value)

static int parse_args(int argc, char **argv, struct decompose_args *a) {
    enum {
        OPT_ITERS = 256,
        OPT_INIT,
        OPT_MIN_IMPROVEMENT,
        OPT_SVD,
        OPT_OVERSAMPLE,
        OPT_POWER,
        OPT_SEED,
        OPT_FISHER,
        OPT_OUT,
        OPT_THREADS,
        OPT_JSON
    };
    static const struct option long_options[] = {
        {"tensor", required_argument, NULL, 't'},
        {"config", required_argument, NULL, 'c'},
        {"rank", required_argument, NULL, 'r'},
        {"iters", required_argument, NULL, OPT_ITERS},
        {"init", required_argument, NULL, OPT_INIT},
        {"min-improvement", required_argument, NULL, OPT_MIN_IMPROVEMENT},
        {"svd", required_argument, NULL, OPT_SVD},
        {"oversample", required_argument, NULL, OPT_OVERSAMPLE},
        {"power-iters", required_argument, NULL, OPT_POWER},
        {"seed", required_argument, NULL, OPT_SEED},
        {"fisher", required_argument, NULL, OPT_FISHER},
        {"out", required_argument, NULL, OPT_OUT},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"json", no_argument, NULL, OPT_JSON},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    memset(a, 0, sizeof *a);
    lq_decompose_options_default(&a->options);
    struct lq_error err = {0};
    long number;
    double real;
    optind = 1;
    opterr = 0;
    int option;
    while ((option = getopt_long(argc, argv, "t:c:r:h", long_options, NULL)) != -1) {
        switch (option) {
        case 't':
            a->tensor_spec = optarg;
            break;
        case 'c':
            if (lq_nf_config_parse(optarg, &a->config, &err)) return usage_error("%s", err.message);
            a->have_config = 1;
            break;
        case 'r':
            if (lq_cli_parse_int(optarg, 0, 1 << 20, &number))
                return usage_error("--rank '%s': expected an integer >= 0", optarg);
            a->options.rank = (int)number;
            a->have_rank = 1;
            break;
        case OPT_ITERS:
            if (lq_cli_parse_int(optarg, 1, 100000, &number))
                return usage_error("--iters '%s': expected an integer >= 1", optarg);
            a->options.max_iters = (int)number;
            break;
        case OPT_INIT:
            if (lq_init_parse(optarg, &a->options.init, &err))
                return usage_error("%s", err.message);
            break;
        case OPT_MIN_IMPROVEMENT:
            if (lq_cli_parse_double(optarg, 0.0, 0.999, &real))
                return usage_error("--min-improvement '%s': expected a number in [0, 1)", optarg);
            a->options.min_improvement = real;
            break;
        case OPT_SVD:
            if (lq_svd_method_parse(optarg, &a->options.svd.method, &err))
                return usage_error("%s", err.message);
            break;
        case OPT_OVERSAMPLE:
            if (lq_cli_parse_int(optarg, 0, 100000, &number))
                return usage_error("--oversample '%s': expected an integer >= 0", optarg);
            a->options.svd.oversample = (int)number;
            break;
        case OPT_POWER:
            if (lq_cli_parse_int(optarg, 0, 1000, &number))
                return usage_error("--power-iters '%s': expected an integer >= 0", optarg);
            a->options.svd.power_iters = (int)number;
            break;
        case OPT_SEED:
            if (lq_cli_parse_int(optarg, 0, __LONG_MAX__, &number))
                return usage_error("--seed '%s': expected an integer >= 0", optarg);
            a->options.svd.seed = (uint64_t)number;
            break;
        case OPT_FISHER:
            a->fisher_spec = optarg;
            break;
        case OPT_OUT:
            a->out_path = optarg;
            break;
        case OPT_THREADS:
            if (lq_cli_parse_int(optarg, 1, 1024, &number))
                return usage_error("--threads '%s': expected an integer >= 1", optarg);
            a->threads = (int)number;
            break;
        case OPT_JSON:
            a->json = 1;
            break;
        case 'h':
            fputs(decompose_usage, stdout);
            return -1;
        default:
            return usage_error("unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return usage_error("unexpected argument '%s'", argv[optind]);
    if (!a->tensor_spec) return usage_error("%s", "--tensor FILE.safetensors:NAME is required");
    if (!a->have_config) return usage_error("%s", "--config b0,b1,b2,B0,B1 is required");
    if (!a->have_rank) return usage_error("%s", "--rank R is required");
    return 0;
}

/* Reads the 2-D tensor named by "FILE:NAME" (the last ':' separates them). */
static int load_matrix(const char *spec, float **out, size_t *rows, size_t *cols,
                       const char **dtype, struct lq_error *err) {
    const char *colon = strrchr(spec, ':');
    if (!colon || colon == spec || colon[1] == '\0')
        return lq_error_set(err, LQ_EINVAL, "'%s': expected FILE.safetensors:TENSOR_NAME", spec);
    char path[4096];
    size_t length = (size_t)(colon - spec);
    if (length >= sizeof path) return lq_error_set(err, LQ_EINVAL, "path too long");
    memcpy(path, spec, length);
    path[length] = '\0';
    struct lq_safetensors *file;
    int rc = lq_safetensors_open(path, &file, err);
    if (rc) return rc;
    const struct lq_safetensors_tensor *tensor = lq_safetensors_find(file, colon + 1);
    if (!tensor) {
        rc = lq_error_set(err, LQ_ENOTFOUND, "%s: no tensor named '%s' (%zu tensors in the file)",
                          path, colon + 1, lq_safetensors_count(file));
    } else if (tensor->ndim != 2 || tensor->shape[0] == 0 || tensor->shape[1] == 0) {
        rc = lq_error_set(err, LQ_EUNSUPPORTED,
                          "%s: tensor '%s' has %d dimensions: expected a non-empty 2-D matrix",
                          path, colon + 1, tensor->ndim);
    } else {
        *rows = (size_t)tensor->shape[0];
        *cols = (size_t)tensor->shape[1];
        *dtype = lq_dtype_name(tensor->dtype);
        rc = lq_safetensors_read_f32(file, colon + 1, out, NULL, err);
    }
    lq_safetensors_close(file);
    return rc;
}

static void print_text(const struct decompose_args *a, const struct lq_decomposition *d,
                       const char *dtype, double rel_error, double plain_error,
                       double fisher_rel_error, double seconds) {
    char config[64];
    double bits = lq_nf_bits_per_param(&a->config);
    double lowrank_bits =
        16.0 * d->rank * (double)(d->rows + d->cols) / (double)(d->rows * d->cols);
    printf("tensor          %s [%zu x %zu] %s\n", a->tensor_spec, d->rows, d->cols, dtype);
    printf("configuration   %s: %.6f bits/param (Eq. 3)\n",
           lq_nf_config_format(&a->config, config, sizeof config), bits);
    printf("rank            %d: L1 %zu x %d, L2 %d x %zu (+%.4f bits/param at 16 bits)\n", d->rank,
           d->rows, d->rank, d->rank, d->cols, lowrank_bits);
    printf("LQ error        %.6f  ||W - Q - L1 L2|| / ||W||\n", rel_error);
    if (a->fisher_spec) printf("Fisher error    %.6f  weighted, relative\n", fisher_rel_error);
    printf("quantize error  %.6f  ||W - Quantize(W)|| / ||W||\n", plain_error);
    if (d->best_is_half_step)
        printf("steps           %d (kept: L1 L2 of step %d with Q of step %d)\n", d->iters,
               d->best_iter, d->best_iter - 1);
    else
        printf("steps           %d (kept: step %d)\n", d->iters, d->best_iter);
    printf("time            %.3f s\n", seconds);
}

static int print_json(const struct decompose_args *a, const struct lq_decomposition *d,
                      const char *dtype, double rel_error, double plain_error,
                      double fisher_rel_error, double seconds) {
    cJSON *root = cJSON_CreateObject();
    char config[64];
    snprintf(config, sizeof config, "%d,%d,%s,%d,%d", a->config.b0, a->config.b1,
             lq_scale_dtype_name(a->config.b2), a->config.B0, a->config.B1);
    double bits = lq_nf_bits_per_param(&a->config);
    double lowrank_bits =
        16.0 * d->rank * (double)(d->rows + d->cols) / (double)(d->rows * d->cols);
    cJSON_AddStringToObject(root, "tensor", a->tensor_spec);
    cJSON_AddStringToObject(root, "dtype", dtype);
    cJSON_AddNumberToObject(root, "rows", (double)d->rows);
    cJSON_AddNumberToObject(root, "cols", (double)d->cols);
    cJSON_AddStringToObject(root, "config", config);
    cJSON_AddNumberToObject(root, "rank", d->rank);
    cJSON_AddNumberToObject(root, "rel_error", rel_error);
    cJSON_AddNumberToObject(root, "quant_rel_error", plain_error);
    if (a->fisher_spec) cJSON_AddNumberToObject(root, "fisher_rel_error", fisher_rel_error);
    cJSON_AddNumberToObject(root, "iters", d->iters);
    cJSON_AddNumberToObject(root, "best_iter", d->best_iter);
    cJSON_AddBoolToObject(root, "best_is_half_step", d->best_is_half_step);
    cJSON *history = cJSON_AddArrayToObject(root, "error_history");
    for (int i = 0; i < d->iters; i++)
        cJSON_AddItemToArray(history, cJSON_CreateNumber(d->history[i] / d->norm));
    cJSON_AddNumberToObject(root, "bits_per_param", bits);
    cJSON_AddNumberToObject(root, "lowrank_bits_per_param", lowrank_bits);
    cJSON_AddNumberToObject(root, "effective_bits_per_param", bits + lowrank_bits);
    cJSON_AddStringToObject(root, "init", lq_init_name(a->options.init));
    cJSON_AddStringToObject(root, "svd",
                            lq_svd_method_name(lq_svd_resolve(
                                d->rows, d->cols, d->rank > 0 ? d->rank : 1, &a->options.svd)));
    cJSON_AddNumberToObject(root, "seconds", seconds);
    if (a->out_path) cJSON_AddStringToObject(root, "out", a->out_path);
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!text) return -1;
    puts(text);
    cJSON_free(text);
    return 0;
}

static int write_output(const struct decompose_args *a, const struct lq_decomposition *d,
                        struct lq_error *err) {
    struct lq_safetensors_writer *writer;
    int rc = lq_safetensors_writer_create(&writer, err);
    if (rc) return rc;
    const char *name = strrchr(a->tensor_spec, ':') + 1;
    if (!(rc = lq_decomposition_store(writer, name, d, err)))
        rc = lq_safetensors_writer_write(writer, a->out_path, err);
    lq_safetensors_writer_free(writer);
    return rc;
}

int lq_cli_decompose(int argc, char **argv) {
    struct decompose_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc) return rc < 0 ? 0 : rc;
    if (a.threads) openblas_set_num_threads(a.threads);

    struct lq_error err = {0};
    float *w = NULL, *fisher = NULL, *plain = NULL;
    size_t rows = 0, cols = 0, fisher_rows = 0, fisher_cols = 0;
    const char *dtype = "", *fisher_dtype = "";
    struct lq_decomposition d = {0};
    int status = 1;
    double start = seconds_now();
    if (load_matrix(a.tensor_spec, &w, &rows, &cols, &dtype, &err)) goto fail;
    if (a.fisher_spec) {
        if (load_matrix(a.fisher_spec, &fisher, &fisher_rows, &fisher_cols, &fisher_dtype, &err))
            goto fail;
        if (fisher_rows != rows || fisher_cols != cols) {
            lq_error_set(&err, LQ_EINVAL, "Fisher tensor is %zu x %zu but W is %zu x %zu",
                         fisher_rows, fisher_cols, rows, cols);
            goto fail;
        }
        a.options.fisher = fisher;
    }
    if (lq_decompose(w, rows, cols, &a.config, &a.options, &d, &err)) goto fail;
    double seconds = seconds_now() - start;

    /* Unweighted errors are always reported; with Fisher data, the weighted one too. */
    plain = malloc(rows * cols * sizeof *plain);
    if (!plain) {
        lq_error_set(&err, LQ_ENOMEM, "out of memory");
        goto fail;
    }
    lq_decomposition_reconstruct(&d, plain);
    double w_norm = lq_weighted_distance(w, NULL, NULL, rows * cols);
    double rel_error = lq_weighted_distance(w, plain, NULL, rows * cols) / w_norm;
    double fisher_rel_error = d.error / d.norm;
    if (lq_nf_quantize_dequantize(w, rows * cols, &a.config, plain, &err)) goto fail;
    double plain_error = lq_weighted_distance(w, plain, NULL, rows * cols) / w_norm;
    if (a.out_path && write_output(&a, &d, &err)) goto fail;

    if (a.json) {
        if (print_json(&a, &d, dtype, rel_error, plain_error, fisher_rel_error, seconds)) {
            lq_error_set(&err, LQ_ENOMEM, "out of memory printing JSON");
            goto fail;
        }
    } else {
        print_text(&a, &d, dtype, rel_error, plain_error, fisher_rel_error, seconds);
        if (a.out_path) printf("written         %s\n", a.out_path);
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "lqd decompose: %s\n", err.message);
done:
    lq_decomposition_free(&d);
    free(w), free(fisher), free(plain);
    return status;
}
