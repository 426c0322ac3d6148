/* Loading llama.cpp GGUF files as lqd models: llama.* hyperparameters and llama.cpp's tensor
 * names mapped to the HF layout, every tensor dequantized to float32, and the Q/K row
 * permutation of llama.cpp's converter undone. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/gguf.h"
#include "core/model_internal.h"

int lq_model_is_gguf(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    char magic[4];
    int is_gguf = fread(magic, 1, 4, f) == 4 && memcmp(magic, "GGUF", 4) == 0;
    fclose(f);
    return is_gguf;
}

/* A llama.* integer key in [min, max]; absent: fallback, or an error when required. */
static int int_key(const struct lq_gguf *g, const char *path, const char *key, int required,
                   int64_t min, int64_t max, int64_t fallback, int *out, struct lq_error *err) {
    int64_t value;
    int rc = lq_gguf_get_i64(g, key, &value, err);
    if (rc == LQ_ENOTFOUND) {
        if (required) return lq_error_set(err, LQ_EFORMAT, "%s: missing key '%s'", path, key);
        value = fallback;
    } else if (rc) {
        return rc; /* the reader's message names the file and the key */
    }
    if (value < min || value > max)
        return lq_error_set(err, LQ_EFORMAT, "%s: '%s' is %lld, expected %lld..%lld", path, key,
                            (long long)value, (long long)min, (long long)max);
    *out = (int)value;
    return LQ_OK;
}

static int float_key(const struct lq_gguf *g, const char *path, const char *key, int required,
                     float fallback, float *out, struct lq_error *err) {
    int rc = lq_gguf_get_f32(g, key, out, err);
    if (rc == LQ_ENOTFOUND) {
        if (required) return lq_error_set(err, LQ_EFORMAT, "%s: missing key '%s'", path, key);
        *out = fallback;
    } else if (rc) {
        return rc; /* the reader's message names the file and the key */
    }
    if (!(isfinite(*out) && *out > 0))
        return lq_error_set(err, LQ_EFORMAT, "%s: '%s' must be a positive number", path, key);
    return LQ_OK;
}

/* Reads tensor `name` as float; its HF shape is [d0] or [d0, d1] (d1 = 0: 1-D), which ggml
 * stores as dims {d0} or {d1, d0} (dims[0] is the row length). */
static int read_tensor(const struct lq_gguf *g, const char *path, const char *name, int d0, int d1,
                       float **out, struct lq_error *err) {
    const struct lq_gguf_tensor *t = lq_gguf_find_tensor(g, name);
    if (!t) return lq_error_set(err, LQ_ENOTFOUND, "%s: missing tensor '%s'", path, name);
    int ok = d1 ? t->n_dims == 2 && t->dims[0] == (uint64_t)d1 && t->dims[1] == (uint64_t)d0
                : t->n_dims == 1 && t->dims[0] == (uint64_t)d0;
    if (!ok) {
        char have[128] = "", need[64];
        for (int i = 0; i < t->n_dims; i++) {
            size_t used = strlen(have);
            snprintf(have + used, sizeof have - used, "%s%llu", i ? ", " : "",
                     (unsigned long long)t->dims[i]);
        }
        if (d1)
            snprintf(need, sizeof need, "{%d, %d}", d1, d0);
        else
            snprintf(need, sizeof need, "{%d}", d0);
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: tensor '%s' has dims {%s} (ggml order) but the model needs %s",
                            path, name, have, need);
    }
    float *data = malloc((size_t)t->numel * sizeof(float));
    if (!data) return lq_error_set(err, LQ_ENOMEM, "out of memory reading '%s'", name);
    int rc = lq_gguf_tensor_to_f32(g, t, data, err);
    if (rc) {
        free(data);
        return rc; /* names the file, the tensor and its type */
    }
    *out = data;
    return LQ_OK;
}

