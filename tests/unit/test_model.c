#include "core/model.h"
#include "tests/unit/lq_test.h"

#include <stdlib.h>

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

LQ_TEST_MAIN(LQ_TEST(test_llama2c_equals_hf), LQ_TEST(test_config_errors))
