/* The model registry: a name table under one mutex, pointing at reference-counted models.
 * Loading (seconds to minutes) happens outside the lock; only the pointer swap is inside, so
 * lookups from HTTP threads never wait for a load. */
#include "server/registry.h"

#include <cjson/cJSON.h>
#include <libgen.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/file_util.h"
#include "core/gguf.h"
#include "core/lq_model_file.h"

struct lq_registry {
    struct lq_backend *backend;
    pthread_mutex_t lock;            /* guards models, count and adapters: the name tables */
    struct lq_served_model **models; /* published, in load order (a swap keeps the place) */
    size_t count, capacity;
    /* Published adapters, in load order (a replacement keeps the place), linked through
     * ->next. Every one's model is the one published under its model's name: a model swap or
     * unload takes its adapters out in the same critical section. */
    struct lq_served_adapter *adapters;
};

struct lq_served_model *lq_served_model_retain(struct lq_served_model *model) {
    __atomic_fetch_add(&model->references, 1, __ATOMIC_RELAXED);
    return model;
}

static void served_model_destroy(struct lq_served_model *m) {
    lq_runtime_free(m->runtime); /* before the model whose weights it borrows */
    lq_model_free(m->model);
    lq_tokenizer_free(m->tokenizer);
    lq_chat_style_free(&m->chat_style);
    free(m->chat_template);
    free(m->name);
    free(m->path);
    free(m);
}

void lq_served_model_release(struct lq_served_model *model) {
    if (!model) return;
    /* acquire-release: the thread that frees sees every write of the other users */
    if (__atomic_sub_fetch(&model->references, 1, __ATOMIC_ACQ_REL) == 0)
        served_model_destroy(model);
}

struct lq_served_adapter *lq_served_adapter_retain(struct lq_served_adapter *adapter) {
    __atomic_fetch_add(&adapter->references, 1, __ATOMIC_RELAXED);
    return adapter;
}

static void served_adapter_destroy(struct lq_served_adapter *a) {
    lq_adapter_weights_free(a->weights); /* before the adapter and runtime it borrows */
    lq_adapter_free(a->adapter);
    lq_served_model_release(a->model);
    free(a->name);
    free(a->path);
    free(a);
}

void lq_served_adapter_release(struct lq_served_adapter *adapter) {
    if (!adapter) return;
    if (__atomic_sub_fetch(&adapter->references, 1, __ATOMIC_ACQ_REL) == 0)
        served_adapter_destroy(adapter);
}

/* Releases the registry's reference to every adapter of a list unlinked from the table. */
static void release_adapter_list(struct lq_served_adapter *list) {
    while (list) {
        struct lq_served_adapter *next = list->next;
        lq_served_adapter_release(list);
        list = next;
    }
}

/* Unlinks the adapters of model (published under its name) into a list (lock held). */
static struct lq_served_adapter *take_adapters_locked(struct lq_registry *registry,
                                                      const struct lq_served_model *model) {
    struct lq_served_adapter *taken = NULL, **taken_tail = &taken;
    for (struct lq_served_adapter **link = &registry->adapters; *link;) {
        struct lq_served_adapter *a = *link;
        if (a->model != model) {
            link = &a->next;
            continue;
        }
        *link = a->next;
        a->next = NULL;
        *taken_tail = a, taken_tail = &a->next;
    }
    return taken;
}

int lq_registry_create(struct lq_backend *backend, struct lq_registry **out, struct lq_error *err) {
    *out = calloc(1, sizeof **out);
    if (!*out) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    (*out)->backend = backend;
    pthread_mutex_init(&(*out)->lock, NULL);
    return LQ_OK;
}

void lq_registry_free(struct lq_registry *registry) {
    if (!registry) return;
    release_adapter_list(registry->adapters); /* before the models they hold */
    for (size_t i = 0; i < registry->count; i++) lq_served_model_release(registry->models[i]);
    free(registry->models);
    pthread_mutex_destroy(&registry->lock);
    free(registry);
}

