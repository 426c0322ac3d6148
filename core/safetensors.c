/* safetensors reader and writer.
 *
 * The reader treats every byte of the file as hostile: it validates the whole header (types,
 * dtypes, shapes, byte ranges, overlaps, duplicates) before handing out any tensor, so callers
 * may index the data with the shapes and offsets it reports without further checks.
 * The writer lays tensors out as the reference implementation does (contiguous, largest
 * element size first, header padded with spaces to 8 bytes) so that each tensor starts at a
 * multiple of its element size and torch/safetensors can read the result. */
#include "core/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/file_util.h"
#include "core/half.h"
#include "core/safetensors_internal.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian and is copied here as host-order numbers"
#endif

/* The reference implementation's limit; a larger header is an attack, not a model. */
#define MAX_HEADER_BYTES 100000000ull

static const struct {
    const char *name;
    size_t size;
} dtype_table[] = {
    [LQ_DTYPE_F32] = {"F32", 4},   [LQ_DTYPE_F16] = {"F16", 2}, [LQ_DTYPE_BF16] = {"BF16", 2},
    [LQ_DTYPE_F64] = {"F64", 8},   [LQ_DTYPE_U8] = {"U8", 1},   [LQ_DTYPE_I8] = {"I8", 1},
    [LQ_DTYPE_U16] = {"U16", 2},   [LQ_DTYPE_I16] = {"I16", 2}, [LQ_DTYPE_U32] = {"U32", 4},
    [LQ_DTYPE_I32] = {"I32", 4},   [LQ_DTYPE_U64] = {"U64", 8}, [LQ_DTYPE_I64] = {"I64", 8},
    [LQ_DTYPE_BOOL] = {"BOOL", 1},
};
#define DTYPE_COUNT (sizeof dtype_table / sizeof dtype_table[0])

const char *lq_dtype_name(enum lq_dtype dtype) {
    return (unsigned)dtype < DTYPE_COUNT ? dtype_table[dtype].name : "?";
}

size_t lq_dtype_size(enum lq_dtype dtype) {
    return (unsigned)dtype < DTYPE_COUNT ? dtype_table[dtype].size : 0;
}

int lq_dtype_parse(const char *name, enum lq_dtype *out) {
    for (size_t i = 0; name && i < DTYPE_COUNT; i++) {
        if (strcmp(name, dtype_table[i].name) == 0) {
            *out = (enum lq_dtype)i;
            return LQ_OK;
        }
    }
    return LQ_EUNSUPPORTED;
}

struct lq_safetensors {
    char *label;
    void *mapping; /* only when lq_safetensors_open mapped the file */
    size_t mapping_size;
    const uint8_t *data; /* the data section, after the header */
    size_t data_size;
    struct lq_safetensors_tensor *tensors; /* header order */
    size_t count;
    const struct lq_safetensors_tensor **by_name; /* sorted, for binary search */
    struct metadata_entry *metadata;              /* sorted by key */
    size_t metadata_count;
};

/* ---- shared helpers ---- */

static int compare_tensor_names(const void *a, const void *b) {
    const struct lq_safetensors_tensor *x = *(const struct lq_safetensors_tensor *const *)a;
    const struct lq_safetensors_tensor *y = *(const struct lq_safetensors_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int compare_metadata_keys(const void *a, const void *b) {
    return strcmp(((const struct metadata_entry *)a)->key, ((const struct metadata_entry *)b)->key);
}

/* numel of a shape, or false when it (or numel * element_size) overflows size_t. */
bool lq_safetensors_shape_numel(int ndim, const int64_t *shape, size_t element_size,
                                size_t *numel_out) {
    size_t numel = 1;
    bool overflow = false;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] == 0) {
            *numel_out = 0; /* a zero dim empties the tensor whatever the others are */
            return true;
        }
        if ((uint64_t)shape[i] > SIZE_MAX / numel)
            overflow = true;
        else
            numel *= (size_t)shape[i];
    }
    if (overflow || numel > SIZE_MAX / element_size) return false;
    *numel_out = numel;
    return true;
}

