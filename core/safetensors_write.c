/* safetensors writer: tensors back to back, widest dtype first, an 8-byte-aligned header,
 * written to a temporary file that replaces the target atomically. */
#include "core/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/safetensors_internal.h"

struct writer_tensor {
    char *name;
    enum lq_dtype dtype;
    int ndim;
    int64_t shape[LQ_SAFETENSORS_MAX_DIMS];
    size_t nbytes;
    void *data;
};

struct lq_safetensors_writer {
    struct writer_tensor *tensors;
    size_t count, capacity;
    struct metadata_entry *metadata;
    size_t metadata_count, metadata_capacity;
};

int lq_safetensors_writer_create(struct lq_safetensors_writer **out, struct lq_error *err) {
    if (!out) return lq_error_set(err, LQ_EINVAL, "lq_safetensors_writer_create: NULL argument");
    *out = calloc(1, sizeof **out);
    return *out ? LQ_OK : lq_error_set(err, LQ_ENOMEM, "out of memory for a safetensors writer");
}

void lq_safetensors_writer_free(struct lq_safetensors_writer *writer) {
    if (!writer) return;
    for (size_t i = 0; i < writer->count; i++) {
        free(writer->tensors[i].name);
        free(writer->tensors[i].data);
    }
    for (size_t i = 0; i < writer->metadata_count; i++) {
        free(writer->metadata[i].key);
        free(writer->metadata[i].value);
    }
    free(writer->tensors);
    free(writer->metadata);
    free(writer);
}

/* array (of element_size items), grown if needed to hold count + 1; NULL when out of memory
 * (array is then unchanged and still owned by the caller). */
static void *grow(void *array, size_t count, size_t *capacity, size_t element_size) {
    if (count < *capacity) return array;
    size_t grown = *capacity ? *capacity * 2 : 16;
    void *bigger = realloc(array, grown * element_size);
    if (bigger) *capacity = grown;
    return bigger;
}

int lq_safetensors_writer_add(struct lq_safetensors_writer *writer, const char *name,
                              enum lq_dtype dtype, int ndim, const int64_t *shape, const void *data,
                              struct lq_error *err) {
    if (!writer || !name || (ndim > 0 && !shape))
        return lq_error_set(err, LQ_EINVAL, "lq_safetensors_writer_add: NULL argument");
    if (strcmp(name, "__metadata__") == 0 || !lq_safetensors_is_utf8(name))
        return lq_safetensors_tensor_error(err, LQ_EINVAL, NULL, name,
                                           "has a reserved or non-UTF-8 name");
    if (lq_dtype_size(dtype) == 0)
        return lq_safetensors_tensor_error(err, LQ_EINVAL, NULL, name, "has unknown dtype %d",
                                           (int)dtype);
    if (ndim < 0 || ndim > LQ_SAFETENSORS_MAX_DIMS)
        return lq_safetensors_tensor_error(err, LQ_EINVAL, NULL, name,
                                           "has %d dims, expected 0 to %d", ndim,
                                           LQ_SAFETENSORS_MAX_DIMS);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (double)shape[i] > MAX_JSON_INTEGER)
            return lq_safetensors_tensor_error(err, LQ_EINVAL, NULL, name,
                                               "has shape[%d] = %lld out of range", i,
                                               (long long)shape[i]);
    }
    size_t numel;
    if (!lq_safetensors_shape_numel(ndim, shape, lq_dtype_size(dtype), &numel))
        return lq_safetensors_tensor_error(err, LQ_EINVAL, NULL, name,
                                           "has a shape whose size overflows");
    size_t nbytes = numel * lq_dtype_size(dtype);
    if (nbytes && !data)
        return lq_safetensors_tensor_error(err, LQ_EINVAL, NULL, name,
                                           "has NULL data for %zu bytes", nbytes);
    struct writer_tensor *tensors =
        grow(writer->tensors, writer->count, &writer->capacity, sizeof *tensors);
    if (!tensors)
        return lq_safetensors_tensor_error(err, LQ_ENOMEM, NULL, name, "does not fit in memory");
    writer->tensors = tensors;
    struct writer_tensor *tensor = &tensors[writer->count];
    *tensor = (struct writer_tensor){.name = strdup(name), .dtype = dtype, .ndim = ndim};
    tensor->data = malloc(nbytes ? nbytes : 1);
    if (!tensor->name || !tensor->data) {
        free(tensor->name);
        free(tensor->data);
        return lq_safetensors_tensor_error(err, LQ_ENOMEM, NULL, name,
                                           "(%zu bytes) does not fit in memory", nbytes);
    }
    if (nbytes) memcpy(tensor->data, data, nbytes);
    for (int i = 0; i < ndim; i++) tensor->shape[i] = shape[i];
    tensor->nbytes = nbytes;
    writer->count++;
    return LQ_OK;
}

