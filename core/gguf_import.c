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

#include "core/file_util.h"
#include "core/gguf.h"
#include "core/model.h"
#include "core/model_internal.h"
#include "core/safetensors.h"
#include "core/tokenizer_export.h"

#define IMPORT_METADATA_KEY "lqd.imported_from" /* marks a directory --force may replace */

/* ---------- the destination ---------- */

static int remove_tree(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return -1;
    if (!S_ISDIR(st.st_mode)) return unlink(path);
    DIR *dir = opendir(path);
    if (!dir) return -1;
    int rc = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
        char child[4096];
        if ((size_t)snprintf(child, sizeof child, "%s/%s", path, entry->d_name) >= sizeof child ||
            remove_tree(child) != 0)
            rc = -1;
    }
    closedir(dir);
    return rmdir(path) != 0 ? -1 : rc;
}

static int directory_is_empty(const char *path) {
    DIR *dir = opendir(path);
    if (!dir) return 0;
    struct dirent *entry;
    int empty = 1;
    while (empty && (entry = readdir(dir)) != NULL)
        if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0) empty = 0;
    closedir(dir);
    return empty;
}

/* Only what lqd import wrote (or an empty directory) may be replaced: --force on a wrong
 * path must not delete someone's data. */
static int is_import_dir(const char *path) {
    char file[4096 + 32];
    snprintf(file, sizeof file, "%s/model.safetensors", path);
    struct lq_safetensors *st;
    if (lq_safetensors_open(file, &st, NULL) != 0) return 0;
    int yes = lq_safetensors_metadata(st, IMPORT_METADATA_KEY) != NULL;
    lq_safetensors_close(st);
    return yes;
}

/* dir without trailing slashes into path (4096 bytes), and the directory holding it. */
static int split_dir(const char *dir, char path[4096], char parent[4096], struct lq_error *err) {
    size_t length = strlen(dir);
    while (length > 1 && dir[length - 1] == '/') length--;
    if (length == 0) return lq_error_set(err, LQ_EINVAL, "empty output directory name");
    if (length + 32 >= 4096) return lq_error_set(err, LQ_EINVAL, "%s: path too long", dir);
    memcpy(path, dir, length);
    path[length] = '\0';
    snprintf(parent, 4096, "%s", path);
    char *slash = strrchr(parent, '/');
    if (slash == parent)
        parent[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(parent, 4096, ".");
    return LQ_OK;
}

int lq_gguf_import_check_destination(const char *dir, int force, struct lq_error *err) {
    char path[4096], parent[4096];
    int rc = split_dir(dir, path, parent, err);
    if (rc) return rc;
    if (!lq_path_is_dir(parent))
        return lq_error_set(err, LQ_EINVAL, "%s: parent directory %s does not exist", path, parent);
    struct stat st;
    if (lstat(path, &st) != 0) return LQ_OK;
    if (!force)
        return lq_error_set(err, LQ_EINVAL,
                            "%s already exists (--force replaces an earlier import)", path);
    if (!S_ISDIR(st.st_mode) || (!directory_is_empty(path) && !is_import_dir(path)))
        return lq_error_set(err, LQ_EINVAL,
                            "%s exists and is not a directory lqd import wrote: not replacing it",
                            path);
    return LQ_OK;
}

static void sync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return;
    fsync(fd);
    close(fd);
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

int lq_gguf_import(const char *gguf_path, const char *dir, int force,
                   struct lq_gguf_import_report *report, struct lq_error *err) {
    struct lq_gguf_import_report scratch;
    if (!report) report = &scratch;
    memset(report, 0, sizeof *report);
    if (!lq_path_is_file(gguf_path))
        return lq_error_set(err, LQ_ENOTFOUND, "%s: no such file", gguf_path);
    if (!lq_model_is_gguf(gguf_path))
        return lq_error_set(err, LQ_EFORMAT, "%s: not a GGUF file (no \"GGUF\" magic)", gguf_path);
    char path[4096], parent[4096], tmp[4096 + 16], old[4096 + 16];
    int rc = split_dir(dir, path, parent, err);
    if (rc || (rc = lq_gguf_import_check_destination(path, force, err))) return rc;
    snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", path);
    if (!mkdtemp(tmp)) return lq_error_set(err, LQ_EIO, "%s: %s", tmp, strerror(errno));
    chmod(tmp, 0755); /* mkdtemp makes it 0700; a model directory is shared like any other */
    if ((rc = fill_directory(gguf_path, tmp, report, err))) {
        remove_tree(tmp);
        return rc;
    }
    sync_path(tmp);
    struct stat st;
    int replacing = lstat(path, &st) == 0;
    if (replacing) {
        /* The old directory goes aside (renamed onto a fresh empty one), the new one into
         * place; if that fails, the old one comes back. */
        snprintf(old, sizeof old, "%s.old-XXXXXX", path);
        if (!mkdtemp(old) || rename(path, old) != 0) {
            rc = lq_error_set(err, LQ_EIO, "%s: cannot move the old directory aside: %s", path,
                              strerror(errno));
            rmdir(old);
            remove_tree(tmp);
            return rc;
        }
    }
    if (rename(tmp, path) != 0) {
        rc = lq_error_set(err, LQ_EIO, "%s: %s", path, strerror(errno));
        if (replacing) rename(old, path);
        remove_tree(tmp);
        return rc;
    }
    sync_path(parent);
    if (replacing && remove_tree(old) != 0)
        return lq_error_set(err, LQ_EIO, "%s written, but the old copy %s could not be removed",
                            path, old);
    return LQ_OK;
}