static void format_shape(int ndim, const int64_t *shape, char *out, size_t size) {
    size_t used = (size_t)snprintf(out, size, "[");
    for (int i = 0; i < ndim && used < size; i++)
        used +=
            (size_t)snprintf(out + used, size - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (used < size) snprintf(out + used, size - used, "]");
}

/* Offset of the first byte that breaks UTF-8 (overlongs, surrogates and > U+10FFFF
 * included), or length when the text is valid. The reference reader rejects such headers. */
static size_t utf8_invalid_at(const uint8_t *text, size_t length) {
    size_t i = 0;
    while (i < length) {
        uint8_t c = text[i];
        size_t extra;
        uint32_t code, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0)
            extra = 1, code = c & 0x1fu, min = 0x80;
        else if ((c & 0xf0) == 0xe0)
            extra = 2, code = c & 0x0fu, min = 0x800;
        else if ((c & 0xf8) == 0xf0)
            extra = 3, code = c & 0x07u, min = 0x10000;
        else
            return i;
        if (extra >= length - i) return i;
        for (size_t k = 1; k <= extra; k++) {
            if ((text[i + k] & 0xc0) != 0x80) return i;
            code = (code << 6) | (text[i + k] & 0x3fu);
        }
        if (code < min || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return i;
        i += extra + 1;
    }
    return length;
}

bool lq_safetensors_is_utf8(const char *string) {
    size_t length = strlen(string);
    return utf8_invalid_at((const uint8_t *)string, length) == length;
}

/* ---- reader ---- */

/* A JSON integer in [0, 2^53]; cJSON stores every number as a double. */
static bool json_uint(const cJSON *item, uint64_t *out) {
    if (!cJSON_IsNumber(item)) return false;
    double value = item->valuedouble;
    if (!(value >= 0 && value <= MAX_JSON_INTEGER)) return false;
    if ((double)(uint64_t)value != value) return false; /* fraction */
    *out = (uint64_t)value;
    return true;
}

static int parse_metadata(struct lq_safetensors *file, const cJSON *object, struct lq_error *err) {
    const char *label = file->label;
    if (!cJSON_IsObject(object))
        return lq_error_set(err, LQ_EFORMAT, "%s: __metadata__ is not a JSON object", label);
    size_t count = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, object) count++;
    file->metadata = calloc(count ? count : 1, sizeof *file->metadata);
    if (!file->metadata)
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for metadata", label);
    cJSON_ArrayForEach(item, object) {
        if (!cJSON_IsString(item) || !item->valuestring)
            return lq_error_set(err, LQ_EFORMAT,
                                "%s: __metadata__ value for key '%.*s' is not a string", label,
                                NAME_ARG(item->string));
        struct metadata_entry *entry = &file->metadata[file->metadata_count];
        entry->key = strdup(item->string);
        entry->value = strdup(item->valuestring);
        if (entry->key) file->metadata_count++; /* counted so that close frees both */
        if (!entry->key || !entry->value)
            return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for metadata", label);
    }
    qsort(file->metadata, file->metadata_count, sizeof *file->metadata, compare_metadata_keys);
    for (size_t i = 1; i < file->metadata_count; i++) {
        if (strcmp(file->metadata[i - 1].key, file->metadata[i].key) == 0)
            return lq_error_set(err, LQ_EFORMAT, "%s: __metadata__ key '%.*s' appears twice", label,
                                NAME_ARG(file->metadata[i].key));
    }
    return LQ_OK;
}

int lq_safetensors_tensor_error(struct lq_error *err, int code, const char *label, const char *name,
                                const char *format, ...) {
    char details[LQ_ERROR_MESSAGE_SIZE];
    va_list args;
    va_start(args, format);
    vsnprintf(details, sizeof details, format, args);
    va_end(args);
    return lq_error_set(err, code, "%s%stensor '%.*s' %s", label ? label : "", label ? ": " : "",
                        NAME_ARG(name), details);
}