int lq_safetensors_writer_set_metadata(struct lq_safetensors_writer *writer, const char *key,
                                       const char *value, struct lq_error *err) {
    if (!writer || !key || !value)
        return lq_error_set(err, LQ_EINVAL, "lq_safetensors_writer_set_metadata: NULL argument");
    if (!lq_safetensors_is_utf8(key) || !lq_safetensors_is_utf8(value))
        return lq_error_set(err, LQ_EINVAL, "metadata '%.*s': key or value is not UTF-8",
                            NAME_ARG(key));
    char *value_copy = strdup(value);
    if (!value_copy)
        return lq_error_set(err, LQ_ENOMEM, "metadata '%.*s': out of memory", NAME_ARG(key));
    for (size_t i = 0; i < writer->metadata_count; i++) {
        if (strcmp(writer->metadata[i].key, key) == 0) { /* a second set replaces the value */
            free(writer->metadata[i].value);
            writer->metadata[i].value = value_copy;
            return LQ_OK;
        }
    }
    char *key_copy = strdup(key);
    struct metadata_entry *metadata = grow(writer->metadata, writer->metadata_count,
                                           &writer->metadata_capacity, sizeof *metadata);
    if (metadata) writer->metadata = metadata;
    if (!key_copy || !metadata) {
        free(key_copy);
        free(value_copy);
        return lq_error_set(err, LQ_ENOMEM, "metadata '%.*s': out of memory", NAME_ARG(key));
    }
    metadata[writer->metadata_count++] = (struct metadata_entry){key_copy, value_copy};
    return LQ_OK;
}

/* A JSON string literal: quotes, backslashes and control characters escaped, UTF-8 kept. */
static void print_json_string(FILE *out, const char *string) {
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)string; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(out, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(out, "\\u%04x", *p);
        else
            fputc(*p, out);
    }
    fputc('"', out);
}

static int compare_writer_names(const void *a, const void *b) {
    return strcmp((*(const struct writer_tensor *const *)a)->name,
                  (*(const struct writer_tensor *const *)b)->name);
}

/* Largest element first, then by name: every tensor then starts at a multiple of its element
 * size (the reference writer's order), and the file is the same for the same tensors. */
static int compare_layout(const void *a, const void *b) {
    const struct writer_tensor *x = *(const struct writer_tensor *const *)a;
    const struct writer_tensor *y = *(const struct writer_tensor *const *)b;
    size_t x_size = lq_dtype_size(x->dtype), y_size = lq_dtype_size(y->dtype);
    if (x_size != y_size) return x_size > y_size ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* The header JSON for tensors in `order`, padded with spaces to a multiple of 8 bytes so
 * that the data section starts aligned. *header is malloc'ed. */
static int build_header(const struct lq_safetensors_writer *writer,
                        const struct writer_tensor *const *order, char **header, size_t *length,
                        struct lq_error *err) {
    FILE *out = open_memstream(header, length);
    if (!out) return lq_error_set(err, LQ_ENOMEM, "out of memory for a safetensors header");
    fputc('{', out);
    const char *separator = "";
    if (writer->metadata_count) {
        fputs("\"__metadata__\":{", out);
        for (size_t i = 0; i < writer->metadata_count; i++) {
            if (i) fputc(',', out);
            print_json_string(out, writer->metadata[i].key);
            fputc(':', out);
            print_json_string(out, writer->metadata[i].value);
        }
        fputc('}', out);
        separator = ",";
    }
    unsigned long long offset = 0;
    for (size_t i = 0; i < writer->count; i++, separator = ",") {
        const struct writer_tensor *tensor = order[i];
        fputs(separator, out);
        print_json_string(out, tensor->name);
        fprintf(out, ":{\"dtype\":\"%s\",\"shape\":[", lq_dtype_name(tensor->dtype));
        for (int d = 0; d < tensor->ndim; d++)
            fprintf(out, "%s%lld", d ? "," : "", (long long)tensor->shape[d]);
        fprintf(out, "],\"data_offsets\":[%llu,%llu]}", offset, offset + tensor->nbytes);
        offset += tensor->nbytes;
    }
    fputc('}', out);
    int failed = fflush(out) != 0;
    if (!failed) fprintf(out, "%*s", (int)((8 - *length % 8) % 8), "");
    failed |= ferror(out);
    if (fclose(out) != 0 || failed) {
        free(*header);
        *header = NULL;
        return lq_error_set(err, LQ_ENOMEM, "out of memory for a safetensors header");
    }
    return LQ_OK;
}

static int write_all(int fd, const void *bytes, size_t length) {
    const char *p = bytes;
    while (length > 0) {
        size_t chunk = length < (1u << 30) ? length : (1u << 30);
        ssize_t written = write(fd, p, chunk);
        if (written < 0 && errno == EINTR) continue;
        if (written <= 0) {
            if (written == 0) errno = EIO;
            return -1;
        }
        p += written;
        length -= (size_t)written;
    }
    return 0;
}

/* fsync of the directory makes the rename itself durable. */
static int sync_parent_directory(const char *path) {
    const char *slash = strrchr(path, '/');
    char *directory =
        slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!directory) return ENOMEM;
    int fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(directory);
    if (fd < 0) return errno;
    int rc = fsync(fd) == 0 || errno == EINVAL ? 0 : errno; /* EINVAL: fs without directory sync */
    close(fd);
    return rc;
}

