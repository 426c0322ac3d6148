#include "lq_model_file.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dir_write.h"
#include "file_util.h"
#include "gguf.h"
#include "tokenizer.h"
#include "tokenizer_export.h"
#include "lq_store.h"
#include "safetensors.h"

/* ---------- tokenizer files ---------- */

static const char *const tokenizer_names[] = {"tokenizer.json", "tokenizer.model", "tokenizer.bin",
                                              "tokenizer_config.json", "special_tokens_map.json"};
#define N_TOKENIZER_NAMES (sizeof tokenizer_names / sizeof tokenizer_names[0])

static const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int ends_with(const char *text, const char *suffix) {
    size_t a = strlen(text), b = strlen(suffix);
    return a >= b && strcmp(text + a - b, suffix) == 0;
}

static void add_tokenizer_file(struct lq_tokenizer_files *out, const char *source,
                               const char *name) {
    if (out->count == LQ_TOKENIZER_MAX_FILES) return;
    snprintf(out->source[out->count], sizeof out->source[0], "%s", source);
    snprintf(out->name[out->count], sizeof out->name[0], "%s", name);
    out->count++;
}

static void scan_directory(const char *dir, struct lq_tokenizer_files *out) {
    for (size_t i = 0; i < N_TOKENIZER_NAMES; i++) {
        char path[4096];
        int n = snprintf(path, sizeof path, "%s/%s", dir, tokenizer_names[i]);
        if (n > 0 && (size_t)n < sizeof path && lq_path_is_file(path))
            add_tokenizer_file(out, path, tokenizer_names[i]);
    }
}

const char *lq_tokenizer_files_primary(const struct lq_tokenizer_files *files) {
    if (files->gguf[0]) return files->gguf;
    static const char *const loadable[] = {"tokenizer.json", "tokenizer.model", "tokenizer.bin"};
    for (size_t k = 0; k < 3; k++)
        for (size_t i = 0; i < files->count; i++)
            if (strcmp(files->name[i], loadable[k]) == 0) return files->source[i];
    return NULL;
}

int lq_model_file_find_tokenizer(const char *path, int beside_model, struct lq_tokenizer_files *out,
                                 struct lq_error *err) {
    memset(out, 0, sizeof *out);
    if (lq_path_is_file(path) && lq_tokenizer_gguf_present(path)) {
        if (strlen(path) >= sizeof out->gguf)
            return lq_error_set(err, LQ_EINVAL, "%s: path too long", path);
        snprintf(out->gguf, sizeof out->gguf, "%s", path);
        return LQ_OK;
    }
    if (beside_model) {
        if (lq_path_is_dir(path)) {
            scan_directory(path, out);
        } else {
            char dir[4096];
            snprintf(dir, sizeof dir, "%s", path);
            char *slash = strrchr(dir, '/');
            if (slash)
                *slash = '\0';
            else
                snprintf(dir, sizeof dir, ".");
            scan_directory(dir, out);
        }
        return LQ_OK;
    }
    if (lq_path_is_dir(path)) {
        scan_directory(path, out);
        if (out->count == 0)
            return lq_error_set(err, LQ_ENOTFOUND,
                                "%s: no tokenizer.json, tokenizer.model or "
                                "tokenizer.bin in this directory",
                                path);
        return LQ_OK;
    }
    if (!lq_path_is_file(path))
        return lq_error_set(err, LQ_ENOTFOUND, "%s: no such tokenizer file", path);
    const char *name = base_name(path);
    for (size_t i = 0; i < N_TOKENIZER_NAMES; i++)
        if (strcmp(name, tokenizer_names[i]) == 0) {
            add_tokenizer_file(out, path, name);
            return LQ_OK;
        }
    /* Other names (llama2.c's tok512.bin) get the standard name the loaders look for. */
    add_tokenizer_file(out, path,
                       ends_with(name, ".json")    ? "tokenizer.json"
                       : ends_with(name, ".model") ? "tokenizer.model"
                                                   : "tokenizer.bin");
    return LQ_OK;
}

/* ---------- directories ---------- */

/* Only an LQ model directory (or an empty one) may be replaced: --force on a wrong path
 * must not delete someone's data. */
static int is_lq_model_dir(const char *path) {
    return lq_dir_model_has_metadata(path, "lqd.format");
}

static const struct lq_dir_kind lq_model_dir_kind = {
    .force_replaces = "an LQ model directory",
    .name = "an LQ model directory",
    .is_ours = is_lq_model_dir,
};

int lq_model_file_check_destination(const char *dir, int force, struct lq_error *err) {
    return lq_dir_check_destination(dir, force, &lq_model_dir_kind, err);
}

/* ---------- the safetensors file ---------- */