/* The directory a model lives in: path itself, or the directory of a llama2.c .bin. */
static void model_directory(const char *path, char *out, size_t size) {
    if (lq_path_is_dir(path)) {
        snprintf(out, size, "%s", path);
        return;
    }
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", path);
    snprintf(out, size, "%s", dirname(copy));
}

/* The "chat_template" of DIR/tokenizer_config.json: a string, or HF's list of {"name",
 * "template"} (the one named "default", else the first). *out stays NULL when there is none. */
static int load_chat_template(const char *directory, char **out, struct lq_error *err) {
    *out = NULL;
    char path[4096 + 64];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", directory);
    if (!lq_path_is_file(path)) return LQ_OK;
    char *text;
    size_t length;
    int rc = lq_file_read_all(path, (size_t)64 << 20, &text, &length, err);
    if (rc) return rc;
    cJSON *json = lq_json_parse(text, length);
    free(text);
    if (!json) return lq_error_set(err, LQ_EFORMAT, "%s: not valid JSON", path);
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(json, "chat_template");
    const char *chosen = cJSON_IsString(item) ? item->valuestring : NULL;
    if (cJSON_IsArray(item)) {
        const cJSON *entry;
        cJSON_ArrayForEach(entry, item) {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(entry, "name");
            const cJSON *body = cJSON_GetObjectItemCaseSensitive(entry, "template");
            if (!cJSON_IsString(body)) continue;
            if (!chosen) chosen = body->valuestring;
            if (cJSON_IsString(name) && strcmp(name->valuestring, "default") == 0) {
                chosen = body->valuestring;
                break;
            }
        }
    }
    if (chosen && !(*out = strdup(chosen))) rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    cJSON_Delete(json);
    return rc;
}

/* Without a tokenizer_config.json: the "tokenizer.chat_template" of a GGUF model file (one
 * that starts with the GGUF magic). *out stays NULL when there is none. */
static int load_gguf_chat_template(const char *path, char **out, struct lq_error *err) {
    *out = NULL;
    char magic[4] = {0};
    FILE *file = lq_path_is_file(path) ? fopen(path, "rb") : NULL;
    if (!file) return LQ_OK;
    size_t got = fread(magic, 1, sizeof magic, file);
    fclose(file);
    if (got != sizeof magic || memcmp(magic, "GGUF", 4) != 0) return LQ_OK;
    struct lq_gguf *gguf = NULL;
    int rc = lq_gguf_open(path, &gguf, err);
    if (rc) return rc;
    const char *text = NULL;
    struct lq_error ignored = {0};
    if (lq_gguf_get_string(gguf, "tokenizer.chat_template", &text, NULL, &ignored) == LQ_OK &&
        !(*out = strdup(text)))
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    lq_gguf_close(gguf);
    return rc;
}

/* Bits per parameter and memory, as lqd inspect reports them. */
static int measure_model(struct lq_served_model *m, struct lq_error *err) {
    struct lq_model_summary summary;
    int rc = lq_model_summary_compute(m->model, &summary, err);
    if (rc) return rc;
    int any_lq = 0;
    for (size_t i = 0; i < summary.n_matrices; i++) any_lq |= summary.matrices[i].is_lq;
    m->bits_per_param = any_lq ? summary.bits_per_param : 0.0;
    m->effective_bits = summary.effective_bits;
    m->memory_bytes = summary.total_bytes;
    lq_model_summary_free(&summary);
    return LQ_OK;
}

/* Builds a complete served model (one reference, the caller's), touching no shared state. */
struct lq_backend *lq_registry_backend(struct lq_registry *registry) {
    return registry->backend;
}