/* Finds the three fields of a tensor entry, each exactly once and nothing else. */
static int tensor_fields(const char *label, const cJSON *entry, const cJSON *fields[3],
                         struct lq_error *err) {
    static const char *const names[3] = {"dtype", "shape", "data_offsets"};
    const char *name = entry->string;
    if (!cJSON_IsObject(entry))
        return lq_safetensors_tensor_error(err, LQ_EFORMAT, label, name, "is not a JSON object");
    const cJSON *field;
    cJSON_ArrayForEach(field, entry) {
        int k = 0;
        while (k < 3 && strcmp(field->string, names[k]) != 0) k++;
        if (k == 3)
            return lq_safetensors_tensor_error(err, LQ_EFORMAT, label, name,
                                               "has unexpected field '%.*s'",
                                               NAME_ARG(field->string));
        if (fields[k])
            return lq_safetensors_tensor_error(err, LQ_EFORMAT, label, name, "has field '%s' twice",
                                               names[k]);
        fields[k] = field;
    }
    for (int k = 0; k < 3; k++) {
        if (!fields[k])
            return lq_safetensors_tensor_error(err, LQ_EFORMAT, label, name, "has no '%s' field",
                                               names[k]);
    }
    return LQ_OK;
}

/* Validates one header entry into *tensor (name left NULL on failure). */
static int parse_tensor(const struct lq_safetensors *file, const cJSON *entry,
                        struct lq_safetensors_tensor *tensor, struct lq_error *err) {
    const char *label = file->label, *name = entry->string;
    const cJSON *fields[3] = {NULL, NULL, NULL};
    int rc = tensor_fields(label, entry, fields, err);
    if (rc != LQ_OK) return rc;
    const cJSON *dtype = fields[0], *shape = fields[1], *offsets = fields[2];

    if (!cJSON_IsString(dtype) || !dtype->valuestring)
        return lq_safetensors_tensor_error(err, LQ_EFORMAT, label, name,
                                           "has a dtype that is not a string");
    if (lq_dtype_parse(dtype->valuestring, &tensor->dtype) != LQ_OK)
        return lq_safetensors_tensor_error(err, LQ_EUNSUPPORTED, label, name,
                                           "has unknown dtype '%.*s'",
                                           NAME_ARG(dtype->valuestring));

    if (!cJSON_IsArray(shape))
        return lq_safetensors_tensor_error(err, LQ_EFORMAT, label, name,
                                           "has a shape that is not an array");
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > LQ_SAFETENSORS_MAX_DIMS)
        return lq_safetensors_tensor_error(err, LQ_EUNSUPPORTED, label, name,
                                           "has %d dims; at most %d are supported", ndim,
                                           LQ_SAFETENSORS_MAX_DIMS);
    tensor->ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        const cJSON *dim = cJSON_GetArrayItem(shape, i);
        uint64_t value;
        if (!json_uint(dim, &value) && cJSON_IsNumber(dim))
            return lq_safetensors_tensor_error(
                err, LQ_EFORMAT, label, name,
                "has shape[%d] = %.17g; dims must be integers in [0, 2^53]", i, dim->valuedouble);
        if (!json_uint(dim, &value))
            return lq_safetensors_tensor_error(err, LQ_EFORMAT, label, name,
                                               "has shape[%d] that is not a number", i);
        tensor->shape[i] = (int64_t)value;
    }
    char shape_text[256];
    format_shape(ndim, tensor->shape, shape_text, sizeof shape_text);
    size_t element_size = lq_dtype_size(tensor->dtype);
    if (!lq_safetensors_shape_numel(ndim, tensor->shape, element_size, &tensor->numel))
        return lq_safetensors_tensor_error(err, LQ_EFORMAT, label, name,
                                           "has shape %s whose size overflows", shape_text);

    uint64_t begin, end;
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 ||
        !json_uint(cJSON_GetArrayItem(offsets, 0), &begin) ||
        !json_uint(cJSON_GetArrayItem(offsets, 1), &end))
        return lq_safetensors_tensor_error(
            err, LQ_EFORMAT, label, name,
            "has data_offsets that are not two integers in [0, 2^53]");
    unsigned long long first = begin, last = end, needed = tensor->numel * element_size;
    if (begin > end)
        return lq_safetensors_tensor_error(
            err, LQ_EFORMAT, label, name,
            "has data_offsets [%llu, %llu] that end before they begin", first, last);
    if (end - begin != needed)
        return lq_safetensors_tensor_error(
            err, LQ_EFORMAT, label, name,
            "has data_offsets [%llu, %llu] (%llu bytes) but shape %s of %s needs "
            "%llu bytes",
            first, last, last - first, shape_text, lq_dtype_name(tensor->dtype), needed);
    if (end > file->data_size)
        return lq_safetensors_tensor_error(
            err, LQ_EFORMAT, label, name,
            "has data_offsets [%llu, %llu] past the end of the %zu-byte data "
            "section",
            first, last, file->data_size);
    tensor->offset = begin;
    tensor->nbytes = needed;
    tensor->name = strdup(name);
    if (!tensor->name) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    return LQ_OK;
}

