#include "core/file_util.h"
#include "core/model.h"
#include "core/safetensors.h"
#include "tests/unit/lq_test.h"

#include <stdlib.h>
#include <unistd.h>

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

static int same(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

/* The llama2.c .bin and the HF checkpoint hold the same stories260K weights: after the RoPE
 * row permutation every tensor must be identical. */
static void test_llama2c_equals_hf(void) {
    char bin[1024], hf[1024];
    snprintf(bin, sizeof bin, "%s/models/stories260K/stories260K.bin", root());
    snprintf(hf, sizeof hf, "%s/models/stories260K-hf", root());
    struct lq_model *a = NULL, *b = NULL;
    struct lq_error err = {0};
    int rc = lq_model_load(bin, &a, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    rc = lq_model_load(hf, &b, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (!a || !b) return;
    const struct lq_model_config *c = &b->config;
    CHECK(c->dim == 64 && c->n_layers == 5 && c->n_heads == 8 && c->n_kv_heads == 4);
    CHECK(c->hidden_dim == 172 && c->vocab_size == 512 && c->tie_embeddings && c->head_dim == 8);
    CHECK(a->config.dim == 64 && a->config.hidden_dim == 172 && a->config.tie_embeddings);
    CHECK(same(a->embed, b->embed, 512 * 64));
    CHECK(same(a->final_norm, b->final_norm, 64));
    CHECK(a->lm_head == a->embed && b->lm_head == b->embed);
    for (int l = 0; l < 5; l++) {
        CHECK(same(a->layers[l].attn_norm, b->layers[l].attn_norm, 64));
        CHECK(same(a->layers[l].ffn_norm, b->layers[l].ffn_norm, 64));
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_linear *x = &a->layers[l].linear[k], *y = &b->layers[l].linear[k];
            CHECK(x->rows == y->rows && x->cols == y->cols && !x->is_lq && !y->is_lq);
            CHECK_MSG(same(x->dense, y->dense, (size_t)x->rows * x->cols), "layer %d %s", l,
                      lq_linear_kind_name((enum lq_linear_kind)k));
        }
    }
    CHECK(lq_model_linear_params(c) == 5 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172));
    lq_model_free(a);
    lq_model_free(b);
}

static void test_config_errors(void) {
    struct lq_model_config c;
    struct lq_error err = {0};
    const char *gpt2 = "{\"model_type\": \"gpt2\", \"hidden_size\": 8}";
    CHECK(lq_model_config_parse(gpt2, strlen(gpt2), "config.json", &c, &err) == LQ_EUNSUPPORTED);
    CHECK(strstr(err.message, "gpt2") != NULL);
    const char *missing = "{\"model_type\": \"llama\", \"hidden_size\": 8}";
    CHECK(lq_model_config_parse(missing, strlen(missing), "config.json", &c, &err) == LQ_EFORMAT);
    CHECK(strstr(err.message, "num_hidden_layers") != NULL);
    const char *bad_heads =
        "{\"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 8,"
        "\"num_key_value_heads\": 3, \"intermediate_size\": 100, \"vocab_size\": 10}";
    CHECK(lq_model_config_parse(bad_heads, strlen(bad_heads), "config.json", &c, &err) ==
          LQ_EFORMAT);
    CHECK(lq_model_config_parse("{", 1, "config.json", &c, &err) == LQ_EFORMAT);
    struct lq_model *m;
    CHECK(lq_model_load("/nonexistent/model", &m, &err) == LQ_ENOTFOUND);
}

/* The HF checkpoint split into two shards with model.safetensors.index.json loads the same. */
static void test_sharded_checkpoint(void) {
    char source[1024], dir[] = "/tmp/lq-test-shards-XXXXXX", path[1200];
    snprintf(source, sizeof source, "%s/models/stories260K-hf", root());
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/model.safetensors", source);
    struct lq_safetensors *file;
    struct lq_error err = {0};
    CHECK(lq_safetensors_open(path, &file, &err) == 0);
    struct lq_safetensors_writer *shards[2];
    CHECK(lq_safetensors_writer_create(&shards[0], &err) == 0);
    CHECK(lq_safetensors_writer_create(&shards[1], &err) == 0);
    char index[16384] = "{\"metadata\": {}, \"weight_map\": {";
    for (size_t i = 0; i < lq_safetensors_count(file); i++) {
        const struct lq_safetensors_tensor *t = lq_safetensors_tensor_at(file, i);
        int shard = i % 2;
        CHECK(lq_safetensors_writer_add(shards[shard], t->name, t->dtype, t->ndim, t->shape,
                                        lq_safetensors_data(file, t), &err) == 0);
        size_t used = strlen(index);
        snprintf(index + used, sizeof index - used,
                 "%s\"%s\": \"model-0000%d-of-00002.safetensors\"", i ? ", " : "", t->name,
                 shard + 1);
    }
    strcat(index, "}}");
    for (int k = 0; k < 2; k++) {
        snprintf(path, sizeof path, "%s/model-0000%d-of-00002.safetensors", dir, k + 1);
        CHECK(lq_safetensors_writer_write(shards[k], path, &err) == 0);
        lq_safetensors_writer_free(shards[k]);
    }
    lq_safetensors_close(file);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    CHECK(lq_file_write_atomic(path, index, strlen(index), &err) == 0);
    char config_src[1200], config_dst[1200];
    snprintf(config_src, sizeof config_src, "%s/config.json", source);
    snprintf(config_dst, sizeof config_dst, "%s/config.json", dir);
    CHECK(lq_file_copy(config_src, config_dst, &err) == 0);

    struct lq_model *a = NULL, *b = NULL;
    CHECK_MSG(lq_model_load(source, &a, &err) == 0, "%s", err.message);
    CHECK_MSG(lq_model_load(dir, &b, &err) == 0, "%s", err.message);
    if (a && b) {
        CHECK(same(a->embed, b->embed, 512 * 64));
        for (int l = 0; l < 5; l++)
            for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++)
                CHECK(same(a->layers[l].linear[k].dense, b->layers[l].linear[k].dense,
                           (size_t)a->layers[l].linear[k].rows * a->layers[l].linear[k].cols));
    }
    lq_model_free(a);
    lq_model_free(b);
    /* a shard that is missing is named in the error */
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    unlink(path);
    CHECK(lq_model_load(dir, &b, &err) != 0);
    CHECK(strstr(err.message, "model-00002-of-00002") != NULL);
    snprintf(path, sizeof path, "rm -rf '%s'", dir);
    CHECK(system(path) == 0);
}

