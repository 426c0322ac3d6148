/* LoRA adapters in PEFT's on-disk layout (core/adapter.h): adapter_config.json +
 * adapter_model.safetensors, written as a whole directory renamed into place. */
#define _XOPEN_SOURCE 700 /* nftw */
#include "core/adapter.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/dir_write.h"
#include "core/file_util.h"
#include "core/safetensors.h"

#define CONFIG_FILE "adapter_config.json"
#define WEIGHTS_FILE "adapter_model.safetensors"
#define CONFIG_MAX_BYTES (1u << 20)
/* PEFT prefixes every module of a causal LM with the wrapper's path. */
#define PEFT_PREFIX "base_model.model."
/* Past this many layers a tensor name is refused rather than allocated for. */
#define MAX_LAYERS 4096

const char *lq_adapter_mode_name(enum lq_adapter_mode mode) {
    return mode == LQ_ADAPTER_REPLACE ? "replace" : "add";
}

int lq_adapter_create(int n_layers, enum lq_adapter_mode mode, struct lq_adapter **out,
                      struct lq_error *err) {
    if (!out) return lq_error_set(err, LQ_EINVAL, "lq_adapter_create: NULL argument");
    *out = NULL;
    if (n_layers <= 0 || n_layers > MAX_LAYERS)
        return lq_error_set(err, LQ_EINVAL, "adapter: %d layers (expected 1..%d)", n_layers,
                            MAX_LAYERS);
    if (mode != LQ_ADAPTER_REPLACE && mode != LQ_ADAPTER_ADD)
        return lq_error_set(err, LQ_EINVAL, "adapter: unknown mode %d", (int)mode);
    struct lq_adapter *adapter = calloc(1, sizeof *adapter);
    if (adapter)
        adapter->matrices =
            calloc((size_t)n_layers * LQ_LINEARS_PER_LAYER, sizeof *adapter->matrices);
    if (!adapter || !adapter->matrices) {
        free(adapter);
        return lq_error_set(err, LQ_ENOMEM, "adapter: out of memory");
    }
    adapter->mode = mode;
    adapter->n_layers = n_layers;
    snprintf(adapter->init, sizeof adapter->init, "%s", mode == LQ_ADAPTER_REPLACE ? "lq" : "zero");
    *out = adapter;
    return LQ_OK;
}

void lq_adapter_free(struct lq_adapter *adapter) {
    if (!adapter) return;
    size_t n = (size_t)adapter->n_layers * LQ_LINEARS_PER_LAYER;
    for (size_t i = 0; adapter->matrices && i < n; i++) {
        free(adapter->matrices[i].L1);
        free(adapter->matrices[i].L2);
    }
    free(adapter->matrices);
    free(adapter);
}

struct lq_adapter_matrix *lq_adapter_matrix(struct lq_adapter *adapter, int layer,
                                            enum lq_linear_kind kind) {
    if (!adapter || layer < 0 || layer >= adapter->n_layers || (int)kind < 0 ||
        kind >= LQ_LINEARS_PER_LAYER)
        return NULL;
    return &adapter->matrices[(size_t)layer * LQ_LINEARS_PER_LAYER + kind];
}

static const struct lq_adapter_matrix *matrix_at(const struct lq_adapter *adapter, int layer,
                                                 int kind) {
    return &adapter->matrices[(size_t)layer * LQ_LINEARS_PER_LAYER + (size_t)kind];
}

/* "model.layers.3.mlp.up_proj": the module PEFT wraps (the HF tensor name less ".weight"). */
static void module_name(int layer, int kind, char *buffer, size_t size) {
    snprintf(buffer, size, "model.layers.%d.%s", layer,
             lq_linear_kind_name((enum lq_linear_kind)kind));
}

/* The short module name PEFT's target_modules lists: "q_proj", "up_proj". */
static const char *target_name(int kind) {
    const char *name = lq_linear_kind_name((enum lq_linear_kind)kind);
    const char *dot = strrchr(name, '.');
    return dot ? dot + 1 : name;
}

/* ---------- saving ---------- */

/* Every pair must be whole and finite before anything is written. Returns the most common
 * rank (PEFT's r; other ranks go to rank_pattern) through *common_rank. */