static int add_f32(struct lq_safetensors_writer *w, const char *name, const float *data, int64_t d0,
                   int64_t d1, struct lq_error *err) {
    int64_t shape[2] = {d0, d1};
    return lq_safetensors_writer_add(w, name, LQ_DTYPE_F32, d1 ? 2 : 1, shape, data, err);
}

static int add_linear(struct lq_safetensors_writer *w, int layer, enum lq_linear_kind kind,
                      const struct lq_linear *linear, struct lq_error *err) {
    char name[256];
    lq_model_linear_name(layer, kind, name, sizeof name);
    if (!linear->is_lq) {
        if (!linear->dense) return lq_error_set(err, LQ_EINVAL, "%s: no weights", name);
        return add_f32(w, name, linear->dense, linear->rows, linear->cols, err);
    }
    name[strlen(name) - strlen(".weight")] = '\0';
    /* A view of the linear as a decomposition: the store only reads it. */
    struct lq_decomposition view = {0};
    view.rows = (size_t)linear->rows, view.cols = (size_t)linear->cols;
    view.rank = linear->rank;
    view.L1 = linear->lora_B, view.L2 = linear->lora_A;
    view.Q = linear->q;
    return lq_decomposition_store(w, name, &view, err);
}

static int set_metadata(struct lq_safetensors_writer *w, const char *key, const char *format,
                        double value, struct lq_error *err) {
    char text[64];
    snprintf(text, sizeof text, format, value);
    return lq_safetensors_writer_set_metadata(w, key, text, err);
}

static int write_safetensors(const struct lq_model *m, const struct lq_model_file_options *o,
                             const char *path, struct lq_error *err) {
    const struct lq_model_config *c = &m->config;
    struct lq_safetensors_writer *w;
    int rc = lq_safetensors_writer_create(&w, err);
    if (rc) return rc;
    rc = add_f32(w, "model.embed_tokens.weight", m->embed, c->vocab_size, c->dim, err);
    if (!rc) rc = add_f32(w, "model.norm.weight", m->final_norm, c->dim, 0, err);
    if (!rc && !c->tie_embeddings)
        rc = add_f32(w, "lm_head.weight", m->lm_head, c->vocab_size, c->dim, err);
    for (int l = 0; l < c->n_layers && !rc; l++) {
        char name[256];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        if ((rc = add_f32(w, name, m->layers[l].attn_norm, c->dim, 0, err))) break;
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        if ((rc = add_f32(w, name, m->layers[l].ffn_norm, c->dim, 0, err))) break;
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !rc; k++)
            rc = add_linear(w, l, (enum lq_linear_kind)k, &m->layers[l].linear[k], err);
    }
    if (!rc) rc = lq_safetensors_writer_set_metadata(w, "lqd.format", LQ_MODEL_FILE_FORMAT, err);
    if (!rc && o->source) rc = lq_safetensors_writer_set_metadata(w, "lqd.source", o->source, err);
    if (!rc && o->budget > 0) rc = set_metadata(w, "lqd.bits", "%.17g", o->budget, err);
    if (!rc && o->achieved_bits > 0)
        rc = set_metadata(w, "lqd.bits_per_param", "%.17g", o->achieved_bits, err);
    if (!rc && o->rank >= 0) rc = set_metadata(w, "lqd.rank", "%.0f", o->rank, err);
    if (!rc && o->grid_size) rc = set_metadata(w, "lqd.grid", "%.0f", (double)o->grid_size, err);
    if (!rc && o->iters > 0) {
        char seed[32];
        snprintf(seed, sizeof seed, "%llu", (unsigned long long)o->seed);
        if (!(rc = set_metadata(w, "lqd.iters", "%.0f", o->iters, err)))
            rc = lq_safetensors_writer_set_metadata(w, "lqd.seed", seed, err);
    }
    if (!rc && o->weighting)
        rc = lq_safetensors_writer_set_metadata(w, "lqd.weighting", o->weighting, err);
    if (!rc) rc = lq_safetensors_writer_write(w, path, err);
    lq_safetensors_writer_free(w);
    return rc;
}

/* ---------- the directory ---------- */

void lq_model_file_options_default(struct lq_model_file_options *options) {
    memset(options, 0, sizeof *options);
    options->rank = -1;
}

/* A GGUF model's tokenizer as the HF files lqd import writes, so that DIR carries it. */
static int write_gguf_tokenizer(const char *gguf_path, int max_seq_len, const char *tmp,
                                struct lq_error *err) {
    struct lq_gguf *gguf = NULL;
    struct lq_tokenizer_export exported = {0};
    int rc = lq_gguf_open(gguf_path, &gguf, err);
    if (!rc) rc = lq_tokenizer_export_gguf(gguf, gguf_path, max_seq_len, &exported, err);
    char path[4096 + 64];
    snprintf(path, sizeof path, "%s/tokenizer.json", tmp);
    if (!rc)
        rc = lq_file_write_atomic(path, exported.tokenizer_json, strlen(exported.tokenizer_json),
                                  err);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", tmp);
    if (!rc)
        rc = lq_file_write_atomic(path, exported.tokenizer_config_json,
                                  strlen(exported.tokenizer_config_json), err);
    lq_tokenizer_export_free(&exported);
    lq_gguf_close(gguf);
    return rc;
}

