#include "server/cli_model.h"

#include <libgen.h>
#include <stdio.h>
#include <string.h>

#include "core/adapter.h"
#include "core/file_util.h"
#include "core/gguf.h"
#include "kernels/backend_select.h"
#include "server/cli.h"

static int find_tokenizer(const char *model_path, char *out, size_t size) {
    if (lq_path_is_dir(model_path)) {
        static const char *const names[] = {"tokenizer.json", "tokenizer.model", "tokenizer.bin"};
        for (size_t i = 0; i < 3; i++) {
            snprintf(out, size, "%s/%s", model_path, names[i]);
            if (lq_path_is_file(out)) return 1;
        }
        return 0;
    }
    /* A GGUF model that carries its own tokenizer in its metadata is its tokenizer. */
    if (lq_tokenizer_gguf_present(model_path)) {
        snprintf(out, size, "%s", model_path);
        return 1;
    }
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", model_path);
    snprintf(out, size, "%s/tokenizer.bin", dirname(copy));
    return lq_path_is_file(out);
}

int lq_cli_device_option(const char *command, const char *name, const char *value,
                         struct lq_cli_device *d) {
    if (strcmp(name, "device") == 0) {
        d->device = value;
        return 1;
    }
    if (strcmp(name, "gpu-memory") == 0) {
        if (lq_parse_memory_size(value, &d->memory_limit) || d->memory_limit == 0) {
            lq_cli_usage_error(command, "--gpu-memory '%s': expected a size such as 40G or 512M",
                               value);
            return 2;
        }
        return 1;
    }
    return 0;
}

int lq_cli_model_open(const char *model_path, const char *tokenizer_path, int need_tokenizer,
                      const struct lq_cli_device *device, struct lq_cli_model *out,
                      struct lq_error *err) {
    memset(out, 0, sizeof *out);
    int rc = lq_model_load(model_path, &out->model, err);
    if (rc) return rc;
    char found[4096];
    if (tokenizer_path || find_tokenizer(model_path, found, sizeof found)) {
        const char *path = tokenizer_path ? tokenizer_path : found;
        if ((rc = lq_tokenizer_load(path, &out->tokenizer, err))) goto fail;
        if (lq_tokenizer_vocab_size(out->tokenizer) > out->model->config.vocab_size) {
            rc = lq_error_set(err, LQ_EINVAL, "%s has %d pieces but the model's vocabulary is %d",
                              path, lq_tokenizer_vocab_size(out->tokenizer),
                              out->model->config.vocab_size);
            goto fail;
        }
    } else if (need_tokenizer) {
        rc = lq_error_set(err, LQ_ENOTFOUND,
                          "%s: no tokenizer.json, tokenizer.model or tokenizer.bin found; pass "
                          "--tokenizer FILE",
                          model_path);
        goto fail;
    }
    char notice[LQ_BACKEND_NOTICE_SIZE];
    const char *name = device ? device->device : NULL;
    if ((rc = lq_backend_open(name, device ? device->memory_limit : 0, &out->backend, notice, err)))
        goto fail;
    if (name && strcmp(name, "cpu") != 0) fprintf(stderr, "lqd: %s\n", notice);
    if ((rc = lq_runtime_create(out->backend, out->model, &out->runtime, err))) goto fail;
    return LQ_OK;
fail:
    lq_cli_model_close(out);
    return rc;
}

int lq_cli_model_load_adapter(struct lq_cli_model *m, const char *dir, struct lq_error *err) {
    if (m->adapter) return lq_error_set(err, LQ_EINVAL, "only one adapter can be applied");
    int rc = lq_adapter_load(dir, &m->adapter, err);
    if (rc) return rc; /* the message names the file at fault */
    rc = lq_adapter_weights_create(m->runtime, m->adapter, &m->adapter_weights, err);
    if (rc) {
        if (rc == LQ_EINVAL)
            lq_error_prefix(err, "adapter %s (%s mode) does not fit %s", dir,
                            lq_adapter_mode_name(m->adapter->mode), m->model->path);
        lq_adapter_free(m->adapter);
        m->adapter = NULL;
    }
    return rc;
}

int lq_cli_model_session(struct lq_cli_model *m, int context, int max_batch,
                         struct lq_session **out, struct lq_error *err) {
    int rc = lq_session_create(m->runtime, context, max_batch, out, err);
    if (!rc && m->adapter_weights && (rc = lq_session_set_adapter(*out, m->adapter_weights, err))) {
        lq_session_free(*out);
        *out = NULL;
    }
    return rc;
}

void lq_cli_model_close(struct lq_cli_model *m) {
    lq_adapter_weights_free(m->adapter_weights); /* before the runtime it was prepared for */
    lq_adapter_free(m->adapter);
    lq_runtime_free(m->runtime);
    if (m->backend) m->backend->ops->destroy(m->backend);
    lq_tokenizer_free(m->tokenizer);
    lq_model_free(m->model);
    memset(m, 0, sizeof *m);
}