static int validate_for_save(const struct lq_adapter *adapter, int *common_rank,
                             struct lq_error *err) {
    if (!adapter || adapter->n_layers <= 0 || !adapter->matrices)
        return lq_error_set(err, LQ_EINVAL, "adapter: empty (no layers)");
    int best_rank = 0, best_count = 0, pairs = 0;
    for (int l = 0; l < adapter->n_layers; l++) {
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_adapter_matrix *m = matrix_at(adapter, l, k);
            char name[128];
            module_name(l, k, name, sizeof name);
            if (m->rank < 0)
                return lq_error_set(err, LQ_EINVAL, "adapter: %s: rank %d", name, m->rank);
            if (m->rank == 0) continue;
            if (!m->L1 || !m->L2 || m->rows <= 0 || m->cols <= 0)
                return lq_error_set(err, LQ_EINVAL, "adapter: %s: rank %d without factors", name,
                                    m->rank);
            size_t n1 = (size_t)m->rows * (size_t)m->rank, n2 = (size_t)m->rank * (size_t)m->cols;
            for (size_t i = 0; i < n1; i++)
                if (!isfinite(m->L1[i]))
                    return lq_error_set(err, LQ_ENUMERIC, "adapter: %s: lora_B[%zu] is %g", name, i,
                                        (double)m->L1[i]);
            for (size_t i = 0; i < n2; i++)
                if (!isfinite(m->L2[i]))
                    return lq_error_set(err, LQ_ENUMERIC, "adapter: %s: lora_A[%zu] is %g", name, i,
                                        (double)m->L2[i]);
            pairs++;
            int count = 0;
            for (int l2 = 0; l2 < adapter->n_layers; l2++)
                for (int k2 = 0; k2 < LQ_LINEARS_PER_LAYER; k2++)
                    count += matrix_at(adapter, l2, k2)->rank == m->rank;
            if (count > best_count || (count == best_count && m->rank < best_rank))
                best_rank = m->rank, best_count = count;
        }
    }
    if (!pairs) return lq_error_set(err, LQ_EINVAL, "adapter: no adapted matrices to save");
    *common_rank = best_rank;
    return LQ_OK;
}

static char *config_json(const struct lq_adapter *adapter, int rank) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    /* alpha = r (and alpha_pattern = rank_pattern) makes PEFT's scaling alpha/r exactly 1. */
    cJSON_AddStringToObject(root, "peft_type", "LORA");
    cJSON_AddStringToObject(root, "task_type", "CAUSAL_LM");
    cJSON_AddNumberToObject(root, "r", rank);
    cJSON_AddNumberToObject(root, "lora_alpha", rank);
    cJSON_AddNumberToObject(root, "lora_dropout", 0.0);
    cJSON_AddStringToObject(root, "bias", "none");
    cJSON_AddBoolToObject(root, "fan_in_fan_out", 0);
    cJSON_AddBoolToObject(root, "inference_mode", 1);
    cJSON_AddBoolToObject(root, "use_rslora", 0);
    cJSON_AddNullToObject(root, "modules_to_save");
    if (adapter->base_model[0])
        cJSON_AddStringToObject(root, "base_model_name_or_path", adapter->base_model);
    else
        cJSON_AddNullToObject(root, "base_model_name_or_path");
    cJSON *targets = cJSON_AddArrayToObject(root, "target_modules");
    cJSON *ranks = cJSON_AddObjectToObject(root, "rank_pattern");
    cJSON *alphas = cJSON_AddObjectToObject(root, "alpha_pattern");
    for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
        int used = 0;
        for (int l = 0; l < adapter->n_layers; l++) {
            const struct lq_adapter_matrix *m = matrix_at(adapter, l, k);
            if (m->rank == 0) continue;
            used = 1;
            if (m->rank != rank) {
                char name[128];
                module_name(l, k, name, sizeof name);
                cJSON_AddNumberToObject(ranks, name, m->rank);
                cJSON_AddNumberToObject(alphas, name, m->rank);
            }
        }
        if (used) cJSON_AddItemToArray(targets, cJSON_CreateString(target_name(k)));
    }
    cJSON_AddStringToObject(root, "lqd_mode", lq_adapter_mode_name(adapter->mode));
    cJSON_AddStringToObject(root, "lqd_init", adapter->init[0] ? adapter->init : "zero");
    cJSON_AddNumberToObject(root, "lqd_layers", adapter->n_layers);
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    return text;
}

