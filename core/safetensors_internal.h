/* Helpers shared by the safetensors reader (safetensors.c) and writer
 * (safetensors_write.c); not part of the public API. */
#ifndef LQ_SAFETENSORS_INTERNAL_H
#define LQ_SAFETENSORS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core/error.h"

/* JSON numbers are doubles: integers above 2^53 are not exact, so none can be trusted. */
#define MAX_JSON_INTEGER 9007199254740992.0
/* Longest name quoted in a message, so that the file label and the point both fit. */
#define MAX_NAME_IN_MESSAGE 160

/* A tensor name as messages quote it: cut so that long names cannot crowd out the point. */
#define NAME_ARG(name)                                                                             \
    (int)(strlen(name) < MAX_NAME_IN_MESSAGE ? strlen(name) : MAX_NAME_IN_MESSAGE), (name)

/* A "__metadata__" key/value pair (both owned by whoever holds the entry). */
struct metadata_entry {
    char *key;
    char *value;
};

/* numel of a shape, or false when it (or numel * element_size) overflows size_t. */
bool lq_safetensors_shape_numel(int ndim, const int64_t *shape, size_t element_size,
                                size_t *numel_out);

/* True when string is valid UTF-8 (the format requires it of names and metadata). */
bool lq_safetensors_is_utf8(const char *string);

/* Sets err to "<label>: tensor '<name>' <details>" (no label for the writer); returns code. */
int lq_safetensors_tensor_error(struct lq_error *err, int code, const char *label, const char *name,
                                const char *format, ...) __attribute__((format(printf, 5, 6)));

#endif