static int served_model_build(struct lq_backend *backend, const char *name, const char *path,
                              const char *tokenizer_path, struct lq_served_model **out,
                              struct lq_error *err) {
    *out = NULL;
    struct lq_served_model *m = calloc(1, sizeof *m);
    if (!m) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    m->references = 1;
    m->backend = backend;
    m->created = (long long)time(NULL);
    int rc = LQ_OK;
    if (strlen(path) >= 4000 || (tokenizer_path && strlen(tokenizer_path) >= 4000)) {
        rc = lq_error_set(err, LQ_EINVAL, "path too long");
        goto fail;
    }
    if (!(m->name = strdup(name)) || !(m->path = strdup(path))) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = lq_model_load(path, &m->model, err))) goto fail;
    if ((rc = measure_model(m, err))) goto fail;
    /* The runtime first, so that a tied model served from the CPU's int8 head frees its fp32
     * table (113 MB for SmolLM2) before the tokenizer (24 MB) joins: the load is the daemon's
     * peak RSS (3-bit SmolLM2: 232 MiB the other way round). */
    if ((rc = lq_runtime_create(backend, m->model, &m->runtime, err))) goto fail;
    lq_runtime_release_model_embedding(m->runtime);
    char directory[4096];
    model_directory(path, directory, sizeof directory);
    /* As lqd generate finds it: a GGUF model's own, else the files in or beside the model. */
    struct lq_tokenizer_files files;
    const char *tokenizer = tokenizer_path;
    if (!tokenizer && !(rc = lq_model_file_find_tokenizer(path, 1, &files, err)) &&
        !(tokenizer = lq_tokenizer_files_primary(&files)))
        rc = lq_error_set(err, LQ_ENOTFOUND,
                          "%s: no tokenizer.json, tokenizer.model or tokenizer.bin beside the "
                          "model; give a tokenizer path",
                          path);
    if (rc) goto fail;
    if ((rc = lq_tokenizer_load(tokenizer, &m->tokenizer, err))) goto fail;
    if (lq_tokenizer_vocab_size(m->tokenizer) > m->model->config.vocab_size) {
        rc = lq_error_set(err, LQ_EINVAL, "%s has %d pieces but the model's vocabulary is %d",
                          tokenizer, lq_tokenizer_vocab_size(m->tokenizer),
                          m->model->config.vocab_size);
        goto fail;
    }
    if ((rc = load_chat_template(directory, &m->chat_template, err))) goto fail;
    if (!m->chat_template && (rc = load_gguf_chat_template(path, &m->chat_template, err)))
        goto fail;
    if ((rc = lq_chat_style_detect(m->chat_template, &m->chat_style))) {
        lq_error_set(err, rc, "out of memory");
        goto fail;
    }
    *out = m;
    return LQ_OK;
fail:
    served_model_destroy(m);
    return rc;
}

static int check_name(const char *name, struct lq_error *err) {
    if (!name || !name[0]) return lq_error_set(err, LQ_EINVAL, "a model needs a name");
    if (strchr(name, ':'))
        return lq_error_set(err, LQ_EINVAL, "model name '%s': ':' separates an adapter", name);
    return LQ_OK;
}

/* Index of name in the table, or -1 (lock held). */
static long find_locked(const struct lq_registry *registry, const char *name) {
    for (size_t i = 0; i < registry->count; i++)
        if (strcmp(registry->models[i]->name, name) == 0) return (long)i;
    return -1;
}

int lq_registry_load(struct lq_registry *registry, const char *name, const char *path,
                     const char *tokenizer_path, struct lq_error *err) {
    int rc = check_name(name, err);
    if (rc) return rc;
    struct lq_served_model *fresh;
    if ((rc = served_model_build(registry->backend, name, path, tokenizer_path, &fresh, err)))
        return lq_error_prefix(err, "loading model '%s'", name);
    struct lq_served_model *replaced = NULL;
    struct lq_served_adapter *dropped = NULL;
    pthread_mutex_lock(&registry->lock);
    long at = find_locked(registry, name);
    if (at >= 0) {
        replaced = registry->models[at];
        registry->models[at] = fresh; /* the hot swap: later lookups see only the new one */
        dropped = take_adapters_locked(registry, replaced);
    } else if (registry->count == registry->capacity) {
        size_t capacity = registry->capacity ? registry->capacity * 2 : 8;
        struct lq_served_model **grown =
            realloc(registry->models, capacity * sizeof *registry->models);
        if (!grown)
            rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
        else
            registry->models = grown, registry->capacity = capacity;
    }
    if (at < 0 && !rc) registry->models[registry->count++] = fresh;
    pthread_mutex_unlock(&registry->lock);
    /* the old model goes when its last request does; freeing it here (if unused) is outside
     * the lock */
    release_adapter_list(dropped);
    lq_served_model_release(replaced);
    if (rc) lq_served_model_release(fresh);
    return rc;
}

