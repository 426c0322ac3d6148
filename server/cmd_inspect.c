/* lqd inspect: what an LQ model directory holds: per matrix its configuration, rank and
 * bits/param, totals, the memory the weights need, and a picture of the allocation. */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file_util.h"
#include "core/lq_model_file.h"
#include "core/model.h"
#include "core/safetensors.h"
#include "server/allocation_svg.h"
#include "server/cli.h"

static const char inspect_usage[] =
    "usage: lqd inspect DIR [--json] [--svg OUT.svg]\n"
    "\n"
    "Describes a model directory (an LQ model written by lqd compress, or a full-precision\n"
    "one): for each linear matrix its configuration (b0, b1, b2, B0, B1), rank, the bits/param\n"
    "of the quantized part (Eq. 3) and the effective bits/param with L1 L2 (stored as fp32;\n"
    "the figure at 16 bits is given too); the averages over all linear parameters; and the\n"
    "bytes the weights need in memory (packed Q, factors, embeddings, norms and head).\n"
    "\n"
    "  --json         print one JSON object instead of the table\n"
    "  --svg OUT.svg  also draw the allocation (bits/param of each matrix type against the\n"
    "                 layer) as a self-contained SVG picture\n";

#define usage_error(format, value) lq_cli_usage_error("inspect", format, value)

/* The "lqd.*" metadata of DIR/model.safetensors, when there is one. */
struct file_info {
    char format[32], source[1024], budget[64], rank[32], grid[32];
};

static void read_info(const char *dir, struct file_info *info) {
    memset(info, 0, sizeof *info);
    char path[4096 + 32];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct lq_safetensors *file;
    if (!lq_path_is_file(path) || lq_safetensors_open(path, &file, NULL) != 0) return;
    const char *value;
    if ((value = lq_safetensors_metadata(file, "lqd.format")))
        snprintf(info->format, sizeof info->format, "%s", value);
    if ((value = lq_safetensors_metadata(file, "lqd.source")))
        snprintf(info->source, sizeof info->source, "%s", value);
    if ((value = lq_safetensors_metadata(file, "lqd.bits")))
        snprintf(info->budget, sizeof info->budget, "%s", value);
    if ((value = lq_safetensors_metadata(file, "lqd.rank")))
        snprintf(info->rank, sizeof info->rank, "%s", value);
    if ((value = lq_safetensors_metadata(file, "lqd.grid")))
        snprintf(info->grid, sizeof info->grid, "%s", value);
    lq_safetensors_close(file);
}

/* "model.layers.3.mlp.up_proj": how the matrix is named in the file. */
static void matrix_prefix(const struct lq_matrix_summary *m, char *buffer, size_t size) {
    snprintf(buffer, size, "%s", m->name);
    size_t length = strlen(buffer);
    if (length > 7 && strcmp(buffer + length - 7, ".weight") == 0) buffer[length - 7] = '\0';
}

static const char *model_name(const char *dir) {
    static char name[256];
    snprintf(name, sizeof name, "%s", dir);
    size_t length = strlen(name);
    while (length > 1 && name[length - 1] == '/') name[--length] = '\0';
    const char *slash = strrchr(name, '/');
    return slash ? slash + 1 : name;
}

/* ---------- text and JSON ---------- */

static void print_text(const char *dir, const struct file_info *info,
                       const struct lq_model_summary *s) {
    printf("model  %s", dir);
    if (info->format[0]) printf("  (%s", info->format);
    if (info->source[0]) printf(", from %s", info->source);
    if (info->budget[0]) printf(", budget %s bits", info->budget);
    if (info->rank[0]) printf(", rank %s", info->rank);
    if (info->grid[0]) printf(", %s configurations searched", info->grid);
    printf("%s\n\n", info->format[0] ? ")" : "");
    printf("%-34s %11s  %-24s %5s %8s %9s %10s\n", "matrix", "shape", "configuration", "rank",
           "bits", "effective", "bytes");
    for (size_t i = 0; i < s->n_matrices; i++) {
        const struct lq_matrix_summary *m = &s->matrices[i];
        char name[160], shape[32], config[64];
        matrix_prefix(m, name, sizeof name);
        snprintf(shape, sizeof shape, "%d x %d", m->rows, m->cols);
        if (m->is_lq)
            lq_nf_config_format(&m->config, config, sizeof config);
        else
            snprintf(config, sizeof config, "dense fp32");
        printf("%-34s %11s  %-24s %5d %8.4f %9.4f %10zu\n", name, shape, config, m->rank,
               m->bits_per_param, m->effective_bits, m->bytes);
    }
    printf("\n%zu linear matrices, %zu parameters\n", s->n_matrices, s->linear_params);
    printf("  quantized part      %.4f bits/param\n", s->bits_per_param);
    printf("  effective           %.4f bits/param with L1 L2 as stored (fp32); %.4f at 16 bits\n",
           s->effective_bits, s->effective_bits_16);
    printf("memory  %zu bytes (%.2f MiB): linear %zu (packed Q + L1 L2), other %zu "
           "(embeddings, norms, head: %zu fp32 values)\n",
           s->total_bytes, (double)s->total_bytes / 1048576.0, s->linear_bytes, s->other_bytes,
           s->other_params);
}