static int write_weights(const struct lq_adapter *adapter, const char *path, struct lq_error *err) {
    struct lq_safetensors_writer *w;
    int rc = lq_safetensors_writer_create(&w, err);
    if (rc) return rc;
    rc = lq_safetensors_writer_set_metadata(w, "format", "pt", err);
    for (int l = 0; l < adapter->n_layers && !rc; l++) {
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !rc; k++) {
            const struct lq_adapter_matrix *m = matrix_at(adapter, l, k);
            if (m->rank == 0) continue;
            char module[128], name[256];
            module_name(l, k, module, sizeof module);
            int64_t shape_A[2] = {m->rank, m->cols}, shape_B[2] = {m->rows, m->rank};
            snprintf(name, sizeof name, PEFT_PREFIX "%s.lora_A.weight", module);
            rc = lq_safetensors_writer_add(w, name, LQ_DTYPE_F32, 2, shape_A, m->L2, err);
            snprintf(name, sizeof name, PEFT_PREFIX "%s.lora_B.weight", module);
            if (!rc) rc = lq_safetensors_writer_add(w, name, LQ_DTYPE_F32, 2, shape_B, m->L1, err);
        }
    }
    if (!rc) rc = lq_safetensors_writer_write(w, path, err);
    lq_safetensors_writer_free(w);
    return rc;
}

/* An existing destination is replaced only when it is an adapter (or empty) directory: a
 * mistyped --out must never remove a model or a home directory. */
static int replaceable(const char *dir) {
    char path[4096 + 32];
    snprintf(path, sizeof path, "%s/" CONFIG_FILE, dir);
    return lq_path_is_file(path);
}

static const struct lq_dir_kind adapter_dir_kind = {
    .force_replaces = "an adapter directory",
    .name = "an adapter directory",
    .is_ours = replaceable,
};

struct fill_context {
    const struct lq_adapter *adapter;
    int rank;
};

static int fill(const char *tmp, void *context, struct lq_error *err) {
    const struct fill_context *c = context;
    char file[4096 + 64];
    char *json = config_json(c->adapter, c->rank);
    if (!json) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", tmp);
    snprintf(file, sizeof file, "%s/" CONFIG_FILE, tmp);
    int rc = lq_file_write_atomic(file, json, strlen(json), err);
    free(json);
    snprintf(file, sizeof file, "%s/" WEIGHTS_FILE, tmp);
    return rc ? rc : write_weights(c->adapter, file, err);
}

int lq_adapter_save(const struct lq_adapter *adapter, const char *dir, int replace,
                    struct lq_error *err) {
    if (!dir || !*dir) return lq_error_set(err, LQ_EINVAL, "adapter: no directory given");
    struct fill_context context = {adapter, 0};
    if (validate_for_save(adapter, &context.rank, err)) return lq_error_prefix(err, "%s", dir);
    return lq_dir_write_atomic(dir, replace, &adapter_dir_kind, fill, &context, err);
}

/* ---------- loading ---------- */

struct peft_config {
    int rank;
    double alpha;
    int rslora;
    const cJSON *rank_pattern, *alpha_pattern; /* borrowed from the parsed JSON */
    enum lq_adapter_mode mode;
    int layers; /* lqd_layers, 0 when absent */
};

/* PEFT's pattern keys match a module name or a dotted suffix of it ("q_proj",
 * "layers.0.self_attn.q_proj"); regular expressions beyond that are not interpreted. */
static const cJSON *pattern_lookup(const cJSON *pattern, const char *module) {
    const cJSON *item;
    cJSON_ArrayForEach(item, pattern) {
        const char *key = item->string;
        size_t nm = strlen(module), nk = strlen(key);
        if (nk == nm && strcmp(module, key) == 0) return item;
        if (nk < nm && strcmp(module + nm - nk, key) == 0 && module[nm - nk - 1] == '.')
            return item;
    }
    return NULL;
}

