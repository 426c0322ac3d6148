/* core/adapter.h: PEFT-layout adapters. A saved adapter reads back bit for bit, its file is
 * PEFT's naming and orientation as the safetensors parser sees it, PEFT's own files (alpha
 * other than r, F16/BF16, rank patterns) load with the scaling folded into L1, and every
 * malformed directory is refused with a message naming the problem. */
#define _GNU_SOURCE
#include "core/adapter.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/file_util.h"
#include "core/half.h"
#include "core/safetensors.h"
#include "lq_test.h"

static const char *repo_root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

static char work[256];

static const char *work_path(const char *name) {
    static char path[4][512];
    static int next;
    char *p = path[next++ % 4];
    snprintf(p, 512, "%s/%s", work, name);
    return p;
}

static uint64_t state = 0x9e3779b97f4a7c15ull;
static float random_float(void) {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (float)((double)(state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static void fill_pair(struct lq_adapter_matrix *m, int rows, int cols, int rank) {
    m->rows = rows, m->cols = cols, m->rank = rank;
    m->L1 = malloc(sizeof(float) * (size_t)rows * (size_t)rank);
    m->L2 = malloc(sizeof(float) * (size_t)rank * (size_t)cols);
    for (int i = 0; i < rows * rank; i++) m->L1[i] = random_float();
    for (int i = 0; i < rank * cols; i++) m->L2[i] = random_float() * 1e-3f;
}

/* stories260K's shapes: dim 64, 4 KV heads of 8 (k/v 32 x 64), hidden 172. */
static void linear_shape(int kind, int *rows, int *cols) {
    static const int shapes[LQ_LINEARS_PER_LAYER][2] = {{64, 64},  {32, 64},  {32, 64}, {64, 64},
                                                        {172, 64}, {172, 64}, {64, 172}};
    *rows = shapes[kind][0], *cols = shapes[kind][1];
}

static struct lq_adapter *stories_adapter(enum lq_adapter_mode mode, int rank) {
    struct lq_adapter *a = NULL;
    CHECK_OK(lq_adapter_create(5, mode, &a, NULL));
    for (int l = 0; l < 5; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            int rows, cols;
            linear_shape(k, &rows, &cols);
            fill_pair(lq_adapter_matrix(a, l, (enum lq_linear_kind)k), rows, cols, rank);
        }
    snprintf(a->base_model, sizeof a->base_model, "models/stories260K-lq");
    return a;
}

static int same_matrix(const struct lq_adapter_matrix *x, const struct lq_adapter_matrix *y) {
    if (x->rank != y->rank) return 0;
    if (x->rank == 0) return 1;
    return x->rows == y->rows && x->cols == y->cols &&
           memcmp(x->L1, y->L1, sizeof(float) * (size_t)x->rows * (size_t)x->rank) == 0 &&
           memcmp(x->L2, y->L2, sizeof(float) * (size_t)x->rank * (size_t)x->cols) == 0;
}

static void test_create_and_accessor(void) {
    struct lq_adapter *a = NULL;
    CHECK_OK(lq_adapter_create(3, LQ_ADAPTER_ADD, &a, NULL));
    CHECK(a && a->n_layers == 3 && a->mode == LQ_ADAPTER_ADD);
    CHECK(lq_adapter_matrix(a, 2, LQ_DOWN_PROJ) == &a->matrices[2 * 7 + 6]);
    CHECK(lq_adapter_matrix(a, 3, LQ_Q_PROJ) == NULL);
    CHECK(lq_adapter_matrix(a, -1, LQ_Q_PROJ) == NULL);
    CHECK(lq_adapter_matrix(a, 0, LQ_LINEARS_PER_LAYER) == NULL);
    CHECK(lq_adapter_matrix(a, 1, LQ_UP_PROJ)->rank == 0);
    CHECK(strcmp(lq_adapter_mode_name(LQ_ADAPTER_REPLACE), "replace") == 0);
    CHECK(strcmp(lq_adapter_mode_name(LQ_ADAPTER_ADD), "add") == 0);
    lq_adapter_free(a);
    struct lq_error err = {0};
    CHECK(lq_adapter_create(0, LQ_ADAPTER_ADD, &a, &err) == LQ_EINVAL && a == NULL);
    lq_adapter_free(NULL);
}

static void test_round_trip_bit_identical(void) {
    struct lq_adapter *a = stories_adapter(LQ_ADAPTER_REPLACE, 8);
    snprintf(a->init, sizeof a->init, "lq");
    struct lq_error err = {0};
    int rc = lq_adapter_save(a, work_path("replace"), 0, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    struct lq_adapter *b = NULL;
    rc = lq_adapter_load(work_path("replace"), &b, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (b) {
        CHECK(b->mode == LQ_ADAPTER_REPLACE && b->n_layers == 5);
        CHECK(strcmp(b->init, "lq") == 0);
        CHECK(strcmp(b->base_model, "models/stories260K-lq") == 0);
        for (int i = 0; i < 5 * LQ_LINEARS_PER_LAYER; i++)
            CHECK_MSG(same_matrix(&a->matrices[i], &b->matrices[i]), "matrix %d", i);
    }
    lq_adapter_free(b);
    /* Saving again over it is refused without replace, and accepted with it. */
    CHECK(lq_adapter_save(a, work_path("replace"), 0, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "already exists") != NULL);
    a->matrices[3].L1[0] = 42.0f;
    CHECK_OK(lq_adapter_save(a, work_path("replace"), 1, NULL));
    CHECK_OK(lq_adapter_load(work_path("replace"), &b, NULL));
    if (b) CHECK(b->matrices[3].L1[0] == 42.0f);
    lq_adapter_free(b);
    /* No temporary or old directories are left beside it. */
    char command[600];
    snprintf(command, sizeof command, "ls %s | grep -c -e '.tmp-' -e '.old-' >/dev/null", work);
    CHECK(system(command) != 0);
    lq_adapter_free(a);

    /* ADD mode, some matrices absent, including the whole last layer: still round trips. */
    struct lq_adapter *add = NULL;
    CHECK_OK(lq_adapter_create(5, LQ_ADAPTER_ADD, &add, NULL));
    fill_pair(lq_adapter_matrix(add, 0, LQ_Q_PROJ), 64, 64, 4);
    fill_pair(lq_adapter_matrix(add, 2, LQ_V_PROJ), 32, 64, 4);
    fill_pair(lq_adapter_matrix(add, 3, LQ_DOWN_PROJ), 64, 172, 2); /* a rank_pattern entry */
    rc = lq_adapter_save(add, work_path("add"), 0, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    rc = lq_adapter_load(work_path("add"), &b, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (b) {
        CHECK(b->mode == LQ_ADAPTER_ADD && b->n_layers == 5 && strcmp(b->init, "zero") == 0);
        for (int i = 0; i < 5 * LQ_LINEARS_PER_LAYER; i++)
            CHECK_MSG(same_matrix(&add->matrices[i], &b->matrices[i]), "matrix %d", i);
    }
    lq_adapter_free(b);
    lq_adapter_free(add);
}

/* 1 when dir_a/name and dir_b/name hold the same bytes. */
static int same_file(const char *dir_a, const char *dir_b, const char *name) {
    char path_a[600], path_b[600];
    snprintf(path_a, sizeof path_a, "%s/%s", dir_a, name);
    snprintf(path_b, sizeof path_b, "%s/%s", dir_b, name);
    char *a = NULL, *b = NULL;
    size_t length_a = 0, length_b = 0;
    int same = lq_file_read_all(path_a, (size_t)1 << 30, &a, &length_a, NULL) == 0 &&
               lq_file_read_all(path_b, (size_t)1 << 30, &b, &length_b, NULL) == 0 &&
               length_a == length_b && memcmp(a, b, length_a) == 0;
    free(a);
    free(b);
    return same;
}

/* save -> load -> save writes the same bytes: loading loses nothing the file holds (mode,
 * init, base model, absent matrices, every float bit), for both modes. */
static void test_save_load_save_same_bytes(void) {
    struct lq_adapter *replace = stories_adapter(LQ_ADAPTER_REPLACE, 8);
    snprintf(replace->init, sizeof replace->init, "lq");
    replace->matrices[5].L1[3] = -0.0f; /* signed zero and a subnormal keep their bits */
    replace->matrices[6].L2[1] = 1e-40f;
    struct lq_adapter *add = NULL;
    CHECK_OK(lq_adapter_create(5, LQ_ADAPTER_ADD, &add, NULL));
    fill_pair(lq_adapter_matrix(add, 1, LQ_K_PROJ), 32, 64, 4);
    fill_pair(lq_adapter_matrix(add, 4, LQ_GATE_PROJ), 172, 64, 4);
    snprintf(add->init, sizeof add->init, "zero");
    struct lq_adapter *cases[2] = {replace, add};
    for (int i = 0; i < 2; i++) {
        char first[300], second[300];
        snprintf(first, sizeof first, "%s", work_path(i ? "bytes-add-1" : "bytes-replace-1"));
        snprintf(second, sizeof second, "%s", work_path(i ? "bytes-add-2" : "bytes-replace-2"));
        struct lq_error err = {0};
        struct lq_adapter *back = NULL;
        int rc = lq_adapter_save(cases[i], first, 0, &err);
        if (!rc) rc = lq_adapter_load(first, &back, &err);
        if (!rc) rc = lq_adapter_save(back, second, 0, &err);
        CHECK_MSG(rc == 0, "%s", err.message);
        CHECK_MSG(same_file(first, second, "adapter_model.safetensors"),
                  "%s: adapter_model.safetensors differs after a reload", second);
        CHECK_MSG(same_file(first, second, "adapter_config.json"),
                  "%s: adapter_config.json differs after a reload", second);
        lq_adapter_free(back);
    }
    lq_adapter_free(replace);
    lq_adapter_free(add);
}

static void test_peft_names_and_shapes(void) {
    struct lq_adapter *a = stories_adapter(LQ_ADAPTER_REPLACE, 8);
    CHECK_OK(lq_adapter_save(a, work_path("names"), 0, NULL));
    struct lq_safetensors *file = NULL;
    char path[600];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", work_path("names"));
    CHECK_OK(lq_safetensors_open(path, &file, NULL));
    if (file) {
        CHECK(lq_safetensors_count(file) == 5 * 7 * 2);
        const struct lq_safetensors_tensor *t = lq_safetensors_find(
            file, "base_model.model.model.layers.4.mlp.gate_proj.lora_A.weight");
        CHECK(t && t->dtype == LQ_DTYPE_F32 && t->ndim == 2 && t->shape[0] == 8 &&
              t->shape[1] == 64);
        t = lq_safetensors_find(file,
                                "base_model.model.model.layers.4.mlp.gate_proj.lora_B.weight");
        CHECK(t && t->ndim == 2 && t->shape[0] == 172 && t->shape[1] == 8);
        t = lq_safetensors_find(file,
                                "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight");
        CHECK(t && t->shape[0] == 32 && t->shape[1] == 8);
        /* lora_B is L1 and lora_A is L2, values as given. */
        float *B = NULL;
        CHECK_OK(lq_safetensors_read_f32(
            file, "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight", &B, NULL, NULL));
        struct lq_adapter_matrix *m = lq_adapter_matrix(a, 2, LQ_DOWN_PROJ);
        if (B) CHECK(memcmp(B, m->L1, sizeof(float) * 64 * 8) == 0);
        free(B);
        CHECK(lq_safetensors_metadata(file, "format") &&
              strcmp(lq_safetensors_metadata(file, "format"), "pt") == 0);
        lq_safetensors_close(file);
    }
    snprintf(path, sizeof path, "%s/adapter_config.json", work_path("names"));
    char *text = NULL;
    size_t length;
    CHECK_OK(lq_file_read_all(path, 1 << 20, &text, &length, NULL));
    if (text) {
        CHECK(strstr(text, "\"peft_type\":\t\"LORA\"") != NULL);
        CHECK(strstr(text, "\"r\":\t8") != NULL);
        CHECK(strstr(text, "\"lora_alpha\":\t8") != NULL);
        CHECK(strstr(text, "\"lqd_mode\":\t\"replace\"") != NULL);
        CHECK(strstr(text, "\"q_proj\"") && strstr(text, "\"down_proj\""));
        CHECK(strstr(text, "\"base_model_name_or_path\":\t\"models/stories260K-lq\""));
    }
    free(text);
    lq_adapter_free(a);
}

/* Writes a hand-made PEFT directory: config text + the given tensors. */
struct tensor_spec {
    const char *name;
    enum lq_dtype dtype;
    int64_t rows, cols;
    const float *values;
};

static void write_peft(const char *dir, const char *config, const struct tensor_spec *tensors,
                       int count) {
    mkdir(dir, 0755);
    char path[600];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    if (config) CHECK_OK(lq_file_write_atomic(path, config, strlen(config), NULL));
    struct lq_safetensors_writer *w = NULL;
    CHECK_OK(lq_safetensors_writer_create(&w, NULL));
    for (int i = 0; i < count; i++) {
        size_t n = (size_t)(tensors[i].rows * tensors[i].cols);
        uint16_t *half = malloc(2 * n + 2);
        const void *data = tensors[i].values;
        if (tensors[i].dtype != LQ_DTYPE_F32) {
            for (size_t j = 0; j < n; j++)
                half[j] = tensors[i].dtype == LQ_DTYPE_BF16
                              ? lq_float_to_bf16(tensors[i].values[j])
                              : lq_float_to_fp16(tensors[i].values[j]);
            data = half;
        }
        int64_t shape[2] = {tensors[i].rows, tensors[i].cols};
        CHECK_OK(
            lq_safetensors_writer_add(w, tensors[i].name, tensors[i].dtype, 2, shape, data, NULL));
        free(half);
    }
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    CHECK_OK(lq_safetensors_writer_write(w, path, NULL));
    lq_safetensors_writer_free(w);
}

#define QA "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
#define QB "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
#define VA "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
#define VB "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

static float ones_A[4 * 64], values_B[64 * 4], values_VB[32 * 4];

static void test_peft_scaling_and_dtypes(void) {
    /* PEFT defaults: alpha 16, r 4 => scaling 4, folded into L1 (lora_B). */
    const char *config = "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 16, "
                         "\"target_modules\": [\"q_proj\", \"v_proj\"], "
                         "\"base_model_name_or_path\": \"meta-llama/Llama-2-7b-hf\"}";
    struct tensor_spec tensors[] = {{QA, LQ_DTYPE_BF16, 4, 64, ones_A},
                                    {QB, LQ_DTYPE_F16, 64, 4, values_B},
                                    {VA, LQ_DTYPE_F32, 4, 64, ones_A},
                                    {VB, LQ_DTYPE_F32, 32, 4, values_VB}};
    write_peft(work_path("peft"), config, tensors, 4);
    struct lq_adapter *a = NULL;
    struct lq_error err = {0};
    int rc = lq_adapter_load(work_path("peft"), &a, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (!a) return;
    CHECK(a->mode == LQ_ADAPTER_ADD && a->n_layers == 2);
    CHECK(strcmp(a->base_model, "meta-llama/Llama-2-7b-hf") == 0);
    struct lq_adapter_matrix *q = lq_adapter_matrix(a, 0, LQ_Q_PROJ);
    CHECK(q->rank == 4 && q->rows == 64 && q->cols == 64);
    for (int i = 0; i < 64 * 4; i++) CHECK(q->L1[i] == values_B[i] * 4.0f);
    for (int i = 0; i < 4 * 64; i++) CHECK(q->L2[i] == 0.5f);
    struct lq_adapter_matrix *v = lq_adapter_matrix(a, 1, LQ_V_PROJ);
    CHECK(v->rank == 4 && v->rows == 32 && v->L1[5] == 4.0f);
    CHECK(lq_adapter_matrix(a, 0, LQ_K_PROJ)->rank == 0);
    CHECK(lq_adapter_matrix(a, 1, LQ_Q_PROJ)->rank == 0);
    lq_adapter_free(a);

    /* rsLoRA: scaling alpha / sqrt(r) = 16 / 2 = 8; rank_pattern gives v_proj rank 2. */
    const char *rs =
        "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 16, \"use_rslora\": true, "
        "\"rank_pattern\": {\"v_proj\": 2}, \"alpha_pattern\": {\"v_proj\": 2}}";
    struct tensor_spec rs_tensors[] = {{QA, LQ_DTYPE_F32, 4, 64, ones_A},
                                       {QB, LQ_DTYPE_F32, 64, 4, values_B},
                                       {VA, LQ_DTYPE_F32, 2, 64, ones_A},
                                       {VB, LQ_DTYPE_F32, 32, 2, values_VB}};
    write_peft(work_path("rslora"), rs, rs_tensors, 4);
    rc = lq_adapter_load(work_path("rslora"), &a, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (a) {
        CHECK(lq_adapter_matrix(a, 0, LQ_Q_PROJ)->L1[1] == 0.25f * 8.0f);
        struct lq_adapter_matrix *v2 = lq_adapter_matrix(a, 1, LQ_V_PROJ);
        CHECK(v2->rank == 2);
        CHECK_NEAR(v2->L1[0], 2.0 / sqrt(2.0), 1e-6);
    }
    lq_adapter_free(a);
}

static void expect_load_error(const char *dir, int code, const char *needle) {
    struct lq_adapter *a = (struct lq_adapter *)&a;
    struct lq_error err = {0};
    int rc = lq_adapter_load(dir, &a, &err);
    CHECK_MSG(rc == code, "%s: rc %d, expected %d (%s)", dir, rc, code, err.message);
    CHECK_MSG(strstr(err.message, needle) != NULL, "%s: message '%s' lacks '%s'", dir, err.message,
              needle);
    CHECK(a == NULL);
}

static void test_load_errors(void) {
    const char *good = "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 4}";
    struct tensor_spec pair[] = {{QA, LQ_DTYPE_F32, 4, 64, ones_A},
                                 {QB, LQ_DTYPE_F32, 64, 4, values_B}};
    /* Missing directory, missing config, missing weights. */
    expect_load_error(work_path("no-such-adapter"), LQ_ENOTFOUND, "no-such-adapter");
    mkdir(work_path("empty"), 0755);
    expect_load_error(work_path("empty"), LQ_EIO, "adapter_config.json");
    mkdir(work_path("no-weights"), 0755);
    char path[600];
    snprintf(path, sizeof path, "%s/adapter_config.json", work_path("no-weights"));
    CHECK_OK(lq_file_write_atomic(path, good, strlen(good), NULL));
    expect_load_error(work_path("no-weights"), LQ_EIO, "adapter_model.safetensors");
    /* Bad JSON, wrong peft_type, bad r. */
    write_peft(work_path("bad-json"), "{\"peft_type\": \"LORA\", \"r\": 4,", pair, 2);
    expect_load_error(work_path("bad-json"), LQ_EFORMAT, "not valid JSON");
    write_peft(work_path("ia3"), "{\"peft_type\": \"IA3\", \"r\": 4}", pair, 2);
    expect_load_error(work_path("ia3"), LQ_EUNSUPPORTED, "IA3");
    write_peft(work_path("no-r"), "{\"peft_type\": \"LORA\"}", pair, 2);
    expect_load_error(work_path("no-r"), LQ_EFORMAT, "r must be");
    write_peft(work_path("dora"), "{\"peft_type\": \"LORA\", \"r\": 4, \"use_dora\": true}", pair,
               2);
    expect_load_error(work_path("dora"), LQ_EUNSUPPORTED, "use_dora");
    write_peft(work_path("bad-mode"), "{\"peft_type\": \"LORA\", \"r\": 4, \"lqd_mode\": \"x\"}",
               pair, 2);
    expect_load_error(work_path("bad-mode"), LQ_EFORMAT, "lqd_mode");
    /* Unknown tensors: an embedding adapter, a bias, a layer-less name. */
    struct tensor_spec unknown[] = {
        {QA, LQ_DTYPE_F32, 4, 64, ones_A},
        {QB, LQ_DTYPE_F32, 64, 4, values_B},
        {"base_model.model.model.embed_tokens.lora_embedding_A", LQ_DTYPE_F32, 4, 64, ones_A}};
    write_peft(work_path("unknown"), good, unknown, 3);
    expect_load_error(work_path("unknown"), LQ_EFORMAT, "lora_embedding_A");
    struct tensor_spec bias[] = {
        {"base_model.model.model.layers.0.self_attn.q_proj.bias", LQ_DTYPE_F32, 1, 64, ones_A}};
    write_peft(work_path("bias"), good, bias, 1);
    expect_load_error(work_path("bias"), LQ_EFORMAT, "q_proj.bias");
    /* Rank disagreeing with r, factors disagreeing with each other, half a pair. */
    write_peft(work_path("rank"), "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 8}", pair,
               2);
    expect_load_error(work_path("rank"), LQ_EFORMAT, "r = 8");
    struct tensor_spec mismatch[] = {{QA, LQ_DTYPE_F32, 4, 64, ones_A},
                                     {QB, LQ_DTYPE_F32, 64, 2, values_B}};
    write_peft(work_path("mismatch"), good, mismatch, 2);
    expect_load_error(work_path("mismatch"), LQ_EFORMAT, "lora_B [64, 2]");
    write_peft(work_path("half"), good, pair, 1);
    expect_load_error(work_path("half"), LQ_EFORMAT, "no lora_B");
    /* A replace-mode adapter must cover every linear. */
    write_peft(work_path("partial-replace"),
               "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 4, \"lqd_mode\": \"replace\"}",
               pair, 2);
    expect_load_error(work_path("partial-replace"), LQ_EFORMAT, "k_proj is missing");
    /* NaN and infinity. */
    static float poisoned[64 * 4];
    memcpy(poisoned, values_B, sizeof poisoned);
    poisoned[17] = NAN;
    struct tensor_spec nan_pair[] = {{QA, LQ_DTYPE_F32, 4, 64, ones_A},
                                     {QB, LQ_DTYPE_F32, 64, 4, poisoned}};
    write_peft(work_path("nan"), good, nan_pair, 2);
    expect_load_error(work_path("nan"), LQ_ENUMERIC, "element 17");
    /* A truncated weights file. */
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", work_path("half"));
    CHECK(truncate(path, 100) == 0);
    expect_load_error(work_path("half"), LQ_EFORMAT, "adapter_model.safetensors");
}

static void test_save_errors(void) {
    struct lq_adapter *a = NULL;
    struct lq_error err = {0};
    CHECK_OK(lq_adapter_create(2, LQ_ADAPTER_ADD, &a, NULL));
    CHECK(lq_adapter_save(a, work_path("nothing"), 0, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "no adapted matrices") != NULL);
    fill_pair(lq_adapter_matrix(a, 1, LQ_UP_PROJ), 172, 64, 4);
    lq_adapter_matrix(a, 1, LQ_UP_PROJ)->L2[3] = INFINITY;
    CHECK(lq_adapter_save(a, work_path("inf"), 0, &err) == LQ_ENUMERIC);
    CHECK(strstr(err.message, "mlp.up_proj") != NULL);
    CHECK(!lq_path_is_dir(work_path("inf")));
    lq_adapter_matrix(a, 1, LQ_UP_PROJ)->L2[3] = 0.0f;
    CHECK(lq_adapter_save(a, "/nonexistent-dir/adapter", 0, &err) ==
          LQ_EINVAL); /* bad argument, as for models */
    /* An existing directory that is not an adapter is never replaced. */
    mkdir(work_path("precious"), 0755);
    char path[600];
    snprintf(path, sizeof path, "%s/keep.txt", work_path("precious"));
    CHECK_OK(lq_file_write_atomic(path, "x", 1, NULL));
    CHECK(lq_adapter_save(a, work_path("precious"), 1, &err) == LQ_EINVAL);
    CHECK(lq_path_is_file(path));
    lq_adapter_free(a);
}

static void test_check_against_model(void) {
    char model_dir[512];
    snprintf(model_dir, sizeof model_dir, "%s/models/stories260K-lq", repo_root());
    struct lq_model *model = NULL;
    struct lq_error err = {0};
    int rc = lq_model_load(model_dir, &model, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    if (!model) return;
    int rank = model->layers[0].linear[0].rank;
    CHECK(rank == 8);
    struct lq_adapter *a = stories_adapter(LQ_ADAPTER_REPLACE, rank);
    rc = lq_adapter_check(a, model, &err);
    CHECK_MSG(rc == 0, "%s", err.message);
    /* Wrong rank in REPLACE mode. */
    struct lq_adapter *wrong = stories_adapter(LQ_ADAPTER_REPLACE, 4);
    CHECK(lq_adapter_check(wrong, model, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "rank 4") != NULL);
    /* The same pairs in ADD mode fit (any rank adds). */
    wrong->mode = LQ_ADAPTER_ADD;
    CHECK_OK(lq_adapter_check(wrong, model, NULL));
    /* A transposed pair. */
    struct lq_adapter_matrix *m = lq_adapter_matrix(wrong, 2, LQ_DOWN_PROJ);
    int t = m->rows;
    m->rows = m->cols, m->cols = t;
    CHECK(lq_adapter_check(wrong, model, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "model.layers.2.mlp.down_proj") != NULL);
    lq_adapter_free(wrong);
    /* Layers disagree. */
    struct lq_adapter *short_adapter = NULL;
    CHECK_OK(lq_adapter_create(4, LQ_ADAPTER_ADD, &short_adapter, NULL));
    CHECK(lq_adapter_check(short_adapter, model, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "4 layers") != NULL);
    lq_adapter_free(short_adapter);
    /* A REPLACE adapter on the dense model is refused; ADD on it is fine. */
    struct lq_model *dense = NULL;
    snprintf(model_dir, sizeof model_dir, "%s/models/stories260K-hf", repo_root());
    CHECK_OK(lq_model_load(model_dir, &dense, NULL));
    if (dense) {
        CHECK(lq_adapter_check(a, dense, &err) == LQ_EINVAL);
        CHECK(strstr(err.message, "dense") != NULL);
        a->mode = LQ_ADAPTER_ADD;
        CHECK_OK(lq_adapter_check(a, dense, NULL));
        lq_model_free(dense);
    }
    /* The model's own L1, L2 saved as an adapter load back and fit it. */
    struct lq_adapter *own = NULL;
    CHECK_OK(lq_adapter_create(model->config.n_layers, LQ_ADAPTER_REPLACE, &own, NULL));
    for (int l = 0; l < model->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_linear *linear = &model->layers[l].linear[k];
            struct lq_adapter_matrix *p = lq_adapter_matrix(own, l, (enum lq_linear_kind)k);
            p->rank = linear->rank, p->rows = linear->rows, p->cols = linear->cols;
            p->L1 = malloc(sizeof(float) * (size_t)linear->rows * (size_t)linear->rank);
            p->L2 = malloc(sizeof(float) * (size_t)linear->rank * (size_t)linear->cols);
            memcpy(p->L1, linear->lora_B,
                   sizeof(float) * (size_t)linear->rows * (size_t)linear->rank);
            memcpy(p->L2, linear->lora_A,
                   sizeof(float) * (size_t)linear->rank * (size_t)linear->cols);
        }
    CHECK_OK(lq_adapter_save(own, work_path("own"), 0, NULL));
    struct lq_adapter *back = NULL;
    CHECK_OK(lq_adapter_load(work_path("own"), &back, NULL));
    if (back) {
        CHECK_OK(lq_adapter_check(back, model, NULL));
        const struct lq_linear *linear = &model->layers[4].linear[LQ_UP_PROJ];
        CHECK(memcmp(lq_adapter_matrix(back, 4, LQ_UP_PROJ)->L1, linear->lora_B,
                     sizeof(float) * (size_t)linear->rows * (size_t)linear->rank) == 0);
    }
    lq_adapter_free(back);
    lq_adapter_free(own);
    lq_adapter_free(a);
    lq_model_free(model);
}

static void setup(void) {
    for (int i = 0; i < 4 * 64; i++) ones_A[i] = 0.5f;
    for (int i = 0; i < 64 * 4; i++) values_B[i] = (float)(i % 7) * 0.25f; /* exact in F16/BF16 */
    for (int i = 0; i < 32 * 4; i++) values_VB[i] = 1.0f;
    snprintf(work, sizeof work, "%s/lq_test_adapter_XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(work)) {
        perror("mkdtemp");
        exit(1);
    }
}

static void cleanup(void) {
    char command[600];
    snprintf(command, sizeof command, "rm -rf '%s'", work);
    if (system(command) != 0) fprintf(stderr, "could not remove %s\n", work);
}

int main(int argc, char **argv) {
    static const struct lq_test_case cases[] = {
        LQ_TEST(test_create_and_accessor),   LQ_TEST(test_round_trip_bit_identical),
        LQ_TEST(test_peft_names_and_shapes), LQ_TEST(test_peft_scaling_and_dtypes),
        LQ_TEST(test_load_errors),           LQ_TEST(test_save_errors),
        LQ_TEST(test_check_against_model),   LQ_TEST(test_save_load_save_same_bytes),
    };
    setup();
    int rc = lq_test_run(cases, sizeof cases / sizeof cases[0], argc, argv);
    cleanup();
    return rc;
}
