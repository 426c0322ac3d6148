/* Models being served, by name. Each entry is reference counted: a request holds the model it
 * started with until it finishes, so swapping the model behind a name (hot swap) never
 * disturbs requests in flight, and the old weights are freed when their last user lets go. */
#ifndef LQ_REGISTRY_H
#define LQ_REGISTRY_H

#include <stddef.h>

#include "core/adapter.h"
#include "core/chat_template.h"
#include "core/error.h"
#include "core/forward.h"
#include "core/tokenizer.h"

/* One loaded model on one backend. Immutable once published; shared by reference. */
struct lq_served_model {
    char *name; /* the id clients use ("stories260K") */
    char *path; /* where it was loaded from */
    struct lq_model *model;
    struct lq_tokenizer *tokenizer;
    struct lq_backend *backend; /* borrowed from the registry */
    struct lq_runtime *runtime;
    char *chat_template; /* tokenizer_config.json's, else a GGUF file's tokenizer.chat_template,
                          * or NULL: the documented default */
    struct lq_chat_style chat_style; /* lq_chat_style_detect(chat_template) */
    double bits_per_param;           /* quantized part (0 when dense) */
    double effective_bits;
    size_t memory_bytes;
    long long created; /* unix time */
    int references;    /* atomic; the registry holds one while published */
};

/* Takes a reference (returns model). */
struct lq_served_model *lq_served_model_retain(struct lq_served_model *model);
/* Drops a reference; the last one frees the model. */
void lq_served_model_release(struct lq_served_model *model);

/* A LoRA adapter served on top of a model, as "model:name" (core/adapter.h): read from a PEFT
 * directory, checked against the model and its factors put on the backend before it is
 * published. Immutable once published; shared by reference like models. It holds a reference
 * to the model it was prepared for, so a request on it keeps both alive. */
struct lq_served_adapter {
    char *name;                    /* the adapter's own name ("myadapter") */
    char *path;                    /* the PEFT directory it was loaded from */
    struct lq_served_model *model; /* the base (a reference) */
    struct lq_adapter *adapter;
    struct lq_adapter_weights *weights; /* on model->runtime */
    int rank;                           /* the largest pair's rank */
    size_t memory_bytes;                /* its factors on the device */
    long long loaded_at;                /* unix time */
    long version;                       /* 1 at its name's first load, +1 per replacement */
    int references;                     /* atomic; the registry holds one while published */
    struct lq_served_adapter *next;     /* the registry's list, under its lock */
};

struct lq_served_adapter *lq_served_adapter_retain(struct lq_served_adapter *adapter);
/* Drops a reference; the last one frees the adapter (and drops its model reference). */
void lq_served_adapter_release(struct lq_served_adapter *adapter);

struct lq_registry;

int lq_registry_create(struct lq_backend *backend, struct lq_registry **out, struct lq_error *err);
/* The backend every model of the registry runs on (borrowed). */
struct lq_backend *lq_registry_backend(struct lq_registry *registry);
void lq_registry_free(struct lq_registry *registry);

/* Loads path (any model lq_model_load accepts; tokenizer_path may be NULL) and publishes it
 * under name, replacing (hot-swapping) any model of that name. The adapters of a replaced
 * model are unloaded with it: they were trained against the weights it had. */
int lq_registry_load(struct lq_registry *registry, const char *name, const char *path,
                     const char *tokenizer_path, struct lq_error *err);
/* Removes name and its adapters; requests in flight keep their references. LQ_ENOTFOUND if
 * absent. */
int lq_registry_unload(struct lq_registry *registry, const char *name, struct lq_error *err);
/* A new reference to the model published under name, or NULL. */
struct lq_served_model *lq_registry_get(struct lq_registry *registry, const char *name);
/* New references to every published model (in load order); *count set. Free the array and
 * release each. */
struct lq_served_model **lq_registry_list(struct lq_registry *registry, size_t *count);

/* Adapters. Loads the PEFT directory dir, checks it fits the model published as `model`
 * (LQ_EINVAL naming the first mismatch of shape, rank or mode), puts its factors on the
 * backend, and only then publishes it as model:name, replacing any adapter of that name:
 * requests running on the old one finish with it, new ones get the new one, and a directory
 * that fails to load or check leaves the old one serving. LQ_ENOTFOUND when no such model is
 * published (or it was swapped or unloaded while the adapter loaded). Safe from any thread
 * (the finetune jobs call it when they finish). */
int lq_registry_adapter_load(struct lq_registry *registry, const char *model, const char *name,
                             const char *dir, struct lq_error *err);
/* Removes model:name; requests in flight keep their reference. LQ_ENOTFOUND if absent. */
int lq_registry_adapter_unload(struct lq_registry *registry, const char *model, const char *name,
                               struct lq_error *err);
/* A new reference to the adapter published as model:name, or NULL. Its ->model is the base
 * it runs on (retain it separately to keep it). */
struct lq_served_adapter *lq_registry_adapter_get(struct lq_registry *registry, const char *model,
                                                  const char *name);
/* New references to every published adapter (in load order); *count set. Free the array and
 * release each. */
struct lq_served_adapter **lq_registry_adapter_list(struct lq_registry *registry, size_t *count);

#endif