int lq_registry_unload(struct lq_registry *registry, const char *name, struct lq_error *err) {
    struct lq_served_model *removed = NULL;
    struct lq_served_adapter *dropped = NULL;
    pthread_mutex_lock(&registry->lock);
    long at = name ? find_locked(registry, name) : -1;
    if (at >= 0) {
        removed = registry->models[at];
        memmove(&registry->models[at], &registry->models[at + 1],
                (registry->count - (size_t)at - 1) * sizeof *registry->models);
        registry->count--;
        dropped = take_adapters_locked(registry, removed);
    }
    pthread_mutex_unlock(&registry->lock);
    if (!removed) return lq_error_set(err, LQ_ENOTFOUND, "no model named '%s'", name ? name : "");
    release_adapter_list(dropped);
    lq_served_model_release(removed);
    return LQ_OK;
}

struct lq_served_model *lq_registry_get(struct lq_registry *registry, const char *name) {
    struct lq_served_model *found = NULL;
    pthread_mutex_lock(&registry->lock);
    long at = name ? find_locked(registry, name) : -1;
    if (at >= 0) found = lq_served_model_retain(registry->models[at]);
    pthread_mutex_unlock(&registry->lock);
    return found;
}

struct lq_served_model **lq_registry_list(struct lq_registry *registry, size_t *count) {
    *count = 0;
    pthread_mutex_lock(&registry->lock);
    /* one spare slot: a valid array even when nothing is published */
    struct lq_served_model **list = malloc((registry->count + 1) * sizeof *list);
    if (list) {
        for (size_t i = 0; i < registry->count; i++)
            list[i] = lq_served_model_retain(registry->models[i]);
        *count = registry->count;
    }
    pthread_mutex_unlock(&registry->lock);
    return list;
}

/* ---------- adapters ---------- */

/* The adapter model:name in the list, or NULL (lock held). */
static struct lq_served_adapter **find_adapter_locked(struct lq_registry *registry,
                                                      const char *model, const char *name) {
    for (struct lq_served_adapter **link = &registry->adapters; *link; link = &(*link)->next)
        if (strcmp((*link)->model->name, model) == 0 && strcmp((*link)->name, name) == 0)
            return link;
    return NULL;
}

/* Loads, checks and prepares an adapter for model, touching no shared state (one reference,
 * the caller's). */
static int served_adapter_build(struct lq_served_model *model, const char *name, const char *dir,
                                struct lq_served_adapter **out, struct lq_error *err) {
    *out = NULL;
    struct lq_served_adapter *a = calloc(1, sizeof *a);
    if (!a) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    a->references = 1;
    a->model = lq_served_model_retain(model);
    a->loaded_at = (long long)time(NULL);
    int rc = LQ_OK;
    if (strlen(dir) >= 4000) {
        rc = lq_error_set(err, LQ_EINVAL, "path too long");
        goto fail;
    }
    if (!(a->name = strdup(name)) || !(a->path = strdup(dir))) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
        goto fail;
    }
    /* everything is read and checked before anything is published: a corrupt or mismatched
     * directory never replaces a good adapter */
    if ((rc = lq_adapter_load(dir, &a->adapter, err)) ||
        (rc = lq_adapter_weights_create(model->runtime, a->adapter, &a->weights, err)))
        goto fail;
    size_t count = (size_t)a->adapter->n_layers * LQ_LINEARS_PER_LAYER;
    for (size_t i = 0; i < count; i++)
        if (a->adapter->matrices[i].rank > a->rank) a->rank = a->adapter->matrices[i].rank;
    a->memory_bytes = lq_adapter_weights_bytes(a->weights);
    *out = a;
    return LQ_OK;
