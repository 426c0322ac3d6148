/* Loading models: HuggingFace checkpoint directories (one safetensors file or shards), LQ
 * model directories (the same layout with LQ-packed linear matrices) and llama2.c .bin files. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file_util.h"
#include "core/lq_store.h"
#include "core/model.h"
#include "core/model_internal.h"
#include "core/safetensors.h"

#define MAX_SHARDS 512

/* The checkpoint's safetensors files, opened. */
struct checkpoint {
    struct lq_safetensors *files[MAX_SHARDS];
    char *names[MAX_SHARDS];
    int count;
};

static void checkpoint_close(struct checkpoint *c) {
    for (int i = 0; i < c->count; i++) lq_safetensors_close(c->files[i]), free(c->names[i]);
    c->count = 0;
}

static int checkpoint_add(struct checkpoint *c, const char *dir, const char *name,
                          struct lq_error *err) {
    for (int i = 0; i < c->count; i++)
        if (strcmp(c->names[i], name) == 0) return LQ_OK;
    if (c->count == MAX_SHARDS)
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: more than %d shards", dir, MAX_SHARDS);
    if (strchr(name, '/') || strcmp(name, "..") == 0)
        return lq_error_set(err, LQ_EFORMAT, "%s: shard name '%s' is not a plain file name", dir,
                            name);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int rc = lq_safetensors_open(path, &c->files[c->count], err);
    if (rc) return rc;
    c->names[c->count++] = strdup(name);
    return LQ_OK;
}

static int checkpoint_open(const char *dir, struct checkpoint *c, struct lq_error *err) {
    memset(c, 0, sizeof *c);
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (lq_path_is_file(path)) return checkpoint_add(c, dir, "model.safetensors", err);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (!lq_path_is_file(path))
        return lq_error_set(err, LQ_ENOTFOUND,
                            "%s: neither model.safetensors nor model.safetensors.index.json", dir);
    char *text;
    size_t length;
    int rc = lq_file_read_all(path, 64 << 20, &text, &length, err);
    if (rc) return rc;
    cJSON *root = lq_json_parse(text, length);
    free(text);
    const cJSON *map = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    if (!cJSON_IsObject(map)) {
        cJSON_Delete(root);
        return lq_error_set(err, LQ_EFORMAT, "%s: no \"weight_map\" object", path);
    }
    const cJSON *entry;
    cJSON_ArrayForEach(entry, map) {
        if (!cJSON_IsString(entry)) {
            rc = lq_error_set(err, LQ_EFORMAT, "%s: weight_map[\"%s\"] is not a file name", path,
                              entry->string);
            break;
        }
        if ((rc = checkpoint_add(c, dir, entry->valuestring, err))) break;
    }
    cJSON_Delete(root);
    if (rc) checkpoint_close(c);
    return rc;
}

static struct lq_safetensors *checkpoint_find(const struct checkpoint *c, const char *name) {
    for (int i = 0; i < c->count; i++)
        if (lq_safetensors_find(c->files[i], name)) return c->files[i];
    return NULL;
}

/* Reads tensor `name` as float and checks its shape is [d0] or [d0, d1] (d1 = 0: 1-D). */
static int read_tensor(const struct checkpoint *c, const char *dir, const char *name, int d0,
                       int d1, float **out, struct lq_error *err) {
    struct lq_safetensors *file = checkpoint_find(c, name);
    if (!file) return lq_error_set(err, LQ_ENOTFOUND, "%s: missing tensor '%s'", dir, name);
    const struct lq_safetensors_tensor *t = lq_safetensors_find(file, name);
    int ok = d1 ? t->ndim == 2 && t->shape[0] == d0 && t->shape[1] == d1
                : t->ndim == 1 && t->shape[0] == d0;
    if (!ok) {
        char expected[64];
        if (d1)
            snprintf(expected, sizeof expected, "[%d, %d]", d0, d1);
        else
            snprintf(expected, sizeof expected, "[%d]", d0);
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: tensor '%s' has shape [%lld%s%lld] but the config needs %s", dir,
                            name, (long long)t->shape[0], t->ndim > 1 ? ", " : "",
                            t->ndim > 1 ? (long long)t->shape[1] : 0LL, expected);
    }
    return lq_safetensors_read_f32(file, name, out, NULL, err);
}