static int parse_config(const cJSON *root, const char *label, struct peft_config *c,
                        struct lq_adapter *header, struct lq_error *err) {
    memset(c, 0, sizeof *c);
    if (!cJSON_IsObject(root)) return lq_error_set(err, LQ_EFORMAT, "%s: not a JSON object", label);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "peft_type");
    if (!cJSON_IsString(type))
        return lq_error_set(err, LQ_EFORMAT, "%s: no peft_type (expected \"LORA\")", label);
    if (strcmp(type->valuestring, "LORA") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: peft_type \"%.64s\" is not LORA", label,
                            type->valuestring);
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(root, "r");
    if (!cJSON_IsNumber(r) || r->valuedouble < 1 || r->valuedouble > 65536 ||
        r->valuedouble != floor(r->valuedouble))
        return lq_error_set(err, LQ_EFORMAT, "%s: r must be a positive integer", label);
    c->rank = (int)r->valuedouble;
    const cJSON *alpha = cJSON_GetObjectItemCaseSensitive(root, "lora_alpha");
    if (alpha && !cJSON_IsNull(alpha) && (!cJSON_IsNumber(alpha) || !isfinite(alpha->valuedouble)))
        return lq_error_set(err, LQ_EFORMAT, "%s: lora_alpha must be a number", label);
    c->alpha = cJSON_IsNumber(alpha) ? alpha->valuedouble : 8.0; /* PEFT's default */
    const cJSON *rslora = cJSON_GetObjectItemCaseSensitive(root, "use_rslora");
    c->rslora = cJSON_IsTrue(rslora);
    /* Variants whose weights mean something else than W + s·B·A are refused by name. */
    const char *flags[] = {"use_dora", "fan_in_fan_out"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, flags[i])))
            return lq_error_set(err, LQ_EUNSUPPORTED, "%s: %s is not supported", label, flags[i]);
    const cJSON *bias = cJSON_GetObjectItemCaseSensitive(root, "bias");
    if (cJSON_IsString(bias) && strcmp(bias->valuestring, "none") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: bias \"%.32s\" is not supported", label,
                            bias->valuestring);
    const cJSON *save = cJSON_GetObjectItemCaseSensitive(root, "modules_to_save");
    if (cJSON_IsArray(save) && cJSON_GetArraySize(save) > 0)
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: modules_to_save is not supported", label);
    c->rank_pattern = cJSON_GetObjectItemCaseSensitive(root, "rank_pattern");
    c->alpha_pattern = cJSON_GetObjectItemCaseSensitive(root, "alpha_pattern");
    if (c->rank_pattern && !cJSON_IsObject(c->rank_pattern)) c->rank_pattern = NULL;
    if (c->alpha_pattern && !cJSON_IsObject(c->alpha_pattern)) c->alpha_pattern = NULL;

    c->mode = LQ_ADAPTER_ADD; /* PEFT's own adapters add to the weights they were trained on */
    const cJSON *mode = cJSON_GetObjectItemCaseSensitive(root, "lqd_mode");
    if (mode && !cJSON_IsNull(mode)) {
        if (cJSON_IsString(mode) && strcmp(mode->valuestring, "replace") == 0)
            c->mode = LQ_ADAPTER_REPLACE;
        else if (!cJSON_IsString(mode) || strcmp(mode->valuestring, "add") != 0)
            return lq_error_set(err, LQ_EFORMAT, "%s: lqd_mode must be \"replace\" or \"add\"",
                                label);
    }
    const cJSON *init = cJSON_GetObjectItemCaseSensitive(root, "lqd_init");
    snprintf(header->init, sizeof header->init, "%s",
             c->mode == LQ_ADAPTER_REPLACE ? "lq" : "zero");
    if (init && !cJSON_IsNull(init)) {
        if (!cJSON_IsString(init) ||
            (strcmp(init->valuestring, "lq") != 0 && strcmp(init->valuestring, "zero") != 0))
            return lq_error_set(err, LQ_EFORMAT, "%s: lqd_init must be \"lq\" or \"zero\"", label);
        snprintf(header->init, sizeof header->init, "%s", init->valuestring);
    }
    const cJSON *base = cJSON_GetObjectItemCaseSensitive(root, "base_model_name_or_path");
    if (cJSON_IsString(base))
        snprintf(header->base_model, sizeof header->base_model, "%s", base->valuestring);
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(root, "lqd_layers");
    if (cJSON_IsNumber(layers)) {
        if (layers->valuedouble < 1 || layers->valuedouble > MAX_LAYERS)
            return lq_error_set(err, LQ_EFORMAT, "%s: lqd_layers %g out of range", label,
                                layers->valuedouble);
        c->layers = (int)layers->valuedouble;
    }
    return LQ_OK;
}