fail:
    served_adapter_destroy(a);
    return rc;
}

int lq_registry_adapter_load(struct lq_registry *registry, const char *model, const char *name,
                             const char *dir, struct lq_error *err) {
    if (!model || !name || !dir)
        return lq_error_set(err, LQ_EINVAL, "model, name and directory needed");
    if (!name[0] || strlen(name) > 64 || strchr(name, ':') || strchr(name, '/'))
        return lq_error_set(err, LQ_EINVAL, "adapter name '%.80s': 1 to 64 characters, no ':'",
                            name);
    struct lq_served_model *base = lq_registry_get(registry, model);
    if (!base) return lq_error_set(err, LQ_ENOTFOUND, "no model named '%s'", model);
    struct lq_served_adapter *fresh = NULL;
    int rc = served_adapter_build(base, name, dir, &fresh, err);
    if (rc) {
        lq_served_model_release(base);
        return lq_error_prefix(err, "loading adapter '%s' of '%s'", name, model);
    }
    struct lq_served_adapter *replaced = NULL;
    pthread_mutex_lock(&registry->lock);
    long at = find_locked(registry, model);
    if (at < 0 || registry->models[at] != base) {
        /* the model went away or was swapped meanwhile: its adapters went with it */
        rc = lq_error_set(err, LQ_ENOTFOUND,
                          "the model '%s' was unloaded or replaced while adapter '%s' loaded",
                          model, name);
    } else {
        struct lq_served_adapter **link = find_adapter_locked(registry, model, name);
        if (link) { /* the swap: later lookups see only the new one */
            replaced = *link;
            fresh->version = replaced->version + 1;
            fresh->next = replaced->next;
            replaced->next = NULL;
            *link = fresh;
        } else {
            fresh->version = 1;
            struct lq_served_adapter **tail = &registry->adapters;
            while (*tail) tail = &(*tail)->next;
            *tail = fresh;
        }
    }
    pthread_mutex_unlock(&registry->lock);
    lq_served_model_release(base); /* fresh holds its own */
    if (rc) lq_served_adapter_release(fresh);
    /* the old version goes when its last request does */
    lq_served_adapter_release(replaced);
    return rc;
}

int lq_registry_adapter_unload(struct lq_registry *registry, const char *model, const char *name,
                               struct lq_error *err) {
    struct lq_served_adapter *removed = NULL;
    pthread_mutex_lock(&registry->lock);
    struct lq_served_adapter **link =
        model && name ? find_adapter_locked(registry, model, name) : NULL;
    if (link) {
        removed = *link;
        *link = removed->next;
        removed->next = NULL;
    }
    pthread_mutex_unlock(&registry->lock);
    if (!removed)
        return lq_error_set(err, LQ_ENOTFOUND, "no adapter '%s' of model '%s'", name ? name : "",
                            model ? model : "");
    lq_served_adapter_release(removed);
    return LQ_OK;
}

struct lq_served_adapter *lq_registry_adapter_get(struct lq_registry *registry, const char *model,
                                                  const char *name) {
    struct lq_served_adapter *found = NULL;
    pthread_mutex_lock(&registry->lock);
    struct lq_served_adapter **link =
        model && name ? find_adapter_locked(registry, model, name) : NULL;
    if (link) found = lq_served_adapter_retain(*link);
    pthread_mutex_unlock(&registry->lock);
    return found;
}

struct lq_served_adapter **lq_registry_adapter_list(struct lq_registry *registry, size_t *count) {
    *count = 0;
    pthread_mutex_lock(&registry->lock);
    size_t n = 0;
    for (const struct lq_served_adapter *a = registry->adapters; a; a = a->next) n++;
    struct lq_served_adapter **list = malloc((n + 1) * sizeof *list);
    if (list) {
        for (struct lq_served_adapter *a = registry->adapters; a; a = a->next)
            list[(*count)++] = lq_served_adapter_retain(a);
    }
    pthread_mutex_unlock(&registry->lock);
    return list;
}