void lq_model_linear_shape(const struct lq_model_config *c, enum lq_linear_kind kind, int *rows,
                           int *cols) {
    int q = c->n_heads * c->head_dim, kv = c->n_kv_heads * c->head_dim;
    switch (kind) {
    case LQ_Q_PROJ:
        *rows = q, *cols = c->dim;
        break;
    case LQ_K_PROJ:
    case LQ_V_PROJ:
        *rows = kv, *cols = c->dim;
        break;
    case LQ_O_PROJ:
        *rows = c->dim, *cols = q;
        break;
    case LQ_GATE_PROJ:
    case LQ_UP_PROJ:
        *rows = c->hidden_dim, *cols = c->dim;
        break;
    default:
        *rows = c->dim, *cols = c->hidden_dim;
        break;
    }
}

static int load_linear(const struct checkpoint *c, const char *dir, int layer,
                       enum lq_linear_kind kind, const struct lq_model_config *config,
                       struct lq_linear *linear, struct lq_error *err) {
    char name[256];
    lq_model_linear_name(layer, kind, name, sizeof name);
    lq_model_linear_shape(config, kind, &linear->rows, &linear->cols);
    if (checkpoint_find(c, name))
        return read_tensor(c, dir, name, linear->rows, linear->cols, &linear->dense, err);
    /* An LQ matrix: "<prefix>.q_codes" etc., prefix = the name without ".weight". */
    name[strlen(name) - strlen(".weight")] = '\0';
    char codes[300];
    snprintf(codes, sizeof codes, "%s.q_codes", name);
    struct lq_safetensors *file = checkpoint_find(c, codes);
    if (!file) return lq_error_set(err, LQ_ENOTFOUND, "%s: missing tensor '%s.weight'", dir, name);
    int rc = lq_linear_load_lq(file, name, linear, err);
    if (rc) return lq_error_prefix(err, "%s", dir);
    return LQ_OK;
}

static int load_hf_dir(const char *dir, struct lq_model *m, struct lq_error *err) {
    int rc = lq_model_config_load(dir, &m->config, err);
    if (rc) return rc;
    struct checkpoint c;
    if ((rc = checkpoint_open(dir, &c, err))) return rc;
    const struct lq_model_config *cfg = &m->config;
    m->layers = calloc((size_t)cfg->n_layers, sizeof *m->layers);
    if (!m->layers) {
        checkpoint_close(&c);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    if ((rc = read_tensor(&c, dir, "model.embed_tokens.weight", cfg->vocab_size, cfg->dim,
                          &m->embed, err)) ||
        (rc = read_tensor(&c, dir, "model.norm.weight", cfg->dim, 0, &m->final_norm, err)))
        goto done;
    if (cfg->tie_embeddings || !checkpoint_find(&c, "lm_head.weight")) {
        if (!cfg->tie_embeddings) {
            rc = lq_error_set(err, LQ_ENOTFOUND, "%s: missing tensor 'lm_head.weight'", dir);
            goto done;
        }
        m->lm_head = m->embed;
    } else if ((rc = read_tensor(&c, dir, "lm_head.weight", cfg->vocab_size, cfg->dim, &m->lm_head,
                                 err))) {
        goto done;
    }
    for (int l = 0; l < cfg->n_layers && !rc; l++) {
        char name[256];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        if ((rc = read_tensor(&c, dir, name, cfg->dim, 0, &m->layers[l].attn_norm, err))) break;
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        if ((rc = read_tensor(&c, dir, name, cfg->dim, 0, &m->layers[l].ffn_norm, err))) break;
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !rc; k++) {
            rc = load_linear(&c, dir, l, (enum lq_linear_kind)k, cfg, &m->layers[l].linear[k], err);
            m->is_lq |= m->layers[l].linear[k].is_lq;
        }
    }
done:
    checkpoint_close(&c);
    return rc;
}

/* ---------- llama2.c checkpoints ---------- */

/* llama2.c keeps Meta's interleaved RoPE pairs; HF permutes the rows of wq/wk so that pairs
 * are (i, i + head_dim/2). Row r = h*hd + 2i + j (Meta) moves to h*hd + j*hd/2 + i (HF). */
void lq_model_rope_rows_to_hf(const float *meta, float *hf, int heads, int head_dim, int cols) {
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < head_dim / 2; i++)
            for (int j = 0; j < 2; j++) {
                const float *src = meta + ((size_t)h * head_dim + 2 * i + j) * cols;
                float *dst = hf + ((size_t)h * head_dim + (size_t)j * head_dim / 2 + i) * cols;
                memcpy(dst, src, (size_t)cols * sizeof(float));
            }
}