static int compare_tensor_ranges(const void *a, const void *b) {
    const struct lq_safetensors_tensor *x = *(const struct lq_safetensors_tensor *const *)a;
    const struct lq_safetensors_tensor *y = *(const struct lq_safetensors_tensor *const *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return (x->nbytes > y->nbytes) - (x->nbytes < y->nbytes);
}

/* Rejects two tensors sharing a byte: writing through one would silently change the other.
 * Empty tensors own no bytes; gaps between tensors are harmless and allowed. */
static int check_overlaps(const struct lq_safetensors *file, struct lq_error *err) {
    const struct lq_safetensors_tensor **order =
        malloc((file->count ? file->count : 1) * sizeof *order);
    if (!order) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", file->label);
    for (size_t i = 0; i < file->count; i++) order[i] = &file->tensors[i];
    qsort(order, file->count, sizeof *order, compare_tensor_ranges);
    const struct lq_safetensors_tensor *previous = NULL; /* the non-empty one ending last */
    int rc = LQ_OK;
    for (size_t i = 0; i < file->count && rc == LQ_OK; i++) {
        const struct lq_safetensors_tensor *t = order[i];
        if (t->nbytes == 0) continue;
        if (previous && t->offset < previous->offset + previous->nbytes)
            rc = lq_error_set(
                err, LQ_EFORMAT, "%s: tensors '%.*s' [%llu, %llu] and '%.*s' [%llu, %llu] overlap",
                file->label, NAME_ARG(previous->name), (unsigned long long)previous->offset,
                (unsigned long long)(previous->offset + previous->nbytes), NAME_ARG(t->name),
                (unsigned long long)t->offset, (unsigned long long)(t->offset + t->nbytes));
        if (!previous || t->offset + t->nbytes > previous->offset + previous->nbytes) previous = t;
    }
    free(order);
    return rc;
}

static int parse_entries(struct lq_safetensors *file, const cJSON *root, struct lq_error *err) {
    size_t entries = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, root) entries++;
    file->tensors = calloc(entries ? entries : 1, sizeof *file->tensors);
    file->by_name = calloc(entries ? entries : 1, sizeof *file->by_name);
    if (!file->tensors || !file->by_name)
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for %zu tensors", file->label,
                            entries);
    bool have_metadata = false;
    cJSON_ArrayForEach(item, root) {
        int rc;
        if (strcmp(item->string, "__metadata__") == 0) {
            if (have_metadata)
                return lq_error_set(err, LQ_EFORMAT, "%s: __metadata__ appears twice", file->label);
            have_metadata = true;
            rc = parse_metadata(file, item, err);
        } else {
            rc = parse_tensor(file, item, &file->tensors[file->count], err);
            if (rc == LQ_OK) file->count++;
        }
        if (rc != LQ_OK) return rc;
    }
    for (size_t i = 0; i < file->count; i++) file->by_name[i] = &file->tensors[i];
    qsort(file->by_name, file->count, sizeof *file->by_name, compare_tensor_names);
    for (size_t i = 1; i < file->count; i++) {
        if (strcmp(file->by_name[i - 1]->name, file->by_name[i]->name) == 0)
            return lq_error_set(err, LQ_EFORMAT, "%s: tensor '%.*s' appears twice in the header",
                                file->label, NAME_ARG(file->by_name[i]->name));
    }
    return check_overlaps(file, err);
}

