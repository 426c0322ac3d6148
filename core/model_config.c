/* config.json of HuggingFace LLaMA checkpoints: parsing and writing. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file_util.h"
#include "core/model.h"

static const char *const linear_names[LQ_LINEARS_PER_LAYER] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj",
};
static const char *const linear_short[LQ_LINEARS_PER_LAYER] = {"q",    "k",  "v",   "o",
                                                               "gate", "up", "down"};

const char *lq_linear_kind_name(enum lq_linear_kind kind) {
    return (unsigned)kind < LQ_LINEARS_PER_LAYER ? linear_names[kind] : "?";
}

const char *lq_linear_kind_short(enum lq_linear_kind kind) {
    return (unsigned)kind < LQ_LINEARS_PER_LAYER ? linear_short[kind] : "?";
}

void lq_model_linear_name(int layer, enum lq_linear_kind kind, char *buffer, size_t size) {
    snprintf(buffer, size, "model.layers.%d.%s.weight", layer, lq_linear_kind_name(kind));
}

size_t lq_model_linear_params(const struct lq_model_config *c) {
    size_t q = (size_t)c->n_heads * c->head_dim, kv = (size_t)c->n_kv_heads * c->head_dim;
    size_t per_layer = (size_t)c->dim * (q + 2 * kv) + q * (size_t)c->dim +
                       3 * (size_t)c->dim * (size_t)c->hidden_dim;
    return per_layer * (size_t)c->n_layers;
}

/* An integer field: required ones must exist; all must be integers in [min, max]. */
static int int_field(const cJSON *root, const char *name, int required, long min, long max,
                     long fallback, long *out, const char *label, struct lq_error *err) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!item || cJSON_IsNull(item)) {
        if (required) return lq_error_set(err, LQ_EFORMAT, "%s: missing \"%s\"", label, name);
        *out = fallback;
        return LQ_OK;
    }
    double value = item->valuedouble;
    if (!cJSON_IsNumber(item) || value != floor(value) || value < (double)min ||
        value > (double)max)
        return lq_error_set(err, LQ_EFORMAT, "%s: \"%s\" must be an integer in [%ld, %ld]", label,
                            name, min, max);
    *out = (long)value;
    return LQ_OK;
}

static int float_field(const cJSON *item, const char *name, double fallback, double *out,
                       const char *label, struct lq_error *err) {
    if (!item || cJSON_IsNull(item)) {
        *out = fallback;
        return LQ_OK;
    }
    if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble) || item->valuedouble <= 0)
        return lq_error_set(err, LQ_EFORMAT, "%s: \"%s\" must be a positive number", label, name);
    *out = item->valuedouble;
    return LQ_OK;
}

