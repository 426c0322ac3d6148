/* lqd import (see the header): the model lq_model_load makes of a GGUF file, written back
 * out in the HF layout, with the GGUF's tokenizer as HF files. */
#include "core/gguf_import.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/dir_write.h"
#include "core/file_util.h"
#include "core/gguf.h"
#include "core/model.h"
#include "core/model_internal.h"
#include "core/safetensors.h"
#include "core/tokenizer_export.h"

#define IMPORT_METADATA_KEY "lqd.imported_from" /* marks a directory --force may replace */

/* ---------- the destination ---------- */

/* Only what lqd import wrote (or an empty directory) may be replaced: --force on a wrong
 * path must not delete someone's data. */
static int is_import_dir(const char *path) {
    return lq_dir_model_has_metadata(path, IMPORT_METADATA_KEY);
}

static const struct lq_dir_kind import_dir_kind = {
    .force_replaces = "an earlier import",
    .name = "a directory lqd import wrote",
    .is_ours = is_import_dir,
};

int lq_gguf_import_check_destination(const char *dir, int force, struct lq_error *err) {
    return lq_dir_check_destination(dir, force, &import_dir_kind, err);
}

/* ---------- model.safetensors ---------- */

static int add_f32(struct lq_safetensors_writer *w, const char *name, const float *data, int64_t d0,
                   int64_t d1, struct lq_gguf_import_report *report, struct lq_error *err) {
    int64_t shape[2] = {d0, d1};
    report->tensors++;
    report->parameters += (uint64_t)d0 * (uint64_t)(d1 ? d1 : 1);
    return lq_safetensors_writer_add(w, name, LQ_DTYPE_F32, d1 ? 2 : 1, shape, data, err);
}

static int write_weights(const struct lq_model *m, const char *source, const char *path,
                         struct lq_gguf_import_report *report, struct lq_error *err) {
    const struct lq_model_config *c = &m->config;
    struct lq_safetensors_writer *w;
    int rc = lq_safetensors_writer_create(&w, err);
    if (rc) return rc;
    rc = add_f32(w, "model.embed_tokens.weight", m->embed, c->vocab_size, c->dim, report, err);
    if (!rc) rc = add_f32(w, "model.norm.weight", m->final_norm, c->dim, 0, report, err);
    if (!rc && !c->tie_embeddings)
        rc = add_f32(w, "lm_head.weight", m->lm_head, c->vocab_size, c->dim, report, err);
    for (int l = 0; l < c->n_layers && !rc; l++) {
        const struct lq_layer *layer = &m->layers[l];
        char name[256];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        if ((rc = add_f32(w, name, layer->attn_norm, c->dim, 0, report, err))) break;
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        if ((rc = add_f32(w, name, layer->ffn_norm, c->dim, 0, report, err))) break;
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !rc; k++) {
            const struct lq_linear *linear = &layer->linear[k];
            lq_model_linear_name(l, (enum lq_linear_kind)k, name, sizeof name);
            rc = add_f32(w, name, linear->dense, linear->rows, linear->cols, report, err);
        }
    }
    /* transformers refuses safetensors metadata without format "pt" (or another framework). */
    if (!rc) rc = lq_safetensors_writer_set_metadata(w, "format", "pt", err);
    if (!rc) rc = lq_safetensors_writer_set_metadata(w, IMPORT_METADATA_KEY, source, err);
    if (!rc) rc = lq_safetensors_writer_write(w, path, err);
    lq_safetensors_writer_free(w);
    return rc;
}

/* ---------- config.json ---------- */

/* The shortest decimal that reads back as the same float: 1e-05 rather than
 * 9.9999997473787516e-06, which lqd and transformers both read as the float the GGUF holds. */
static cJSON *float_number(float value) {
    char text[48];
    if (value == (float)(long)value && value > -1e9f && value < 1e9f) { /* 100000.0, not 1e+05 */
        snprintf(text, sizeof text, "%.1f", (double)value);
        return cJSON_CreateRaw(text);
    }
    for (int digits = 1; digits <= 9; digits++) {
        snprintf(text, sizeof text, "%.*g", digits, (double)value);
        if (strtof(text, NULL) == value) break;
    }
    return cJSON_CreateRaw(text);
}