/* Validates bytes[0..size) as a whole safetensors file and fills file's tables. */
static int parse_file(struct lq_safetensors *file, const uint8_t *bytes, size_t size,
                      struct lq_error *err) {
    const char *label = file->label;
    if (size < 8)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: file is %zu bytes, too short for the 8-byte header length", label,
                            size);
    uint64_t header_size = 0;
    for (int i = 0; i < 8; i++) header_size |= (uint64_t)bytes[i] << (8 * i);
    if (header_size > MAX_HEADER_BYTES)
        return lq_error_set(err, LQ_EFORMAT, "%s: header length %llu exceeds the %llu-byte limit",
                            label, (unsigned long long)header_size, MAX_HEADER_BYTES);
    if (header_size > size - 8)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: header length %llu runs past the end of the %zu-byte file", label,
                            (unsigned long long)header_size, size);
    const uint8_t *header = bytes + 8;
    size_t length = (size_t)header_size;
    size_t bad = utf8_invalid_at(header, length);
    if (bad < length)
        return lq_error_set(err, LQ_EFORMAT, "%s: header is not valid UTF-8 (byte %zu)", label,
                            bad);
    /* JSON forbids raw control characters; cJSON would take them (NUL included) as spaces. */
    for (size_t i = 0; i < length; i++) {
        if (header[i] < 0x20 && header[i] != '\t' && header[i] != '\n' && header[i] != '\r')
            return lq_error_set(err, LQ_EFORMAT,
                                "%s: header has control character 0x%02x at byte %zu", label,
                                header[i], i);
    }
    /* A terminated private copy: cJSON never reads past the header, whatever follows it. */
    char *text = malloc(length + 1);
    if (!text)
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for a %zu-byte header", label,
                            length);
    memcpy(text, header, length);
    text[length] = '\0';
    const char *end = NULL;
    cJSON *root = lq_json_parse_end(text, length, &end);
    size_t end_at = end ? (size_t)(end - text) : 0;
    free(text);
    if (!root)
        return lq_error_set(err, LQ_EFORMAT, "%s: header is not valid JSON (near byte %zu)", label,
                            end_at);
    int rc = LQ_OK;
    for (size_t i = end_at; i < length && rc == LQ_OK; i++) {
        if (header[i] != ' ' && header[i] != '\t' && header[i] != '\n' && header[i] != '\r')
            rc = lq_error_set(err, LQ_EFORMAT,
                              "%s: header has bytes after its JSON value (byte %zu)", label, i);
    }
    if (rc == LQ_OK && !cJSON_IsObject(root))
        rc = lq_error_set(err, LQ_EFORMAT, "%s: header is not a JSON object", label);
    if (rc == LQ_OK) {
        file->data = header + length;
        file->data_size = size - 8 - length;
        rc = parse_entries(file, root, err);
    }
    cJSON_Delete(root);
    return rc;
}

