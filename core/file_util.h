/* Small file helpers: whole-file reads with a size limit, atomic writes (temporary file in
 * the same directory, fsync, rename, fsync of the directory), and thread-safe JSON parsing. */
#ifndef LQ_FILE_UTIL_H
#define LQ_FILE_UTIL_H

#include <stddef.h>

#include "core/error.h"

struct cJSON;

/* Reads path into a malloc'ed NUL-terminated buffer (the caller frees it). Files larger than
 * max_bytes are refused (LQ_EFORMAT). */
int lq_file_read_all(const char *path, size_t max_bytes, char **data, size_t *length,
                     struct lq_error *err);

/* Replaces path with data atomically: readers see the old file or the new one, never a part. */
int lq_file_write_atomic(const char *path, const void *data, size_t length, struct lq_error *err);

/* Copies a file atomically. */
int lq_file_copy(const char *source, const char *destination, struct lq_error *err);

/* 1 when path exists and is a directory / a regular file. */
int lq_path_is_dir(const char *path);
int lq_path_is_file(const char *path);

/* cJSON_ParseWithLength under a process-wide lock (cJSON's error pointer is a global).
 * With end non-NULL, *end receives where parsing stopped (cJSON_ParseWithLengthOpts). */
struct cJSON *lq_json_parse(const char *text, size_t length);
struct cJSON *lq_json_parse_end(const char *text, size_t length, const char **end);

#endif