static int write_file(const char *path, const char *temporary, int fd,
                      const struct writer_tensor *const *order, size_t count, const char *header,
                      size_t header_length, struct lq_error *err) {
    uint8_t length_bytes[8];
    for (int i = 0; i < 8; i++) length_bytes[i] = (uint8_t)((uint64_t)header_length >> (8 * i));
    /* mkstemp creates 0600; keep the mode of the file being replaced, else 0644. */
    struct stat previous;
    mode_t mode = stat(path, &previous) == 0 ? previous.st_mode & 07777 : 0644;
    if (fchmod(fd, mode) != 0 || write_all(fd, length_bytes, 8) != 0 ||
        write_all(fd, header, header_length) != 0)
        return lq_error_set(err, LQ_EIO, "%s: cannot write %s: %s", path, temporary,
                            strerror(errno));
    for (size_t i = 0; i < count; i++) {
        if (write_all(fd, order[i]->data, order[i]->nbytes) != 0)
            return lq_error_set(err, LQ_EIO, "%s: cannot write %s: %s", path, temporary,
                                strerror(errno));
    }
    if (fsync(fd) != 0)
        return lq_error_set(err, LQ_EIO, "%s: cannot fsync %s: %s", path, temporary,
                            strerror(errno));
    return LQ_OK;
}

int lq_safetensors_writer_write(const struct lq_safetensors_writer *writer, const char *path,
                                struct lq_error *err) {
    if (!writer || !path)
        return lq_error_set(err, LQ_EINVAL, "lq_safetensors_writer_write: NULL argument");
    const struct writer_tensor **order =
        malloc((writer->count ? writer->count : 1) * sizeof *order);
    char *header = NULL;
    size_t header_length = 0;
    char *temporary = malloc(strlen(path) + sizeof ".tmp.XXXXXX");
    int rc = LQ_OK;
    if (!order || !temporary) {
        rc = lq_error_set(err, LQ_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    for (size_t i = 0; i < writer->count; i++) order[i] = &writer->tensors[i];
    /* Names are checked here rather than in add: one sort instead of a scan per add. */
    qsort(order, writer->count, sizeof *order, compare_writer_names);
    for (size_t i = 1; i < writer->count && rc == LQ_OK; i++) {
        if (strcmp(order[i - 1]->name, order[i]->name) == 0)
            rc = lq_error_set(err, LQ_EINVAL, "%s: tensor '%.*s' was added twice", path,
                              NAME_ARG(order[i]->name));
    }
    qsort(order, writer->count, sizeof *order, compare_layout);
    if (rc != LQ_OK) goto done;
    rc = build_header(writer, order, &header, &header_length, err);
    if (rc != LQ_OK) goto done;

    sprintf(temporary, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(temporary);
    if (fd < 0) {
        rc = lq_error_set(err, LQ_EIO, "%s: cannot create a temporary file beside it: %s", path,
                          strerror(errno));
        goto done;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    rc = write_file(path, temporary, fd, order, writer->count, header, header_length, err);
    if (close(fd) != 0 && rc == LQ_OK)
        rc = lq_error_set(err, LQ_EIO, "%s: cannot close %s: %s", path, temporary, strerror(errno));
    if (rc == LQ_OK && rename(temporary, path) != 0)
        rc = lq_error_set(err, LQ_EIO, "%s: cannot rename %s over it: %s", path, temporary,
                          strerror(errno));
    if (rc != LQ_OK) {
        unlink(temporary);
        goto done;
    }
    int sync_error = sync_parent_directory(path);
    if (sync_error)
        rc = lq_error_set(err, LQ_EIO, "%s: written, but cannot fsync its directory: %s", path,
                          strerror(sync_error));
done:
    free(order);
    free(header);
    free(temporary);
    return rc;
}