/* A llama2.c checkpoint with a separate classifier (negative vocab_size in the header). */
static void test_llama2c_separate_classifier(void) {
    char bin[1024];
    snprintf(bin, sizeof bin, "%s/models/stories260K/stories260K.bin", root());
    char *data;
    size_t length;
    struct lq_error err = {0};
    CHECK(lq_file_read_all(bin, 1 << 24, &data, &length, &err) == 0);
    int32_t header[7];
    memcpy(header, data, sizeof header);
    size_t classifier = (size_t)header[5] * header[0];
    header[5] = -header[5];
    char *copy = malloc(length + classifier * sizeof(float));
    memcpy(copy, data, length);
    memcpy(copy, header, sizeof header);
    float *wcls = (float *)(copy + length); /* classifier = 2 x embedding */
    memcpy(wcls, data + sizeof header, classifier * sizeof(float));
    for (size_t i = 0; i < classifier; i++) wcls[i] *= 2.0f;
    char path[] = "/tmp/lq-test-cls-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0 && write(fd, copy, length + classifier * sizeof(float)) ==
                         (ssize_t)(length + classifier * sizeof(float)));
    close(fd);
    struct lq_model *m = NULL;
    CHECK_MSG(lq_model_load(path, &m, &err) == 0, "%s", err.message);
    if (m) {
        CHECK(!m->config.tie_embeddings && m->lm_head != m->embed);
        CHECK(m->lm_head[5] == 2.0f * m->embed[5]);
        lq_model_free(m);
    }
    /* cut short: refused with the sizes */
    CHECK(truncate(path, (off_t)length) == 0);
    CHECK(lq_model_load(path, &m, &err) == LQ_EFORMAT);
    CHECK(strstr(err.message, "needs") != NULL);
    unlink(path);
    free(copy);
    free(data);
}

/* lq_model_reader (an lqd compress rank reading only its matrices) gives every linear matrix
 * bit for bit as lq_model_load does, from the HF directory (tensor by tensor) and the llama2.c
 * .bin (loaded whole); it refuses an LQ model's matrices and a matrix out of range. */
static void test_reader_equals_load(void) {
    const char *paths[] = {"models/stories260K-hf", "models/stories260K/stories260K.bin"};
    for (int p = 0; p < 2; p++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", root(), paths[p]);
        struct lq_model *m = NULL;
        struct lq_model_reader *r = NULL;
        struct lq_error err = {0};
        CHECK_MSG(lq_model_load(path, &m, &err) == 0, "%s", err.message);
        CHECK_MSG(lq_model_reader_open(path, &r, &err) == 0, "%s", err.message);
        if (!m || !r) {
            lq_model_free(m);
            lq_model_reader_close(r);
            continue;
        }
        CHECK(lq_model_reader_config(r)->n_layers == m->config.n_layers);
        for (int l = 0; l < m->config.n_layers; l++)
            for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
                const struct lq_linear *linear = &m->layers[l].linear[k];
                float *w = NULL;
                int rows = 0, cols = 0;
                CHECK_MSG(lq_model_reader_linear(r, l, (enum lq_linear_kind)k, &w, &rows, &cols,
                                                 &err) == 0,
                          "%s", err.message);
                CHECK(w && rows == linear->rows && cols == linear->cols &&
                      same(w, linear->dense, (size_t)rows * (size_t)cols));
                free(w);
            }
        float *w = NULL;
        int rows, cols;
        CHECK(lq_model_reader_linear(r, m->config.n_layers, LQ_Q_PROJ, &w, &rows, &cols, &err) ==
              LQ_EINVAL);
        lq_model_reader_close(r);
        lq_model_free(m);
    }
    char lq[1024];
    snprintf(lq, sizeof lq, "%s/models/stories260K-lq", root());
    struct lq_model_reader *r = NULL;
    struct lq_error err = {0};
    if (lq_path_is_dir(lq) && lq_model_reader_open(lq, &r, &err) == 0) {
        float *w = NULL;
        int rows, cols;
        CHECK(lq_model_reader_linear(r, 0, LQ_Q_PROJ, &w, &rows, &cols, &err) == LQ_ENOTFOUND);
        CHECK(strstr(err.message, "cannot be compressed again") != NULL);
        lq_model_reader_close(r);
    }
}

LQ_TEST_MAIN(LQ_TEST(test_llama2c_equals_hf), LQ_TEST(test_config_errors),
             LQ_TEST(test_sharded_checkpoint), LQ_TEST(test_llama2c_separate_classifier),
             LQ_TEST(test_reader_equals_load))