static int write_config(const struct lq_model_config *c, const char *path, struct lq_error *err) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddItemToArray(cJSON_AddArrayToObject(root, "architectures"),
                         cJSON_CreateString("LlamaForCausalLM"));
    cJSON_AddStringToObject(root, "model_type", "llama");
    cJSON_AddStringToObject(root, "hidden_act", "silu");
    cJSON_AddNumberToObject(root, "hidden_size", c->dim);
    cJSON_AddNumberToObject(root, "intermediate_size", c->hidden_dim);
    cJSON_AddNumberToObject(root, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(root, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(root, "num_key_value_heads", c->n_kv_heads);
    cJSON_AddNumberToObject(root, "head_dim", c->head_dim);
    cJSON_AddNumberToObject(root, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(root, "max_position_embeddings", c->max_seq_len);
    cJSON_AddItemToObject(root, "rms_norm_eps", float_number(c->norm_eps));
    cJSON_AddItemToObject(root, "rope_theta", float_number(c->rope_theta));
    /* transformers 5 reads rope_parameters; 4.x reads rope_theta above. */
    cJSON *rope = cJSON_AddObjectToObject(root, "rope_parameters");
    cJSON_AddItemToObject(rope, "rope_theta", float_number(c->rope_theta));
    cJSON_AddStringToObject(rope, "rope_type", "default");
    cJSON_AddBoolToObject(root, "tie_word_embeddings", c->tie_embeddings);
    cJSON_AddBoolToObject(root, "attention_bias", 0);
    cJSON_AddBoolToObject(root, "mlp_bias", 0);
    if (c->bos_id >= 0) cJSON_AddNumberToObject(root, "bos_token_id", c->bos_id);
    if (c->eos_id >= 0) cJSON_AddNumberToObject(root, "eos_token_id", c->eos_id);
    cJSON_AddStringToObject(root, "torch_dtype", "float32"); /* "dtype" in transformers 5 */
    cJSON_AddStringToObject(root, "dtype", "float32");
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return lq_error_set(err, LQ_ENOMEM, "out of memory writing %s", path);
    int rc = lq_file_write_atomic(path, text, strlen(text), err);
    cJSON_free(text);
    return rc;
}

/* ---------- the tokenizer ---------- */

static int write_tokenizer(const char *gguf_path, int max_seq_len, const char *tmp,
                           struct lq_gguf_import_report *report, struct lq_error *err) {
    struct lq_gguf *gguf = NULL;
    int rc = lq_gguf_open(gguf_path, &gguf, err);
    if (rc) return rc;
    struct lq_tokenizer_export exported;
    rc = lq_tokenizer_export_gguf(gguf, gguf_path, max_seq_len, &exported, err);
    lq_gguf_close(gguf);
    if (rc == LQ_ENOTFOUND) { /* a GGUF without a tokenizer still holds a model */
        if (err) err->code = LQ_OK, err->message[0] = '\0';
        return LQ_OK;
    }
    char path[4096 + 64];
    snprintf(path, sizeof path, "%s/tokenizer.json", tmp);
    if (!rc)
        rc = lq_file_write_atomic(path, exported.tokenizer_json, strlen(exported.tokenizer_json),
                                  err);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", tmp);
    if (!rc)
        rc = lq_file_write_atomic(path, exported.tokenizer_config_json,
                                  strlen(exported.tokenizer_config_json), err);
    if (!rc) {
        report->has_tokenizer = 1;
        report->tokenizer = exported.model;
        report->vocab_size = exported.vocab_size;
        report->merges = exported.merges;
        report->added = exported.added;
        report->chat_template = exported.chat_template;
    }
    lq_tokenizer_export_free(&exported);
    return rc;
}

/* ---------- the directory ---------- */

static int fill_directory(const char *gguf_path, const char *tmp,
                          struct lq_gguf_import_report *report, struct lq_error *err) {
    struct lq_model *model = NULL;
    int rc = lq_model_load(gguf_path, &model, err);
    if (rc) return rc;
    report->tied = model->config.tie_embeddings;
    char path[4096 + 64];
    snprintf(path, sizeof path, "%s/config.json", tmp);
    rc = write_config(&model->config, path, err);
    snprintf(path, sizeof path, "%s/model.safetensors", tmp);
    if (!rc) rc = write_weights(model, gguf_path, path, report, err);
    int max_seq_len = model->config.max_seq_len;
    lq_model_free(model); /* before the tokenizer: the weights are the bulk of the memory */
    if (!rc) rc = write_tokenizer(gguf_path, max_seq_len, tmp, report, err);
    return rc;
}

struct fill_context {
    const char *gguf_path;
    struct lq_gguf_import_report *report;
};

static int fill(const char *tmp, void *context, struct lq_error *err) {
    struct fill_context *c = context;
    return fill_directory(c->gguf_path, tmp, c->report, err);
}

int lq_gguf_import(const char *gguf_path, const char *dir, int force,
                   struct lq_gguf_import_report *report, struct lq_error *err) {
    struct lq_gguf_import_report scratch;
    if (!report) report = &scratch;
    memset(report, 0, sizeof *report);
    if (!lq_path_is_file(gguf_path))
        return lq_error_set(err, LQ_ENOTFOUND, "%s: no such file", gguf_path);
    if (!lq_model_is_gguf(gguf_path))
        return lq_error_set(err, LQ_EFORMAT, "%s: not a GGUF file (no \"GGUF\" magic)", gguf_path);
    struct fill_context context = {gguf_path, report};
    return lq_dir_write_atomic(dir, force, &import_dir_kind, fill, &context, err);
}