/* Parses "base_model.model.model.layers.N.<kind>.lora_{A,B}.weight" (PEFT also writes the
 * adapter name before ".weight" in some versions: "lora_A.default.weight"). */
static int parse_tensor_name(const char *name, int *layer, int *kind, int *is_B) {
    const char *p = name;
    if (strncmp(p, PEFT_PREFIX, strlen(PEFT_PREFIX)) != 0) return -1;
    p += strlen(PEFT_PREFIX);
    if (strncmp(p, "model.layers.", 13) != 0) return -1;
    p += 13;
    if (*p < '0' || *p > '9' || (*p == '0' && p[1] >= '0' && p[1] <= '9')) return -1;
    long value = 0;
    while (*p >= '0' && *p <= '9') {
        value = value * 10 + (*p++ - '0');
        if (value >= MAX_LAYERS) return -1;
    }
    if (*p++ != '.') return -1;
    for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
        const char *kn = lq_linear_kind_name((enum lq_linear_kind)k);
        size_t n = strlen(kn);
        if (strncmp(p, kn, n) != 0 || p[n] != '.') continue;
        const char *rest = p + n + 1;
        int b;
        if (strncmp(rest, "lora_A.", 7) == 0)
            b = 0;
        else if (strncmp(rest, "lora_B.", 7) == 0)
            b = 1;
        else
            return -1;
        rest += 7;
        if (strcmp(rest, "weight") != 0 && strcmp(rest, "default.weight") != 0) return -1;
        *layer = (int)value, *kind = k, *is_B = b;
        return 0;
    }
    return -1;
}