static int load_llama2c(const char *path, struct lq_model *m, struct lq_error *err) {
    char *data;
    size_t length;
    int rc = lq_file_read_all(path, (size_t)1 << 36, &data, &length, err);
    if (rc) return rc;
    int32_t header[7];
    if (length < sizeof header) {
        free(data);
        return lq_error_set(err, LQ_EFORMAT, "%s: too short for a llama2.c header", path);
    }
    memcpy(header, data, sizeof header);
    int dim = header[0], hidden = header[1], layers = header[2], heads = header[3],
        kv_heads = header[4], vocab = header[5], seq_len = header[6];
    int shared = vocab > 0;
    if (vocab < 0) vocab = -vocab;
    if (dim <= 0 || hidden <= 0 || layers <= 0 || heads <= 0 || kv_heads <= 0 || vocab <= 0 ||
        seq_len <= 0 || dim % heads || heads % kv_heads || (dim / heads) % 2 || dim > (1 << 16) ||
        hidden > (1 << 18) || layers > 1024 || vocab > (1 << 20) || seq_len > (1 << 20)) {
        free(data);
        return lq_error_set(
            err, LQ_EFORMAT, "%s: implausible llama2.c header (%d %d %d %d %d %d %d)", path,
            header[0], header[1], header[2], header[3], header[4], header[5], header[6]);
    }
    int hd = dim / heads, kv = kv_heads * hd;
    m->config = (struct lq_model_config){dim,     layers,   heads, kv_heads, hd, hidden, vocab,
                                         seq_len, 10000.0f, 1e-5f, shared,   1,  2};
    size_t L = (size_t)layers, D = (size_t)dim, H = (size_t)hidden, V = (size_t)vocab;
    size_t floats = V * D + L * D + L * D * D + 2 * L * D * kv + L * D * D + L * D + 2 * L * H * D +
                    L * D * H + D + (size_t)seq_len * hd + (shared ? 0 : V * D);
    if (length - sizeof header < floats * sizeof(float)) {
        free(data);
        return lq_error_set(err, LQ_EFORMAT, "%s: %zu bytes of weights, the header needs %zu", path,
                            length - sizeof header, floats * sizeof(float));
    }
    const char *cursor = data + sizeof header;
#define TAKE(count)                                                                                \
    (cursor += (count) * sizeof(float), (const float *)(cursor - (count) * sizeof(float)))
    /* The file is read whole; weights are copied out (unaligned-safe) into owned arrays. */
    m->layers = calloc(L, sizeof *m->layers);
    float *scratch = malloc(D * D * sizeof(float) > H * D * sizeof(float) ? D * D * sizeof(float)
                                                                          : H * D * sizeof(float));
    if (!m->layers || !scratch) {
        free(data), free(scratch);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    const float *embed = TAKE(V * D), *rms_att = TAKE(L * D), *wq = TAKE(L * D * D),
                *wk = TAKE(L * D * kv), *wv = TAKE(L * D * kv), *wo = TAKE(L * D * D),
                *rms_ffn = TAKE(L * D), *w1 = TAKE(L * H * D), *w2 = TAKE(L * D * H),
                *w3 = TAKE(L * H * D), *rms_final = TAKE(D);
    TAKE((size_t)seq_len * hd); /* the precomputed RoPE table of old checkpoints: unused */
    const float *wcls = shared ? embed : TAKE(V * D);
#undef TAKE
#define COPY(dst, src, count)                                                                      \
    (((dst) = malloc((count) * sizeof(float)))                                                     \
         ? (memcpy((dst), (src), (count) * sizeof(float)), 0)                                      \
         : 1)
    int oom = COPY(m->embed, embed, V * D) | COPY(m->final_norm, rms_final, D);
    if (shared)
        m->lm_head = m->embed;
    else
        oom |= COPY(m->lm_head, wcls, V * D);
    for (size_t l = 0; l < L && !oom; l++) {
        struct lq_layer *layer = &m->layers[l];
        oom |=
            COPY(layer->attn_norm, rms_att + l * D, D) | COPY(layer->ffn_norm, rms_ffn + l * D, D);
        const float *sources[LQ_LINEARS_PER_LAYER] = {
            wq + l * D * D, wk + l * D * kv, wv + l * D * kv, wo + l * D * D,
            w1 + l * H * D, w3 + l * H * D,  w2 + l * D * H};
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !oom; k++) {
            struct lq_linear *lin = &layer->linear[k];
            lq_model_linear_shape(&m->config, (enum lq_linear_kind)k, &lin->rows, &lin->cols);
            size_t n = (size_t)lin->rows * lin->cols;
            oom |= COPY(lin->dense, sources[k], n);
            if (oom) break;
            if (k == LQ_Q_PROJ || k == LQ_K_PROJ) {
                memcpy(scratch, lin->dense, n * sizeof(float));
                lq_model_rope_rows_to_hf(scratch, lin->dense, k == LQ_Q_PROJ ? heads : kv_heads, hd,
                                         lin->cols);
            }
        }
    }
#undef COPY
    free(scratch);
    free(data);
    if (oom) return lq_error_set(err, LQ_ENOMEM, "out of memory loading %s", path);
    return LQ_OK;
}