static int parse_root(const cJSON *root, const char *label, struct lq_model_config *c,
                      struct lq_error *err) {
    if (!cJSON_IsObject(root)) return lq_error_set(err, LQ_EFORMAT, "%s: not a JSON object", label);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (cJSON_IsString(type) && strcmp(type->valuestring, "llama") != 0 &&
        strcmp(type->valuestring, "mistral") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: model_type \"%s\" is not supported (LLaMA-family only)", label,
                            type->valuestring);
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (cJSON_IsString(act) && strcmp(act->valuestring, "silu") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: hidden_act \"%s\" is not supported (silu)",
                            label, act->valuestring);
    const cJSON *bias = cJSON_GetObjectItemCaseSensitive(root, "attention_bias");
    if (cJSON_IsTrue(bias))
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: attention_bias is not supported", label);
    long dim = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, hidden = 0, vocab = 0,
         max_seq = 0, bos = -1, eos = -1;
    int rc;
    if ((rc = int_field(root, "hidden_size", 1, 1, 1 << 20, 0, &dim, label, err)) ||
        (rc = int_field(root, "num_hidden_layers", 1, 1, 4096, 0, &layers, label, err)) ||
        (rc = int_field(root, "num_attention_heads", 1, 1, 65536, 0, &heads, label, err)) ||
        (rc = int_field(root, "num_key_value_heads", 0, 1, 65536, heads, &kv_heads, label, err)) ||
        (rc = int_field(root, "head_dim", 0, 1, 65536, heads ? dim / heads : 0, &head_dim, label,
                        err)) ||
        (rc = int_field(root, "intermediate_size", 1, 1, 1 << 24, 0, &hidden, label, err)) ||
        (rc = int_field(root, "vocab_size", 1, 1, 1 << 24, 0, &vocab, label, err)) ||
        (rc = int_field(root, "max_position_embeddings", 0, 1, 1 << 24, 2048, &max_seq, label,
                        err)) ||
        (rc = int_field(root, "bos_token_id", 0, -1, 1 << 24, -1, &bos, label, err)) ||
        (rc = int_field(root, "eos_token_id", 0, -1, 1 << 24, -1, &eos, label, err)))
        return rc;
    if (heads % kv_heads != 0)
        return lq_error_set(
            err, LQ_EFORMAT,
            "%s: num_attention_heads %ld is not a multiple of num_key_value_heads %ld", label,
            heads, kv_heads);
    if (head_dim % 2 != 0)
        return lq_error_set(err, LQ_EFORMAT, "%s: head_dim %ld must be even for RoPE", label,
                            head_dim);
    double theta = 0, eps = 0;
    const cJSON *rope = cJSON_GetObjectItemCaseSensitive(root, "rope_theta");
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    if (!rope && cJSON_IsObject(params))
        rope = cJSON_GetObjectItemCaseSensitive(params, "rope_theta");
    const cJSON *scaling = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    const cJSON *rope_type =
        cJSON_IsObject(params) ? cJSON_GetObjectItemCaseSensitive(params, "rope_type") : NULL;
    if ((scaling && !cJSON_IsNull(scaling)) ||
        (cJSON_IsString(rope_type) && strcmp(rope_type->valuestring, "default") != 0))
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: RoPE scaling is not supported", label);
    if ((rc = float_field(rope, "rope_theta", 10000.0, &theta, label, err)) ||
        (rc = float_field(cJSON_GetObjectItemCaseSensitive(root, "rms_norm_eps"), "rms_norm_eps",
                          1e-6, &eps, label, err)))
        return rc;
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
    *c = (struct lq_model_config){
        .dim = (int)dim,
        .n_layers = (int)layers,
        .n_heads = (int)heads,
        .n_kv_heads = (int)kv_heads,
        .head_dim = (int)head_dim,
        .hidden_dim = (int)hidden,
        .vocab_size = (int)vocab,
        .max_seq_len = (int)max_seq,
        .rope_theta = (float)theta,
        .norm_eps = (float)eps,
        .tie_embeddings = cJSON_IsTrue(tie),
        .bos_id = (int)bos,
        .eos_id = (int)eos,
    };
    return LQ_OK;
}

int lq_model_config_parse(const char *json, size_t length, const char *label,
                          struct lq_model_config *out, struct lq_error *err) {
    cJSON *root = lq_json_parse(json, length);
    if (!root) return lq_error_set(err, LQ_EFORMAT, "%s: not valid JSON", label);
    int rc = parse_root(root, label, out, err);
    cJSON_Delete(root);
    return rc;
}

int lq_model_config_load(const char *dir, struct lq_model_config *out, struct lq_error *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text;
    size_t length;
    int rc = lq_file_read_all(path, 16 << 20, &text, &length, err);
    if (rc) return rc;
    rc = lq_model_config_parse(text, length, path, out, err);
    free(text);
    return rc;
}

int lq_model_config_write(const struct lq_model_config *c, const char *path, struct lq_error *err) {
    cJSON *root = cJSON_CreateObject();
    cJSON *architectures = cJSON_AddArrayToObject(root, "architectures");
    cJSON_AddItemToArray(architectures, cJSON_CreateString("LlamaForCausalLM"));
    cJSON_AddStringToObject(root, "model_type", "llama");
    cJSON_AddStringToObject(root, "hidden_act", "silu");
    cJSON_AddNumberToObject(root, "hidden_size", c->dim);
    cJSON_AddNumberToObject(root, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(root, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(root, "num_key_value_heads", c->n_kv_heads);
    cJSON_AddNumberToObject(root, "head_dim", c->head_dim);
    cJSON_AddNumberToObject(root, "intermediate_size", c->hidden_dim);
    cJSON_AddNumberToObject(root, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(root, "max_position_embeddings", c->max_seq_len);
    cJSON_AddNumberToObject(root, "rope_theta", c->rope_theta);
    cJSON_AddNumberToObject(root, "rms_norm_eps", c->norm_eps);
    cJSON_AddBoolToObject(root, "tie_word_embeddings", c->tie_embeddings);
    cJSON_AddBoolToObject(root, "attention_bias", 0);
    if (c->bos_id >= 0) cJSON_AddNumberToObject(root, "bos_token_id", c->bos_id);
    if (c->eos_id >= 0) cJSON_AddNumberToObject(root, "eos_token_id", c->eos_id);
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return lq_error_set(err, LQ_ENOMEM, "out of memory writing %s", path);
    int rc = lq_file_write_atomic(path, text, strlen(text), err);
    cJSON_free(text);
    return rc;
}
