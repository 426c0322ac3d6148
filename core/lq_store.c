#include "lq_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int add_metadata(struct lq_safetensors_writer *writer, const char *prefix, const char *key,
                        const char *value, struct lq_error *err) {
    char name[512];
    snprintf(name, sizeof name, "%s.%s", prefix, key);
    return lq_safetensors_writer_set_metadata(writer, name, value, err);
}

static int add_tensor(struct lq_safetensors_writer *writer, const char *prefix, const char *suffix,
                      enum lq_dtype dtype, int ndim, const int64_t *shape, const void *data,
                      struct lq_error *err) {
    char name[512];
    snprintf(name, sizeof name, "%s.%s", prefix, suffix);
    return lq_safetensors_writer_add(writer, name, dtype, ndim, shape, data, err);
}

int lq_nf_matrix_store(struct lq_safetensors_writer *writer, const char *prefix,
                       const struct lq_nf_matrix *m, struct lq_error *err) {
    const struct lq_nf_config *c = &m->config;
    size_t numel = m->rows * m->cols;
    int64_t codes_shape[1] = {(int64_t)lq_nf_codes_bytes(m)};
    int64_t scales_shape[1] = {(int64_t)lq_nf_scale_codes_bytes(m)};
    int64_t groups_shape[1] = {(int64_t)lq_nf_group_count(numel, c)};
    int64_t one[1] = {1};
    enum lq_dtype group_dtype = c->b2 == LQ_SCALE_FP32   ? LQ_DTYPE_F32
                                : c->b2 == LQ_SCALE_FP16 ? LQ_DTYPE_F16
                                                         : LQ_DTYPE_BF16;
    char config[96], shape[64];
    snprintf(config, sizeof config, "%d,%d,%s,%d,%d", c->b0, c->b1, lq_scale_dtype_name(c->b2),
             c->B0, c->B1);
    snprintf(shape, sizeof shape, "%zu,%zu", m->rows, m->cols);
    int rc;
    if ((rc = add_tensor(writer, prefix, "q_codes", LQ_DTYPE_U8, 1, codes_shape, m->codes, err)) ||
        (rc = add_tensor(writer, prefix, "q_scale_codes", LQ_DTYPE_U8, 1, scales_shape,
                         m->scale_codes, err)) ||
        (rc = add_tensor(writer, prefix, "q_group_scales", group_dtype, 1, groups_shape,
                         m->group_scales, err)) ||
        (rc = add_tensor(writer, prefix, "q_scale_offset", LQ_DTYPE_F32, 1, one, &m->scale_offset,
                         err)) ||
        (rc = add_metadata(writer, prefix, "lq_config", config, err)) ||
        (rc = add_metadata(writer, prefix, "lq_shape", shape, err)))
        return rc;
    return LQ_OK;
}

int lq_decomposition_store(struct lq_safetensors_writer *writer, const char *prefix,
                           const struct lq_decomposition *d, struct lq_error *err) {
    int rc = lq_nf_matrix_store(writer, prefix, &d->Q, err);
    if (rc) return rc;
    char rank[32];
    snprintf(rank, sizeof rank, "%d", d->rank);
    if ((rc = add_metadata(writer, prefix, "lq_rank", rank, err))) return rc;
    if (d->rank == 0) return LQ_OK;
    int64_t a_shape[2] = {d->rank, (int64_t)d->cols}, b_shape[2] = {(int64_t)d->rows, d->rank};
    if ((rc = add_tensor(writer, prefix, "lora_A", LQ_DTYPE_F32, 2, a_shape, d->L2, err)) ||
        (rc = add_tensor(writer, prefix, "lora_B", LQ_DTYPE_F32, 2, b_shape, d->L1, err)))
        return rc;
    return LQ_OK;
}

/* Copies tensor P.suffix, which must be `dtype` with `bytes` bytes, into a new buffer. */
static int load_exact(const struct lq_safetensors *file, const char *prefix, const char *suffix,
                      enum lq_dtype dtype, size_t bytes, void **out, struct lq_error *err) {
    char name[512];
    snprintf(name, sizeof name, "%s.%s", prefix, suffix);
    const struct lq_safetensors_tensor *t = lq_safetensors_find(file, name);
    if (!t) return lq_error_set(err, LQ_ENOTFOUND, "missing tensor '%s'", name);
    if (t->dtype != dtype || t->nbytes != bytes)
        return lq_error_set(
            err, LQ_EFORMAT, "tensor '%s' is %s with %llu bytes, expected %s with %zu", name,
            lq_dtype_name(t->dtype), (unsigned long long)t->nbytes, lq_dtype_name(dtype), bytes);
    *out = malloc(bytes ? bytes : 1);
    if (!*out) return lq_error_set(err, LQ_ENOMEM, "out of memory for '%s'", name);
    memcpy(*out, lq_safetensors_data(file, t), bytes);
    lq_safetensors_drop_pages(file, t);
    return LQ_OK;
}