int lq_model_load(const char *path, struct lq_model **out, struct lq_error *err) {
    *out = NULL;
    struct lq_model *m = calloc(1, sizeof *m);
    if (!m) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    int rc;
    if (lq_path_is_dir(path))
        rc = load_hf_dir(path, m, err);
    else if (lq_model_is_gguf(path))
        rc = lq_model_load_gguf(path, m, err);
    else if (lq_path_is_file(path))
        rc = load_llama2c(path, m, err);
    else
        rc = lq_error_set(err, LQ_ENOTFOUND, "%s: no such file or directory", path);
    if (!rc && !(m->path = strdup(path))) rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    if (rc) {
        lq_model_free(m);
        return rc;
    }
    *out = m;
    return LQ_OK;
}

void lq_linear_free(struct lq_linear *linear) {
    free(linear->dense);
    lq_nf_matrix_free(&linear->q);
    free(linear->lora_A);
    free(linear->lora_B);
    linear->dense = linear->lora_A = linear->lora_B = NULL;
}

void lq_model_free(struct lq_model *m) {
    if (!m) return;
    if (m->layers) {
        for (int l = 0; l < m->config.n_layers; l++) {
            free(m->layers[l].attn_norm);
            free(m->layers[l].ffn_norm);
            for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) lq_linear_free(&m->layers[l].linear[k]);
        }
        free(m->layers);
    }
    if (m->lm_head != m->embed) free(m->lm_head);
    free(m->embed);
    free(m->final_norm);
    free(m->path);
    free(m);
}

/* ---------- one matrix at a time ---------- */

struct lq_model_reader {
    char *path;
    struct lq_model_config config;
    struct checkpoint checkpoint; /* a HuggingFace directory */
    struct lq_model *whole;       /* any other format, loaded on open */
};

int lq_model_reader_open(const char *path, struct lq_model_reader **out, struct lq_error *err) {
    *out = NULL;
    struct lq_model_reader *r = calloc(1, sizeof *r);
    if (!r || !(r->path = strdup(path))) {
        free(r);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    int rc;
    if (lq_path_is_dir(path)) {
        if (!(rc = lq_model_config_load(path, &r->config, err)))
            rc = checkpoint_open(path, &r->checkpoint, err);
    } else if (!(rc = lq_model_load(path, &r->whole, err))) {
        r->config = r->whole->config;
    }
    if (rc) {
        lq_model_reader_close(r);
        return rc;
    }
    *out = r;
    return LQ_OK;
}

const struct lq_model_config *lq_model_reader_config(const struct lq_model_reader *reader) {
    return &reader->config;
}

int lq_model_reader_linear(struct lq_model_reader *r, int layer, enum lq_linear_kind kind,
                           float **out, int *rows, int *cols, struct lq_error *err) {
    *out = NULL;
    char name[256];
    lq_model_linear_name(layer, kind, name, sizeof name);
    if (layer < 0 || layer >= r->config.n_layers || (int)kind < 0 ||
        (int)kind >= LQ_LINEARS_PER_LAYER)
        return lq_error_set(err, LQ_EINVAL, "%s: no matrix %s", r->path, name);
    if (r->whole) {
        const struct lq_linear *linear = &r->whole->layers[layer].linear[kind];
        if (!linear->dense)
            return lq_error_set(err, LQ_EINVAL, "%s: %s is already LQ-compressed", r->path, name);
        size_t count = (size_t)linear->rows * (size_t)linear->cols;
        if (!(*out = malloc(count * sizeof **out)))
            return lq_error_set(err, LQ_ENOMEM, "out of memory");
        memcpy(*out, linear->dense, count * sizeof **out);
        *rows = linear->rows, *cols = linear->cols;
        return LQ_OK;
    }
    lq_model_linear_shape(&r->config, kind, rows, cols);
    if (!checkpoint_find(&r->checkpoint, name))
        return lq_error_set(err, LQ_ENOTFOUND,
                            "%s: no dense tensor '%s' (an LQ model cannot be compressed again)",
                            r->path, name);
    return read_tensor(&r->checkpoint, r->path, name, *rows, *cols, out, err);
}

void lq_model_reader_close(struct lq_model_reader *r) {
    if (!r) return;
    checkpoint_close(&r->checkpoint);
    lq_model_free(r->whole);
    free(r->path);
    free(r);
}