static int load_pair(struct lq_adapter *adapter, const struct lq_safetensors *file,
                     const char *label, const struct peft_config *c, const char *names[2],
                     int layer, int kind, struct lq_error *err) {
    char module[128];
    module_name(layer, kind, module, sizeof module);
    if (!names[0] || !names[1])
        return lq_error_set(err, LQ_EFORMAT, "%s: %s has lora_%s but no lora_%s", label, module,
                            names[0] ? "A" : "B", names[0] ? "B" : "A");
    float *A = NULL, *B = NULL;
    const struct lq_safetensors_tensor *tA, *tB;
    int rc = lq_safetensors_read_f32(file, names[0], &A, &tA, err);
    if (!rc) rc = lq_safetensors_read_f32(file, names[1], &B, &tB, err);
    if (rc) goto fail;
    int expected = c->rank;
    double alpha = c->alpha;
    const cJSON *rank_item = c->rank_pattern ? pattern_lookup(c->rank_pattern, module) : NULL;
    const cJSON *alpha_item = c->alpha_pattern ? pattern_lookup(c->alpha_pattern, module) : NULL;
    if (cJSON_IsNumber(rank_item)) expected = (int)rank_item->valuedouble;
    if (cJSON_IsNumber(alpha_item)) alpha = alpha_item->valuedouble;
    if (tA->ndim != 2 || tB->ndim != 2) {
        rc = lq_error_set(err, LQ_EFORMAT, "%s: '%s' and '%s' must both be 2-D", label, names[0],
                          names[1]);
        goto fail;
    }
    if (tA->shape[0] != expected || tB->shape[1] != expected) {
        rc = lq_error_set(err, LQ_EFORMAT,
                          "%s: %s: lora_A is [%lld, %lld] and lora_B [%lld, %lld], expected rank "
                          "r = %d",
                          label, module, (long long)tA->shape[0], (long long)tA->shape[1],
                          (long long)tB->shape[0], (long long)tB->shape[1], expected);
        goto fail;
    }
    if (tA->shape[1] < 1 || tB->shape[0] < 1 || tA->shape[1] > INT32_MAX ||
        tB->shape[0] > INT32_MAX) {
        rc = lq_error_set(err, LQ_EFORMAT, "%s: %s: empty or oversized factors", label, module);
        goto fail;
    }
    size_t nA = tA->numel, nB = tB->numel;
    for (size_t i = 0; i < nA; i++)
        if (!isfinite(A[i])) {
            rc = lq_error_set(err, LQ_ENUMERIC, "%s: '%s' element %zu is %g", label, names[0], i,
                              (double)A[i]);
            goto fail;
        }
    for (size_t i = 0; i < nB; i++)
        if (!isfinite(B[i])) {
            rc = lq_error_set(err, LQ_ENUMERIC, "%s: '%s' element %zu is %g", label, names[1], i,
                              (double)B[i]);
            goto fail;
        }
    /* PEFT computes W + (alpha / r)·B·A (alpha / sqrt(r) with rsLoRA); lqd's pair has the
     * scaling folded into L1. lqd's own adapters have alpha = r: no multiplication at all,
     * so a saved adapter reads back bit for bit. */
    double scaling = c->rslora ? alpha / sqrt((double)expected) : alpha / (double)expected;
    if (scaling != 1.0)
        for (size_t i = 0; i < nB; i++) B[i] = (float)((double)B[i] * scaling);
    struct lq_adapter_matrix *m = lq_adapter_matrix(adapter, layer, (enum lq_linear_kind)kind);
    m->rank = expected;
    m->rows = (int)tB->shape[0];
    m->cols = (int)tA->shape[1];
    m->L1 = B;
    m->L2 = A;
    return LQ_OK;
fail:
    free(A);
    free(B);
    return rc;
}

