/* The model registry: what a loaded model reports (chat template, bits, memory), names in load
 * order, hot swap and unload by reference count, and failed loads that publish nothing. */
#include "server/registry.h"
#include "core/file_util.h"
#include "tests/unit/lq_test.h"

#include <stdio.h>
#include <unistd.h>

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

/* A copy of the HF stories260K directory with the given tokenizer_config.json (NULL: none)
 * and, when with_tokenizer is 0, without its tokenizer. */
static void make_model_dir(char *dir, size_t size, const char *tokenizer_config,
                           int with_tokenizer) {
    snprintf(dir, size, "/tmp/lq_test_registry_XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.bin"};
    for (int i = 0; i < (with_tokenizer ? 3 : 2); i++) {
        char from[2048], to[2048];
        snprintf(from, sizeof from, "%s/models/stories260K-hf/%s", root(), files[i]);
        snprintf(to, sizeof to, "%s/%s", dir, files[i]);
        CHECK(lq_file_copy(from, to, NULL) == 0);
    }
    if (tokenizer_config) {
        char path[2048];
        snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
        CHECK(lq_file_write_atomic(path, tokenizer_config, strlen(tokenizer_config), NULL) == 0);
    }
}

static void remove_model_dir(const char *dir) {
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.bin",
                           "tokenizer_config.json"};
    for (int i = 0; i < 4; i++) {
        char path[2048];
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

static void test_model_properties(void) {
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = NULL;
    struct lq_error err = {0};
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_registry_create(backend, &registry, &err) == 0);
    char plain[1024], with_string[1024], with_list[1024];
    make_model_dir(plain, sizeof plain, NULL, 1);
    make_model_dir(with_string, sizeof with_string,
                   "{\"chat_template\": \"{% for m in messages %}{{ m.content }}{% endfor %}\"}",
                   1);
    make_model_dir(with_list, sizeof with_list,
                   "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"T\"},"
                   " {\"name\": \"default\", \"template\": \"D\"}]}",
                   1);
    CHECK_MSG(lq_registry_load(registry, "plain", plain, NULL, &err) == 0, "%s", err.message);
    CHECK(lq_registry_load(registry, "string", with_string, NULL, &err) == 0);
    CHECK(lq_registry_load(registry, "list", with_list, NULL, &err) == 0);
    struct lq_served_model *m = lq_registry_get(registry, "plain");
    CHECK(m && m->chat_template == NULL && strcmp(m->name, "plain") == 0);
    CHECK(m && strcmp(m->path, plain) == 0 && m->created > 0 && m->backend == backend);
    /* dense fp32: no quantized part; 32 bits effective; the weights' bytes */
    CHECK(m && m->bits_per_param == 0.0 && m->effective_bits == 32.0);
    CHECK(m && m->memory_bytes > 4 * lq_model_linear_params(&m->model->config));
    lq_served_model_release(m);
    m = lq_registry_get(registry, "string");
    CHECK(m && m->chat_template &&
          strcmp(m->chat_template, "{% for m in messages %}{{ m.content }}{% endfor %}") == 0);
    lq_served_model_release(m);
    m = lq_registry_get(registry, "list");
    CHECK(m && m->chat_template && strcmp(m->chat_template, "D") == 0);
    lq_served_model_release(m);
    size_t count = 0;
    struct lq_served_model **list = lq_registry_list(registry, &count);
    CHECK(count == 3);
    const char *order[] = {"plain", "string", "list"};
    for (size_t i = 0; i < count; i++) {
        CHECK(strcmp(list[i]->name, order[i]) == 0);
        CHECK(list[i]->references == 2);
        lq_served_model_release(list[i]);
    }
    free(list);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
    remove_model_dir(plain);
    remove_model_dir(with_string);
    remove_model_dir(with_list);
}

/* A failed load leaves the published model alone; bad names and missing tokenizers are
 * refused with a message. */
static void test_failed_loads(void) {
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = NULL;
    struct lq_error err = {0};
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_registry_create(backend, &registry, &err) == 0);
    char good[1024], no_tokenizer[1024], bad_config[1024];
    make_model_dir(good, sizeof good, NULL, 1);
    make_model_dir(no_tokenizer, sizeof no_tokenizer, NULL, 0);
    make_model_dir(bad_config, sizeof bad_config, "{not json", 1);
    CHECK(lq_registry_load(registry, "m", good, NULL, &err) == 0);
    struct lq_served_model *published = lq_registry_get(registry, "m");
    CHECK(lq_registry_load(registry, "m", "/nonexistent/model", NULL, &err) != 0);
    CHECK(strstr(err.message, "'m'") != NULL);
    CHECK(lq_registry_load(registry, "m", no_tokenizer, NULL, &err) == LQ_ENOTFOUND);
    CHECK(lq_registry_load(registry, "m", bad_config, NULL, &err) == LQ_EFORMAT);
    CHECK(strstr(err.message, "tokenizer_config.json") != NULL);
    struct lq_served_model *still = lq_registry_get(registry, "m");
    CHECK(still == published);
    lq_served_model_release(still);
    CHECK(lq_registry_load(registry, "", good, NULL, &err) == LQ_EINVAL);
    CHECK(lq_registry_load(registry, "base:adapter", good, NULL, &err) == LQ_EINVAL);
    /* an explicit tokenizer makes the tokenizer-less directory loadable */
    char tokenizer[1024];
    snprintf(tokenizer, sizeof tokenizer, "%s/models/stories260K/tok512.bin", root());
    CHECK(lq_registry_load(registry, "other", no_tokenizer, tokenizer, &err) == 0);
    CHECK(lq_registry_get(registry, "missing") == NULL);
    CHECK(lq_registry_unload(registry, "missing", &err) == LQ_ENOTFOUND);
    CHECK(published->references == 2);
    lq_served_model_release(published);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
    remove_model_dir(good);
    remove_model_dir(no_tokenizer);
    remove_model_dir(bad_config);
}

LQ_TEST_MAIN(LQ_TEST(test_model_properties), LQ_TEST(test_failed_loads))