static const char *metadata_of(const struct lq_safetensors *file, const char *prefix,
                               const char *key) {
    char name[512];
    snprintf(name, sizeof name, "%s.%s", prefix, key);
    return lq_safetensors_metadata(file, name);
}

int lq_linear_load_lq(const struct lq_safetensors *file, const char *prefix,
                      struct lq_linear *linear, struct lq_error *err) {
    const char *config_text = metadata_of(file, prefix, "lq_config");
    const char *shape_text = metadata_of(file, prefix, "lq_shape");
    const char *rank_text = metadata_of(file, prefix, "lq_rank");
    if (!config_text || !shape_text || !rank_text)
        return lq_error_set(err, LQ_EFORMAT,
                            "LQ matrix '%s': metadata lq_config, lq_shape or lq_rank missing",
                            prefix);
    struct lq_nf_config c;
    int rc = lq_nf_config_parse(config_text, &c, err);
    if (rc) return lq_error_prefix(err, "LQ matrix '%s'", prefix);
    unsigned long rows, cols;
    long rank;
    char tail;
    if (sscanf(shape_text, "%lu,%lu%c", &rows, &cols, &tail) != 2 || rows == 0 || cols == 0 ||
        rows > (1ul << 24) || cols > (1ul << 24) || sscanf(rank_text, "%ld%c", &rank, &tail) != 1 ||
        rank < 0 || (unsigned long)rank > (rows < cols ? rows : cols))
        return lq_error_set(err, LQ_EFORMAT, "LQ matrix '%s': bad lq_shape '%s' or lq_rank '%s'",
                            prefix, shape_text, rank_text);
    if ((linear->rows && (unsigned long)linear->rows != rows) ||
        (linear->cols && (unsigned long)linear->cols != cols))
        return lq_error_set(err, LQ_EFORMAT,
                            "LQ matrix '%s' is %lu x %lu, the config needs %d x %d", prefix, rows,
                            cols, linear->rows, linear->cols);
    struct lq_nf_matrix *q = &linear->q;
    memset(q, 0, sizeof *q);
    q->config = c, q->rows = rows, q->cols = cols;
    enum lq_dtype scale_dtype = c.b2 == LQ_SCALE_FP32   ? LQ_DTYPE_F32
                                : c.b2 == LQ_SCALE_FP16 ? LQ_DTYPE_F16
                                                        : LQ_DTYPE_BF16;
    void *offset = NULL;
    if ((rc = load_exact(file, prefix, "q_codes", LQ_DTYPE_U8, lq_nf_codes_bytes(q),
                         (void **)&q->codes, err)) ||
        (rc = load_exact(file, prefix, "q_scale_codes", LQ_DTYPE_U8, lq_nf_scale_codes_bytes(q),
                         (void **)&q->scale_codes, err)) ||
        (rc = load_exact(file, prefix, "q_group_scales", scale_dtype, lq_nf_group_scales_bytes(q),
                         (void **)&q->group_scales, err)) ||
        (rc =
             load_exact(file, prefix, "q_scale_offset", LQ_DTYPE_F32, sizeof(float), &offset, err)))
        goto fail;
    memcpy(&q->scale_offset, offset, sizeof(float));
    free(offset);
    linear->rows = (int)rows, linear->cols = (int)cols, linear->rank = (int)rank, linear->is_lq = 1;
    if (rank > 0 &&
        ((rc = load_exact(file, prefix, "lora_A", LQ_DTYPE_F32, (size_t)rank * cols * sizeof(float),
                          (void **)&linear->lora_A, err)) ||
         (rc = load_exact(file, prefix, "lora_B", LQ_DTYPE_F32, rows * (size_t)rank * sizeof(float),
                          (void **)&linear->lora_B, err))))
        goto fail;
    return LQ_OK;
fail:
    lq_nf_matrix_free(q);
    free(linear->lora_A), free(linear->lora_B);
    linear->lora_A = linear->lora_B = NULL;
    linear->is_lq = 0;
    return rc;
}