static int print_json(const char *dir, const struct file_info *info,
                      const struct lq_model_summary *s) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "model", dir);
    if (info->format[0]) cJSON_AddStringToObject(root, "format", info->format);
    if (info->source[0]) cJSON_AddStringToObject(root, "source", info->source);
    if (info->budget[0]) cJSON_AddNumberToObject(root, "budget", strtod(info->budget, NULL));
    if (info->rank[0]) cJSON_AddNumberToObject(root, "rank", strtod(info->rank, NULL));
    if (info->grid[0]) cJSON_AddNumberToObject(root, "grid", strtod(info->grid, NULL));
    cJSON_AddNumberToObject(root, "n_matrices", (double)s->n_matrices);
    cJSON_AddNumberToObject(root, "linear_params", (double)s->linear_params);
    cJSON_AddNumberToObject(root, "bits_per_param", s->bits_per_param);
    cJSON_AddNumberToObject(root, "effective_bits", s->effective_bits);
    cJSON_AddNumberToObject(root, "effective_bits_16", s->effective_bits_16);
    cJSON_AddNumberToObject(root, "memory_bytes", (double)s->total_bytes);
    cJSON_AddNumberToObject(root, "linear_bytes", (double)s->linear_bytes);
    cJSON_AddNumberToObject(root, "other_bytes", (double)s->other_bytes);
    cJSON *matrices = cJSON_AddArrayToObject(root, "matrices");
    for (size_t i = 0; i < s->n_matrices; i++) {
        const struct lq_matrix_summary *m = &s->matrices[i];
        cJSON *item = cJSON_CreateObject();
        char name[160];
        matrix_prefix(m, name, sizeof name);
        cJSON_AddStringToObject(item, "name", name);
        cJSON_AddNumberToObject(item, "layer", m->layer);
        cJSON_AddStringToObject(item, "kind", lq_linear_kind_short(m->kind));
        cJSON_AddNumberToObject(item, "rows", m->rows);
        cJSON_AddNumberToObject(item, "cols", m->cols);
        if (m->is_lq) {
            cJSON *config = cJSON_AddArrayToObject(item, "config");
            cJSON_AddItemToArray(config, cJSON_CreateNumber(m->config.b0));
            cJSON_AddItemToArray(config, cJSON_CreateNumber(m->config.b1));
            cJSON_AddItemToArray(config, cJSON_CreateString(lq_scale_dtype_name(m->config.b2)));
            cJSON_AddItemToArray(config, cJSON_CreateNumber(m->config.B0));
            cJSON_AddItemToArray(config, cJSON_CreateNumber(m->config.B1));
        } else {
            cJSON_AddNullToObject(item, "config");
        }
        cJSON_AddNumberToObject(item, "rank", m->rank);
        cJSON_AddNumberToObject(item, "bits_per_param", m->bits_per_param);
        cJSON_AddNumberToObject(item, "effective_bits", m->effective_bits);
        cJSON_AddNumberToObject(item, "bytes", (double)m->bytes);
        cJSON_AddItemToArray(matrices, item);
    }
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!text) return -1;
    puts(text);
    cJSON_free(text);
    return 0;
}

/* ---------- the picture (server/allocation_svg.c draws it) ---------- */

static int write_svg(const char *path, const char *dir, const struct file_info *info,
                     const struct lq_model_summary *s, int layers, struct lq_error *err) {
    int any = 0;
    for (size_t i = 0; i < s->n_matrices; i++) any |= s->matrices[i].is_lq;
    if (!any) return lq_error_set(err, LQ_EINVAL, "%s: no LQ matrices: nothing to draw", dir);
    struct lq_allocation_labels labels = {
        .title = model_name(dir),
        .budget = info->budget[0] ? strtod(info->budget, NULL) : NAN,
        .rank = info->rank,
    };
    char *text = NULL;
    size_t length = 0;
    int rc = lq_allocation_svg_string(&labels, s, layers, &text, &length, err);
    if (!rc) rc = lq_file_write_atomic(path, text, length, err);
    free(text);
    return rc;
}

/* ---------- the command ---------- */

int lq_cli_inspect(int argc, char **argv) {
    enum { OPT_JSON = 256, OPT_SVG };
    static const struct option long_options[] = {
        {"json", no_argument, NULL, OPT_JSON},
        {"svg", required_argument, NULL, OPT_SVG},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int json = 0;
    const char *svg = NULL;
    optind = 1;
    opterr = 0;
    int option;
    while ((option = getopt_long(argc, argv, "h", long_options, NULL)) != -1) {
        switch (option) {
        case OPT_JSON:
            json = 1;
            break;
        case OPT_SVG:
            svg = optarg;
            break;
        case 'h':
            fputs(inspect_usage, stdout);
            return 0;
        default:
            return usage_error("unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc) return usage_error("%s", "the model directory DIR is required");
    if (optind + 1 < argc) return usage_error("unexpected argument '%s'", argv[optind + 1]);
    const char *dir = argv[optind];

    struct lq_error err = {0};
    struct lq_model *model = NULL;
    struct lq_model_summary summary = {0};
    struct file_info info;
    int status = 1;
    if (lq_model_load(dir, &model, &err) || lq_model_summary_compute(model, &summary, &err))
        goto fail;
    read_info(dir, &info);
    if (svg && write_svg(svg, dir, &info, &summary, model->config.n_layers, &err)) goto fail;
    if (json) {
        if (print_json(dir, &info, &summary)) {
            lq_error_set(&err, LQ_ENOMEM, "out of memory printing JSON");
            goto fail;
        }
    } else {
        print_text(dir, &info, &summary);
        if (svg) printf("picture written to %s\n", svg);
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "lqd inspect: %s\n", err.message);
done:
    lq_model_summary_free(&summary);
    lq_model_free(model);
    return status;
}
