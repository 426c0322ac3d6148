/* The daemon's uploaded files (OpenAI's files API; finetune jobs read their training data from
 * them): STATE_DIR/files/<id> holds the bytes exactly as uploaded and <id>.json the record
 * {"id", "object": "file", "bytes", "created_at", "filename", "purpose", "status", and lqd's
 * "format" and "documents"}. A file is added by renaming a complete temporary file of the same
 * directory into place, then writing its record atomically; it is deleted record first. So a
 * crash leaves a file whole or absent: at open, bytes without a record, temporary files and
 * records whose bytes are missing or of another size are removed (the last with a warning).
 * A table in memory, guarded by a mutex, answers every read; handlers on any thread may call. */
#ifndef LQ_FILES_H
#define LQ_FILES_H

#include <stddef.h>

#include "core/dataset.h"
#include "core/error.h"

struct cJSON;
struct lq_files;

#define LQ_FILE_ID_SIZE 32 /* holds an id: "file-" and 24 hex digits */

struct lq_file_info {
    char id[LQ_FILE_ID_SIZE];
    char filename[256];
    char purpose[32];
    size_t bytes;
    long long created_at; /* Unix seconds */
    enum lq_dataset_format format;
    size_t documents;
};

/* Opens (creating) state_dir/files and reads its records. */
int lq_files_open(const char *state_dir, struct lq_files **out, struct lq_error *err);
void lq_files_free(struct lq_files *files);
/* state_dir/files: where uploads are written as they arrive (lq_http_server_options.upload_dir),
 * on the same file system, so that lq_files_add can rename them. */
const char *lq_files_dir(const struct lq_files *files);

/* Adds the complete file at temporary (inside lq_files_dir; synced, then renamed to its id):
 * filename as the client named it, purpose, and the dataset's shape as validated. *record
 * (optional) receives its JSON. On error temporary is left where it was. */
int lq_files_add(struct lq_files *files, const char *temporary, const char *filename,
                 const char *purpose, const struct lq_dataset_summary *summary,
                 struct cJSON **record, struct lq_error *err);

/* A file's record (the caller frees it), or NULL for an unknown id. */
struct cJSON *lq_files_get(struct lq_files *files, const char *id);
/* {"object": "list", "data": [records], "has_more"}, ordered by created_at (then id), oldest
 * first when ascending; only purpose's when purpose is non-NULL; those after the file `after`
 * (NULL: from the start); at most limit. NULL when after is an unknown id. */
struct cJSON *lq_files_list(struct lq_files *files, const char *purpose, const char *after,
                            size_t limit, int ascending);
/* Deletes a file (record, then bytes). LQ_ENOTFOUND for an unknown id. A reader that opened
 * it before keeps reading. */
int lq_files_delete(struct lq_files *files, const char *id, struct lq_error *err);

/* For jobs ("training_file": "file-..."): the path of a file's bytes and (info, optional) its
 * record. LQ_ENOTFOUND with a message for an unknown id. The file may be deleted afterwards:
 * open it soon and keep it open. */
int lq_files_resolve(struct lq_files *files, const char *id, char *path, size_t path_size,
                     struct lq_file_info *info, struct lq_error *err);
/* Opens a file's bytes for reading (*fd, *size); under the table's lock, so a delete cannot
 * come between finding and opening. LQ_ENOTFOUND for an unknown id. */
int lq_files_open_content(struct lq_files *files, const char *id, int *fd, size_t *size,
                          struct lq_file_info *info);

#endif