static int fill_directory(const struct lq_model *m, const struct lq_model_file_options *o,
                          const char *tmp, struct lq_error *err) {
    char path[4096 + 64];
    snprintf(path, sizeof path, "%s/config.json", tmp);
    int rc = lq_model_config_write(&m->config, path, err);
    if (rc) return rc;
    snprintf(path, sizeof path, "%s/model.safetensors", tmp);
    if ((rc = write_safetensors(m, o, path, err))) return rc;
    for (size_t i = 0; o->tokenizer && i < o->tokenizer->count; i++) {
        snprintf(path, sizeof path, "%s/%s", tmp, o->tokenizer->name[i]);
        if ((rc = lq_file_copy(o->tokenizer->source[i], path, err))) return rc;
    }
    if (o->tokenizer && o->tokenizer->gguf[0])
        rc = write_gguf_tokenizer(o->tokenizer->gguf, m->config.max_seq_len, tmp, err);
    return rc;
}

struct fill_context {
    const struct lq_model *model;
    const struct lq_model_file_options *options;
};

static int fill(const char *tmp, void *context, struct lq_error *err) {
    const struct fill_context *c = context;
    return fill_directory(c->model, c->options, tmp, err);
}

int lq_model_file_write(const struct lq_model *m, const char *dir,
                        const struct lq_model_file_options *o, struct lq_error *err) {
    struct lq_model_file_options defaults;
    if (!o) lq_model_file_options_default(&defaults), o = &defaults;
    struct fill_context context = {m, o};
    return lq_dir_write_atomic(dir, o->force, &lq_model_dir_kind, fill, &context, err);
}

/* ---------- summaries ---------- */

int lq_model_summary_compute(const struct lq_model *m, struct lq_model_summary *out,
                             struct lq_error *err) {
    memset(out, 0, sizeof *out);
    const struct lq_model_config *c = &m->config;
    size_t n = (size_t)c->n_layers * LQ_LINEARS_PER_LAYER;
    out->matrices = calloc(n ? n : 1, sizeof *out->matrices);
    if (!out->matrices) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    out->n_matrices = n;
    double quantized_bits = 0.0, factor_bits = 0.0;
    for (size_t i = 0; i < n; i++) {
        int layer = (int)(i / LQ_LINEARS_PER_LAYER);
        enum lq_linear_kind kind = (enum lq_linear_kind)(i % LQ_LINEARS_PER_LAYER);
        const struct lq_linear *linear = &m->layers[layer].linear[kind];
        struct lq_matrix_summary *s = &out->matrices[i];
        lq_model_linear_name(layer, kind, s->name, sizeof s->name);
        s->layer = layer, s->kind = kind;
        s->rows = linear->rows, s->cols = linear->cols;
        s->is_lq = linear->is_lq, s->rank = linear->is_lq ? linear->rank : 0;
        size_t numel = (size_t)s->rows * (size_t)s->cols;
        double bits, factors = (double)s->rank * (double)(s->rows + s->cols);
        if (s->is_lq) {
            s->config = linear->q.config;
            bits = lq_nf_storage_bits(numel, &s->config);
            s->bytes = lq_nf_matrix_bytes(&linear->q) + (size_t)factors * sizeof(float);
        } else {
            bits = 32.0 * (double)numel;
            s->bytes = numel * sizeof(float);
        }
        s->bits_per_param = bits / (double)numel;
        s->effective_bits = (bits + 32.0 * factors) / (double)numel;
        s->effective_bits_16 = (bits + 16.0 * factors) / (double)numel;
        quantized_bits += bits;
        factor_bits += factors;
        out->linear_params += numel;
        out->linear_bytes += s->bytes;
    }
    double params = (double)out->linear_params;
    out->bits_per_param = quantized_bits / params;
    out->effective_bits = (quantized_bits + 32.0 * factor_bits) / params;
    out->effective_bits_16 = (quantized_bits + 16.0 * factor_bits) / params;
    size_t vd = (size_t)c->vocab_size * (size_t)c->dim;
    out->other_params =
        vd + (size_t)c->dim * (1 + 2 * (size_t)c->n_layers) + (m->lm_head != m->embed ? vd : 0);
    out->other_bytes = out->other_params * sizeof(float);
    out->total_bytes = out->linear_bytes + out->other_bytes;
    return LQ_OK;
}

void lq_model_summary_free(struct lq_model_summary *summary) {
    free(summary->matrices);
    memset(summary, 0, sizeof *summary);
}
