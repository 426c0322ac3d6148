/* Models being served, by name. Each entry is reference counted: a request holds the model it
 * started with until it finishes, so swapping the model behind a name (hot swap) never
 * disturbs requests in flight, and the old weights are freed when their last user lets go. */
#ifndef LQ_REGISTRY_H
#define LQ_REGISTRY_H

#include <stddef.h>

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
    char *chat_template;   /* from tokenizer_config.json, or NULL: the documented default */
    double bits_per_param; /* quantized part (0 when dense) */
    double effective_bits;
    size_t memory_bytes;
    long long created; /* unix time */
    int references;    /* atomic; the registry holds one while published */
};

/* Takes a reference (returns model). */
struct lq_served_model *lq_served_model_retain(struct lq_served_model *model);
/* Drops a reference; the last one frees the model. */
void lq_served_model_release(struct lq_served_model *model);

struct lq_registry;

int lq_registry_create(struct lq_backend *backend, struct lq_registry **out, struct lq_error *err);
/* The backend every model of the registry runs on (borrowed). */
struct lq_backend *lq_registry_backend(struct lq_registry *registry);
void lq_registry_free(struct lq_registry *registry);

/* Loads path (any model lq_model_load accepts; tokenizer_path may be NULL) and publishes it
 * under name, replacing (hot-swapping) any model of that name. */
int lq_registry_load(struct lq_registry *registry, const char *name, const char *path,
                     const char *tokenizer_path, struct lq_error *err);
/* Removes name; requests in flight keep their reference. LQ_ENOTFOUND if absent. */
int lq_registry_unload(struct lq_registry *registry, const char *name, struct lq_error *err);
/* A new reference to the model published under name, or NULL. */
struct lq_served_model *lq_registry_get(struct lq_registry *registry, const char *name);
/* New references to every published model (in load order); *count set. Free the array and
 * release each. */
struct lq_served_model **lq_registry_list(struct lq_registry *registry, size_t *count);

#endif