static int read_config(const struct lq_gguf *g, const char *path, struct lq_model_config *c,
                       struct lq_error *err) {
    const char *arch;
    int rc = lq_gguf_get_string(g, "general.architecture", &arch, NULL, err);
    if (rc == LQ_ENOTFOUND)
        return lq_error_set(err, LQ_EFORMAT, "%s: missing key 'general.architecture'", path);
    if (rc) return rc;
    if (strcmp(arch, "llama") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: general.architecture \"%s\" is not supported (llama)", path, arch);
    const char *scaling;
    if (lq_gguf_get_string(g, "llama.rope.scaling.type", &scaling, NULL, NULL) == 0 &&
        strcmp(scaling, "none") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: llama.rope.scaling.type \"%s\" is not supported", path, scaling);
    memset(c, 0, sizeof *c);
    int rope_dims = 0;
    if ((rc = int_key(g, path, "llama.embedding_length", 1, 1, 1 << 20, 0, &c->dim, err)) ||
        (rc = int_key(g, path, "llama.block_count", 1, 1, 4096, 0, &c->n_layers, err)) ||
        (rc = int_key(g, path, "llama.attention.head_count", 1, 1, 65536, 0, &c->n_heads, err)) ||
        (rc = int_key(g, path, "llama.attention.head_count_kv", 0, 1, 65536, c->n_heads,
                      &c->n_kv_heads, err)) ||
        (rc = int_key(g, path, "llama.attention.key_length", 0, 1, 65536, c->dim / c->n_heads,
                      &c->head_dim, err)) ||
        (rc = int_key(g, path, "llama.feed_forward_length", 1, 1, 1 << 24, 0, &c->hidden_dim,
                      err)) ||
        (rc = int_key(g, path, "llama.context_length", 1, 1, 1 << 24, 0, &c->max_seq_len, err)) ||
        (rc = int_key(g, path, "llama.rope.dimension_count", 0, 1, 65536, c->head_dim, &rope_dims,
                      err)) ||
        (rc = float_key(g, path, "llama.rope.freq_base", 0, 10000.0f, &c->rope_theta, err)) ||
        (rc =
             float_key(g, path, "llama.attention.layer_norm_rms_epsilon", 1, 0, &c->norm_eps, err)))
        return rc;
    if (c->n_heads % c->n_kv_heads)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: head_count %d is not a multiple of head_count_kv %d", path,
                            c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2)
        return lq_error_set(err, LQ_EFORMAT, "%s: head dimension %d must be even for RoPE", path,
                            c->head_dim);
    if (rope_dims != c->head_dim)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: llama.rope.dimension_count %d differs from the head dimension %d "
                            "(partial RoPE is not supported)",
                            path, rope_dims, c->head_dim);
    /* The vocabulary: the tokenizer's token list, else the embedding's rows. */
    const struct lq_gguf_tensor *embed = lq_gguf_find_tensor(g, "token_embd.weight");
    if (!embed)
        return lq_error_set(err, LQ_ENOTFOUND, "%s: missing tensor 'token_embd.weight'", path);
    size_t tokens;
    rc = lq_gguf_get_string_array(g, "tokenizer.ggml.tokens", NULL, NULL, &tokens, err);
    if (rc == LQ_ENOTFOUND)
        tokens = embed->n_dims == 2 ? (size_t)embed->dims[1] : 0;
    else if (rc)
        return rc;
    if (tokens < 1 || tokens > (1 << 24))
        return lq_error_set(err, LQ_EFORMAT, "%s: vocabulary of %zu tokens", path, tokens);
    c->vocab_size = (int)tokens;
    c->bos_id = c->eos_id = -1;
    if ((rc = int_key(g, path, "tokenizer.ggml.bos_token_id", 0, -1, c->vocab_size - 1, -1,
                      &c->bos_id, err)) ||
        (rc = int_key(g, path, "tokenizer.ggml.eos_token_id", 0, -1, c->vocab_size - 1, -1,
                      &c->eos_id, err)))
        return rc;
    c->tie_embeddings = lq_gguf_find_tensor(g, "output.weight") == NULL;
    return LQ_OK;
}

/* llama.cpp's tensor names of a layer's linear matrices, in enum lq_linear_kind order. */
static const char *const linear_names[LQ_LINEARS_PER_LAYER] = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};

/* convert_hf_to_gguf moves Q/K rows from HF's rotate-half layout to interleaved pairs; this
 * moves them back (lq_model_rope_rows_to_hf is exactly that inverse, per head). */
static int unpermute(struct lq_linear *lin, int heads, int head_dim, struct lq_error *err) {
    size_t n = (size_t)lin->rows * lin->cols;
    float *hf = malloc(n * sizeof(float));
    if (!hf) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    lq_model_rope_rows_to_hf(lin->dense, hf, heads, head_dim, lin->cols);
    free(lin->dense);
    lin->dense = hf;
    return LQ_OK;
}

int lq_model_load_gguf(const char *path, struct lq_model *m, struct lq_error *err) {
    struct lq_gguf *g;
    int rc = lq_gguf_open(path, &g, err);
    if (rc) return rc;
    struct lq_model_config *c = &m->config;
    if ((rc = read_config(g, path, c, err))) goto done;
    if (!(m->layers = calloc((size_t)c->n_layers, sizeof *m->layers))) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
        goto done;
    }
    if ((rc = read_tensor(g, path, "token_embd.weight", c->vocab_size, c->dim, &m->embed, err)) ||
        (rc = read_tensor(g, path, "output_norm.weight", c->dim, 0, &m->final_norm, err)))
        goto done;
    if (c->tie_embeddings)
        m->lm_head = m->embed;
    else if ((rc = read_tensor(g, path, "output.weight", c->vocab_size, c->dim, &m->lm_head, err)))
        goto done;
    for (int l = 0; l < c->n_layers && !rc; l++) {
        struct lq_layer *layer = &m->layers[l];
        char name[128];
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        if ((rc = read_tensor(g, path, name, c->dim, 0, &layer->attn_norm, err))) break;
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        if ((rc = read_tensor(g, path, name, c->dim, 0, &layer->ffn_norm, err))) break;
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !rc; k++) {
            struct lq_linear *lin = &layer->linear[k];
            lq_model_linear_shape(c, (enum lq_linear_kind)k, &lin->rows, &lin->cols);
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, linear_names[k]);
            rc = read_tensor(g, path, name, lin->rows, lin->cols, &lin->dense, err);
            if (!rc && (k == LQ_Q_PROJ || k == LQ_K_PROJ))
                rc = unpermute(lin, k == LQ_Q_PROJ ? c->n_heads : c->n_kv_heads, c->head_dim, err);
        }
    }
done:
    lq_gguf_close(g);
    return rc;
}
