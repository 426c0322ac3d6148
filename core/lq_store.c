#include "lq_store.h"

#include <stdio.h>

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
