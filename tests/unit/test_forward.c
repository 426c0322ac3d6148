#include "core/file_util.h"
#include "core/forward.h"
#include "tests/unit/lq_test.h"

#include <cjson/cJSON.h>
#include <stdlib.h>

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

/* ref_logits.json's greedy ids and HF transformers' float32 logits for them ([200, 512]). */
static int load_reference(int **ids, int *count, float **logits) {
    char path[1024];
    char *text;
    size_t length;
    snprintf(path, sizeof path, "%s/models/stories260K-hf/ref_logits.json", root());
    if (lq_file_read_all(path, 1 << 20, &text, &length, NULL)) return -1;
    cJSON *json = lq_json_parse(text, length);
    free(text);
    cJSON *array = cJSON_GetObjectItem(cJSON_GetObjectItem(json, "greedy200"), "ids");
    *count = cJSON_GetArraySize(array);
    *ids = malloc((size_t)*count * sizeof **ids);
    for (int i = 0; i < *count; i++) (*ids)[i] = cJSON_GetArrayItem(array, i)->valueint;
    cJSON_Delete(json);
    snprintf(path, sizeof path, "%s/models/stories260K-hf/ref_logits_greedy200.npy", root());
    if (lq_file_read_all(path, 1 << 22, &text, &length, NULL)) return -1;
    /* .npy v1: magic, version, 2-byte header length, header, data */
    size_t header = (unsigned char)text[8] | (size_t)(unsigned char)text[9] << 8;
    size_t offset = 10 + header, values = (length - offset) / 4;
    *logits = malloc(values * sizeof(float));
    memcpy(*logits, text + offset, values * sizeof(float));
    free(text);
    return values == (size_t)*count * 512 ? 0 : -1;
}

static void check_model(const char *path) {
    int *ids = NULL, count = 0;
    float *reference = NULL;
    CHECK(load_reference(&ids, &count, &reference) == 0);
    struct lq_model *model;
    struct lq_backend *backend;
    struct lq_runtime *runtime;
    struct lq_session *session;
    struct lq_error err = {0};
    CHECK(lq_model_load(path, &model, &err) == 0);
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_runtime_create(backend, model, &runtime, &err) == 0);
    CHECK(lq_session_create(runtime, 256, 256, &session, &err) == 0);
    float *logits = malloc((size_t)count * 512 * sizeof(float));
    /* all 200 positions in one prefill */
    CHECK(lq_session_forward(session, ids, count, 1, logits, &err) == 0);
    double worst = 0;
    for (size_t i = 0; i < (size_t)count * 512; i++)
        worst = fmax(worst, fabs(logits[i] - reference[i]));
    CHECK_MSG(worst < 1e-4, "%s: prefill logits differ from HF by %g", path, worst);
    /* token by token through the KV cache, and in uneven chunks */
    lq_session_reset(session);
    worst = 0;
    for (int i = 0; i < count; i++) {
        CHECK(lq_session_forward(session, ids + i, 1, 0, logits, &err) == 0);
        for (int v = 0; v < 512; v++)
            worst = fmax(worst, fabs(logits[v] - reference[(size_t)i * 512 + v]));
    }
    CHECK_MSG(worst < 1e-4, "%s: decode logits differ from HF by %g", path, worst);
    lq_session_reset(session);
    worst = 0;
    for (int i = 0, step = 1; i < count; i += step, step = step % 7 + 3) {
        int n = count - i < step ? count - i : step;
        CHECK(lq_session_forward(session, ids + i, n, 1, logits, &err) == 0);
        for (size_t v = 0; v < (size_t)n * 512; v++)
            worst = fmax(worst, fabs(logits[v] - reference[(size_t)i * 512 + v]));
    }
    CHECK_MSG(worst < 1e-4, "%s: chunked logits differ from HF by %g", path, worst);
    /* bounds */
    CHECK(lq_session_forward(session, ids, 1, 0, logits, &err) == 0);
    int bad = 512;
    CHECK(lq_session_forward(session, &bad, 1, 0, logits, &err) == LQ_EINVAL);
    free(logits), free(ids), free(reference);
    lq_session_free(session);
    lq_runtime_free(runtime);
    backend->ops->destroy(backend);
    lq_model_free(model);
}

static void test_hf_logits(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K-hf", root());
    check_model(path);
}

static void test_llama2c_logits(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K/stories260K.bin", root());
    check_model(path);
}

/* lq_session_bytes is what lq_session_create allocates on the backend: the CPU backend's
 * count grows by it, each of the 2·layers + 8 buffers rounded up to 64 bytes plus a 64-byte
 * header, for contexts and batches that clamp (batch > context) and that do not. */
static void test_session_bytes(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K-hf", root());
    struct lq_model *model;
    struct lq_backend *backend;
    struct lq_runtime *runtime;
    struct lq_error err = {0};
    CHECK(lq_model_load(path, &model, &err) == 0);
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_runtime_create(backend, model, &runtime, &err) == 0);
    const int cases[][2] = {{1, 1}, {37, 5}, {100, 512}, {512, 16}, {300, 300}};
    const size_t buffers = 2 * (size_t)lq_runtime_config(runtime)->n_layers + 8;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct lq_backend_memory before, during;
        backend->ops->memory(backend, &before);
        struct lq_session *session = NULL;
        CHECK(lq_session_create(runtime, cases[i][0], cases[i][1], &session, &err) == 0);
        backend->ops->memory(backend, &during);
        const size_t grown = during.buffers - before.buffers;
        const size_t bytes = lq_session_bytes(runtime, cases[i][0], cases[i][1]);
        CHECK_MSG(grown >= bytes + 64 * buffers && grown <= bytes + 128 * buffers,
                  "context %d, batch %d: the buffers grew by %zu, lq_session_bytes says %zu",
                  cases[i][0], cases[i][1], grown, bytes);
        lq_session_free(session);
    }
    lq_runtime_free(runtime);
    backend->ops->destroy(backend);
    lq_model_free(model);
}

LQ_TEST_MAIN(LQ_TEST(test_hf_logits), LQ_TEST(test_llama2c_logits), LQ_TEST(test_session_bytes))