void lq_safetensors_close(struct lq_safetensors *file) {
    if (!file) return;
    for (size_t i = 0; i < file->count; i++) free((char *)file->tensors[i].name);
    for (size_t i = 0; i < file->metadata_count; i++) {
        free(file->metadata[i].key);
        free(file->metadata[i].value);
    }
    free(file->metadata);
    free(file->tensors);
    free(file->by_name);
    if (file->mapping) munmap(file->mapping, file->mapping_size);
    free(file->label);
    free(file);
}

static struct lq_safetensors *file_create(const char *label) {
    struct lq_safetensors *file = calloc(1, sizeof *file);
    if (!file) return NULL;
    file->label = strdup(label ? label : "<buffer>");
    if (!file->label) {
        free(file);
        return NULL;
    }
    return file;
}

int lq_safetensors_open_buffer(const void *data, size_t size, const char *label,
                               struct lq_safetensors **out, struct lq_error *err) {
    if (!out || (!data && size))
        return lq_error_set(err, LQ_EINVAL, "lq_safetensors_open_buffer: NULL argument");
    *out = NULL;
    struct lq_safetensors *file = file_create(label);
    if (!file) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label ? label : "<buffer>");
    int rc = parse_file(file, data, size, err);
    if (rc != LQ_OK) {
        lq_safetensors_close(file);
        return rc;
    }
    *out = file;
    return LQ_OK;
}