static int load_weights(const char *dir, const struct peft_config *c, struct lq_adapter *header,
                        struct lq_adapter **out, struct lq_error *err) {
    char path[4096 + 64];
    snprintf(path, sizeof path, "%s/" WEIGHTS_FILE, dir);
    struct lq_safetensors *file;
    int rc = lq_safetensors_open(path, &file, err);
    if (rc) return rc;
    size_t count = lq_safetensors_count(file);
    int max_layer = -1;
    /* First pass: every name known, and the number of layers. */
    for (size_t i = 0; i < count; i++) {
        const struct lq_safetensors_tensor *t = lq_safetensors_tensor_at(file, i);
        int layer, kind, is_B;
        if (parse_tensor_name(t->name, &layer, &kind, &is_B) != 0) {
            rc = lq_error_set(err, LQ_EFORMAT,
                              "%s: unknown tensor '%.200s' (expected " PEFT_PREFIX
                              "model.layers.N.<module>.lora_A.weight / lora_B.weight)",
                              path, t->name);
            goto done;
        }
        if (layer > max_layer) max_layer = layer;
    }
    if (max_layer < 0) {
        rc = lq_error_set(err, LQ_EFORMAT, "%s: no LoRA tensors", path);
        goto done;
    }
    int n_layers = max_layer + 1;
    if (c->layers) {
        if (c->layers < n_layers) {
            rc = lq_error_set(err, LQ_EFORMAT, "%s: tensors for layer %d but lqd_layers is %d",
                              path, max_layer, c->layers);
            goto done;
        }
        n_layers = c->layers;
    }
    if ((rc = lq_adapter_create(n_layers, c->mode, out, err))) goto done;
    memcpy((*out)->base_model, header->base_model, sizeof header->base_model);
    memcpy((*out)->init, header->init, sizeof header->init);
    size_t n = (size_t)n_layers * LQ_LINEARS_PER_LAYER;
    const char **names = calloc(2 * n, sizeof *names);
    if (!names) {
        rc = lq_error_set(err, LQ_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    for (size_t i = 0; i < count; i++) {
        const struct lq_safetensors_tensor *t = lq_safetensors_tensor_at(file, i);
        int layer, kind, is_B;
        parse_tensor_name(t->name, &layer, &kind, &is_B);
        size_t slot = 2 * ((size_t)layer * LQ_LINEARS_PER_LAYER + (size_t)kind) + (size_t)is_B;
        if (names[slot]) { /* "lora_A.weight" and "lora_A.default.weight" both present */
            rc = lq_error_set(err, LQ_EFORMAT, "%s: '%.200s' duplicates '%.200s'", path, t->name,
                              names[slot]);
            break;
        }
        names[slot] = t->name;
    }
    for (int l = 0; l < n_layers && !rc; l++) {
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !rc; k++) {
            const char **pair = &names[2 * ((size_t)l * LQ_LINEARS_PER_LAYER + (size_t)k)];
            if (!pair[0] && !pair[1]) {
                if (c->mode == LQ_ADAPTER_REPLACE) {
                    char module[128];
                    module_name(l, k, module, sizeof module);
                    rc = lq_error_set(err, LQ_EFORMAT,
                                      "%s: a replace-mode adapter needs every linear; %s is "
                                      "missing",
                                      path, module);
                }
                continue;
            }
            rc = load_pair(*out, file, path, c, pair, l, k, err);
        }
    }
    free(names);
    if (rc) {
        lq_adapter_free(*out);
        *out = NULL;
    }
done:
    lq_safetensors_close(file);
    return rc;
}

int lq_adapter_load(const char *dir, struct lq_adapter **out, struct lq_error *err) {
    if (!dir || !out) return lq_error_set(err, LQ_EINVAL, "lq_adapter_load: NULL argument");
    *out = NULL;
    if (!lq_path_is_dir(dir))
        return lq_error_set(err, LQ_ENOTFOUND, "%s: not an adapter directory (no such directory)",
                            dir);
    char path[4096 + 64];
    snprintf(path, sizeof path, "%s/" CONFIG_FILE, dir);
    char *text;
    size_t length;
    int rc = lq_file_read_all(path, CONFIG_MAX_BYTES, &text, &length, err);
    if (rc) return rc;
    cJSON *root = lq_json_parse(text, length);
    free(text);
    if (!root) return lq_error_set(err, LQ_EFORMAT, "%s: not valid JSON", path);
    struct peft_config config;
    struct lq_adapter header;
    memset(&header, 0, sizeof header);
    rc = parse_config(root, path, &config, &header, err);
    if (!rc) rc = load_weights(dir, &config, &header, out, err);
    cJSON_Delete(root);
    return rc;
}

/* ---------- matching a model ---------- */

int lq_adapter_check(const struct lq_adapter *adapter, const struct lq_model *model,
                     struct lq_error *err) {
    if (!adapter || !model) return lq_error_set(err, LQ_EINVAL, "lq_adapter_check: NULL argument");
    const struct lq_model_config *c = &model->config;
    if (adapter->n_layers != c->n_layers)
        return lq_error_set(err, LQ_EINVAL, "adapter has %d layers, the model %d",
                            adapter->n_layers, c->n_layers);
    for (int l = 0; l < c->n_layers; l++) {
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_adapter_matrix *m = matrix_at(adapter, l, k);
            const struct lq_linear *linear = &model->layers[l].linear[k];
            char module[128];
            module_name(l, k, module, sizeof module);
            if (adapter->mode == LQ_ADAPTER_REPLACE) {
                if (!linear->is_lq)
                    return lq_error_set(err, LQ_EINVAL,
                                        "%s: a replace-mode adapter needs an LQ model, and this "
                                        "matrix is dense",
                                        module);
                if (m->rank != linear->rank)
                    return lq_error_set(err, LQ_EINVAL,
                                        "%s: adapter rank %d, the model's L1·L2 rank %d", module,
                                        m->rank, linear->rank);
            }
            if (m->rank == 0) continue;
            if (m->rows != linear->rows || m->cols != linear->cols)
                return lq_error_set(err, LQ_EINVAL,
                                    "%s: adapter pair is %d x %d, the matrix %d x %d", module,
                                    m->rows, m->cols, linear->rows, linear->cols);
        }
    }
    return LQ_OK;
}