int lq_safetensors_open(const char *path, struct lq_safetensors **out, struct lq_error *err) {
    if (!path || !out) return lq_error_set(err, LQ_EINVAL, "lq_safetensors_open: NULL argument");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return lq_error_set(err, LQ_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat info;
    if (fstat(fd, &info) != 0) {
        int saved = errno;
        close(fd);
        return lq_error_set(err, LQ_EIO, "%s: cannot stat: %s", path, strerror(saved));
    }
    if (!S_ISREG(info.st_mode)) {
        close(fd);
        return lq_error_set(err, LQ_EIO, "%s: not a regular file", path);
    }
    if ((uint64_t)info.st_size > SIZE_MAX) {
        close(fd);
        return lq_error_set(err, LQ_EIO, "%s: file of %lld bytes does not fit in memory", path,
                            (long long)info.st_size);
    }
    struct lq_safetensors *file = file_create(path);
    if (!file) {
        close(fd);
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", path);
    }
    size_t size = (size_t)info.st_size;
    if (size > 0) { /* mmap refuses length 0; an empty file fails validation below */
        /* Private read-only mapping: the file is never written through it. If another process
         * truncates the file while it is open, reads fault (SIGBUS): replace files by rename. */
        void *mapping = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (mapping == MAP_FAILED) {
            int saved = errno;
            close(fd);
            lq_safetensors_close(file);
            return lq_error_set(err, LQ_EIO, "%s: cannot mmap %zu bytes: %s", path, size,
                                strerror(saved));
        }
        file->mapping = mapping;
        file->mapping_size = size;
    }
    close(fd); /* the mapping keeps the file alive */
    int rc = parse_file(file, file->mapping, size, err);
    if (rc != LQ_OK) {
        lq_safetensors_close(file);
        return rc;
    }
    *out = file;
    return LQ_OK;
}

size_t lq_safetensors_count(const struct lq_safetensors *file) {
    return file ? file->count : 0;
}

const struct lq_safetensors_tensor *lq_safetensors_tensor_at(const struct lq_safetensors *file,
                                                             size_t index) {
    return file && index < file->count ? &file->tensors[index] : NULL;
}

const struct lq_safetensors_tensor *lq_safetensors_find(const struct lq_safetensors *file,
                                                        const char *name) {
    if (!file || !name || file->count == 0) return NULL;
    struct lq_safetensors_tensor key = {.name = name};
    const struct lq_safetensors_tensor *key_pointer = &key;
    const struct lq_safetensors_tensor **found = bsearch(
        &key_pointer, file->by_name, file->count, sizeof *file->by_name, compare_tensor_names);
    return found ? *found : NULL;
}

const void *lq_safetensors_data(const struct lq_safetensors *file,
                                const struct lq_safetensors_tensor *tensor) {
    return file && tensor ? file->data + tensor->offset : NULL;
}

/* Drops the whole pages of a mapped file inside [begin, end) (no-op for a buffer). */
static void drop_range(const struct lq_safetensors *file, const uint8_t *begin_byte,
                       const uint8_t *end_byte) {
    if (!file->mapping) return;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t begin = ((uintptr_t)begin_byte + page - 1) / page * page, end = (uintptr_t)end_byte;
    end = end / page * page;
    if (end > begin) (void)madvise((void *)begin, end - begin, MADV_DONTNEED); /* a hint */
}

void lq_safetensors_drop_pages(const struct lq_safetensors *file,
                               const struct lq_safetensors_tensor *tensor) {
    if (!file || !tensor) return;
    const uint8_t *begin = file->data + tensor->offset;
    drop_range(file, begin, begin + tensor->nbytes);
}

const char *lq_safetensors_metadata(const struct lq_safetensors *file, const char *key) {
    if (!file || !key || file->metadata_count == 0) return NULL; /* bsearch wants a base */
    struct metadata_entry probe = {.key = (char *)key};
    const struct metadata_entry *found = bsearch(&probe, file->metadata, file->metadata_count,
                                                 sizeof *file->metadata, compare_metadata_keys);
    return found ? found->value : NULL;
}

int lq_safetensors_read_f32(const struct lq_safetensors *file, const char *name, float **out,
                            const struct lq_safetensors_tensor **tensor_out, struct lq_error *err) {
    if (!file || !name || !out)
        return lq_error_set(err, LQ_EINVAL, "lq_safetensors_read_f32: NULL argument");
    *out = NULL;
    const struct lq_safetensors_tensor *tensor = lq_safetensors_find(file, name);
    if (!tensor)
        return lq_error_set(err, LQ_ENOTFOUND, "%s: no tensor named '%.*s'", file->label,
                            NAME_ARG(name));
    if (tensor->dtype != LQ_DTYPE_F32 && tensor->dtype != LQ_DTYPE_F16 &&
        tensor->dtype != LQ_DTYPE_BF16)
        return lq_safetensors_tensor_error(err, LQ_EUNSUPPORTED, file->label, name,
                                           "is %s; only F32, F16 and BF16 read as float",
                                           lq_dtype_name(tensor->dtype));
    size_t numel = tensor->numel;
    float *values =
        numel <= SIZE_MAX / sizeof(float) ? malloc(numel ? numel * sizeof(float) : 1) : NULL;
    if (!values)
        return lq_safetensors_tensor_error(err, LQ_ENOMEM, file->label, name,
                                           "needs %zu floats: out of memory", numel);
    /* The data section may start at any address (buffers, odd headers): copy, never cast. */
    const uint8_t *source = file->data + tensor->offset;
    /* In chunks, each one's source pages dropped once copied: a 113 MB table and its copy were
     * resident together, the peak of a whole model load. */
    const size_t element = lq_dtype_size(tensor->dtype), chunk = ((size_t)4 << 20) / element;
    bool is_bf16 = tensor->dtype == LQ_DTYPE_BF16;
    for (size_t first = 0; first < numel; first += chunk) {
        size_t count = numel - first < chunk ? numel - first : chunk;
        const uint8_t *from = source + first * element;
        if (tensor->dtype == LQ_DTYPE_F32) {
            memcpy(values + first, from, count * sizeof(float));
        } else {
            for (size_t i = 0; i < count; i++) {
                uint16_t bits = (uint16_t)(from[2 * i] | (from[2 * i + 1] << 8));
                values[first + i] = is_bf16 ? lq_bf16_to_float(bits) : lq_fp16_to_float(bits);
            }
        }
        drop_range(file, from, from + count * element);
    }
    lq_safetensors_drop_pages(file, tensor);
    *out = values;
    if (tensor_out) *tensor_out = tensor;
    return LQ_OK;
}
