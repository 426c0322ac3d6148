#include "server/files.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/file_util.h"
#include "server/log.h"

struct lq_files {
    char dir[PATH_MAX];
    pthread_mutex_t lock; /* guards table and the directory's records */
    struct lq_file_info *table;
    size_t count, capacity;
};

const char *lq_files_dir(const struct lq_files *files) {
    return files->dir;
}

/* "file-" and 24 lowercase hex digits (96 random bits): the only names a path is made from. */
#define ID_LENGTH (5 + 24)

static int id_valid(const char *id, size_t length) {
    if (length != ID_LENGTH || strncmp(id, "file-", 5) != 0) return 0;
    for (size_t i = 5; i < length; i++)
        if (!strchr("0123456789abcdef", id[i])) return 0;
    return 1;
}

static void path_of(const struct lq_files *files, const char *id, const char *suffix, char *out,
                    size_t size) {
    snprintf(out, size, "%s/%s%s", files->dir, id, suffix);
}

static cJSON *record_json(const struct lq_file_info *f) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "id", f->id);
    cJSON_AddStringToObject(r, "object", "file");
    cJSON_AddNumberToObject(r, "bytes", (double)f->bytes);
    cJSON_AddNumberToObject(r, "created_at", (double)f->created_at);
    cJSON_AddStringToObject(r, "filename", f->filename);
    cJSON_AddStringToObject(r, "purpose", f->purpose);
    cJSON_AddStringToObject(r, "status", "processed");
    cJSON_AddStringToObject(r, "format", lq_dataset_format_name(f->format));
    cJSON_AddNumberToObject(r, "documents", (double)f->documents);
    return r;
}

/* Reads a record written by record_json; 0, or -1 when it is not one. */
static int record_parse(const char *text, size_t length, const char *id, struct lq_file_info *f) {
    cJSON *r = lq_json_parse(text, length);
    const cJSON *got_id = cJSON_GetObjectItemCaseSensitive(r, "id");
    const cJSON *bytes = cJSON_GetObjectItemCaseSensitive(r, "bytes");
    const cJSON *created = cJSON_GetObjectItemCaseSensitive(r, "created_at");
    const cJSON *filename = cJSON_GetObjectItemCaseSensitive(r, "filename");
    const cJSON *purpose = cJSON_GetObjectItemCaseSensitive(r, "purpose");
    const cJSON *format = cJSON_GetObjectItemCaseSensitive(r, "format");
    const cJSON *documents = cJSON_GetObjectItemCaseSensitive(r, "documents");
    int ok = cJSON_IsString(got_id) && strcmp(got_id->valuestring, id) == 0 &&
             cJSON_IsNumber(bytes) && bytes->valuedouble >= 0 && cJSON_IsNumber(created) &&
             cJSON_IsString(filename) && cJSON_IsString(purpose) && cJSON_IsString(format) &&
             cJSON_IsNumber(documents);
    if (ok) {
        memset(f, 0, sizeof *f);
        snprintf(f->id, sizeof f->id, "%s", id);
        snprintf(f->filename, sizeof f->filename, "%s", filename->valuestring);
        snprintf(f->purpose, sizeof f->purpose, "%s", purpose->valuestring);
        f->bytes = (size_t)bytes->valuedouble;
        f->created_at = (long long)created->valuedouble;
        f->documents = (size_t)documents->valuedouble;
        if (lq_dataset_format_parse(format->valuestring, &f->format)) f->format = LQ_DATASET_AUTO;
    }
    cJSON_Delete(r);
    return ok ? 0 : -1;
}

static int table_add(struct lq_files *files, const struct lq_file_info *f) {
    if (files->count == files->capacity) {
        size_t capacity = files->capacity ? 2 * files->capacity : 32;
        struct lq_file_info *grown = realloc(files->table, capacity * sizeof *grown);
        if (!grown) return LQ_ENOMEM;
        files->table = grown, files->capacity = capacity;
    }
    files->table[files->count++] = *f;
    return LQ_OK;
}

static struct lq_file_info *table_find(struct lq_files *files, const char *id) {
    for (size_t i = 0; id && i < files->count; i++)
        if (strcmp(files->table[i].id, id) == 0) return &files->table[i];
    return NULL;
}

/* Reads the records of files->dir; removes what a crash or an interrupted upload left. */
static int scan(struct lq_files *files, struct lq_error *err) {
    DIR *dir = opendir(files->dir);
    if (!dir) return lq_error_set(err, LQ_EIO, "%s: %s", files->dir, strerror(errno));
    char path[PATH_MAX + 512]; /* the directory (under PATH_MAX - 64) and a name */
    struct dirent *entry;
    for (int pass = 0; pass < 2; pass++) { /* records first, then what has no record */
        rewinddir(dir);
        while ((entry = readdir(dir))) {
            const char *name = entry->d_name;
            size_t length = strlen(name);
            int record = length > 5 && strcmp(name + length - 5, ".json") == 0;
            int leftover = strncmp(name, ".upload-", 8) == 0 || strstr(name, ".tmp-") != NULL;
            snprintf(path, sizeof path, "%s/%s", files->dir, name);
            if (pass == 0 && record && id_valid(name, length - 5)) {
                char id[LQ_FILE_ID_SIZE], content[PATH_MAX + 64];
                snprintf(id, sizeof id, "%.*s", (int)(length - 5), name);
                path_of(files, id, "", content, sizeof content);
                char *text = NULL;
                size_t text_length = 0;
                struct lq_file_info info;
                struct stat st;
                if (lq_file_read_all(path, 1 << 16, &text, &text_length, NULL) == 0 &&
                    record_parse(text, text_length, id, &info) == 0 && stat(content, &st) == 0 &&
                    S_ISREG(st.st_mode) && (size_t)st.st_size == info.bytes) {
                    if (table_add(files, &info)) {
                        free(text);
                        closedir(dir);
                        return lq_error_set(err, LQ_ENOMEM, "out of memory");
                    }
                } else {
                    lq_log(LQ_LOG_WARN, "file record dropped", LQ_LOG_STR("id", id),
                           LQ_LOG_STR("detail", "unreadable, or its bytes are missing or of "
                                                "another size"));
                    unlink(path);
                }
                free(text);
            } else if (pass == 1 &&
                       (leftover || (id_valid(name, length) && !table_find(files, name)))) {
                unlink(path); /* an upload cut short, or bytes whose record never got written */
            }
        }
    }
    closedir(dir);
    return LQ_OK;
}

int lq_files_open(const char *state_dir, struct lq_files **out, struct lq_error *err) {
    struct lq_files *files = calloc(1, sizeof *files);
    if (!files) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    if ((size_t)snprintf(files->dir, sizeof files->dir, "%s/files", state_dir) >=
        sizeof files->dir - 64) {
        free(files);
        return lq_error_set(err, LQ_EINVAL, "%s: path too long", state_dir);
    }
    if (mkdir(files->dir, 0700) && errno != EEXIST) {
        int saved = errno;
        free(files);
        return lq_error_set(err, LQ_EIO, "cannot create %s/files: %s", state_dir, strerror(saved));
    }
    pthread_mutex_init(&files->lock, NULL);
    int rc = scan(files, err);
    if (rc) {
        lq_files_free(files);
        return rc;
    }
    *out = files;
    return LQ_OK;
}

void lq_files_free(struct lq_files *files) {
    if (!files) return;
    pthread_mutex_destroy(&files->lock);
    free(files->table);
    free(files);
}

static void new_id(char id[LQ_FILE_ID_SIZE]) {
    unsigned char bytes[12];
    if (getrandom(bytes, sizeof bytes, 0) != (ssize_t)sizeof bytes) {
        struct timespec now; /* no entropy source: unique enough, and checked against the table */
        clock_gettime(CLOCK_REALTIME, &now);
        unsigned long long mix = (unsigned long long)now.tv_nsec * 0x9e3779b97f4a7c15ull ^
                                 ((unsigned long long)now.tv_sec << 20) ^
                                 (unsigned long long)getpid();
        memcpy(bytes, &mix, sizeof mix);
        memcpy(bytes + 8, &now.tv_nsec, 4);
    }
    memcpy(id, "file-", 5);
    for (size_t i = 0; i < sizeof bytes; i++) snprintf(id + 5 + 2 * i, 3, "%02x", bytes[i]);
}

static int sync_file(const char *path, size_t *size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    struct stat st;
    int rc = fstat(fd, &st) == 0 && fsync(fd) == 0 ? 0 : -1;
    if (!rc) *size = (size_t)st.st_size;
    close(fd);
    return rc;
}

int lq_files_add(struct lq_files *files, const char *temporary, const char *filename,
                 const char *purpose, const struct lq_dataset_summary *summary, cJSON **record,
                 struct lq_error *err) {
    struct lq_file_info info = {0};
    snprintf(info.filename, sizeof info.filename, "%s", filename);
    snprintf(info.purpose, sizeof info.purpose, "%s", purpose);
    info.format = summary ? summary->format : LQ_DATASET_AUTO;
    info.documents = summary ? summary->n_documents : 0;
    info.created_at = (long long)time(NULL);
    /* The slow part, outside the lock: the bytes reach the disk before their name does. */
    if (sync_file(temporary, &info.bytes))
        return lq_error_set(err, LQ_EIO, "cannot sync the upload: %s", strerror(errno));
    char content[PATH_MAX + 64], record_path[PATH_MAX + 64];
    pthread_mutex_lock(&files->lock);
    do new_id(info.id);
    while (table_find(files, info.id));
    path_of(files, info.id, "", content, sizeof content);
    path_of(files, info.id, ".json", record_path, sizeof record_path);
    cJSON *json = record_json(&info);
    char *text = cJSON_Print(json);
    int rc = LQ_OK;
    if (!text) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    } else if (rename(temporary, content) != 0) {
        rc = lq_error_set(err, LQ_EIO, "cannot store the upload: %s", strerror(errno));
    } else {
        struct lq_error local = {0};
        if (lq_file_write_atomic(record_path, text, strlen(text), &local))
            rc = local.code;
        else if (table_add(files, &info))
            rc = lq_error_set(&local, LQ_ENOMEM, "out of memory");
        if (rc) {
            lq_error_set(err, rc, "%s", local.message);
            unlink(record_path);
            if (rename(content, temporary) != 0) unlink(content); /* back where it was */
        }
    }
    pthread_mutex_unlock(&files->lock);
    cJSON_free(text);
    if (!rc && record)
        *record = json;
    else
        cJSON_Delete(json);
    if (!rc)
        lq_log(LQ_LOG_INFO, "file stored", LQ_LOG_STR("id", info.id),
               LQ_LOG_STR("filename", info.filename), LQ_LOG_INT("bytes", (long long)info.bytes),
               LQ_LOG_STR("format", lq_dataset_format_name(info.format)),
               LQ_LOG_INT("documents", (long long)info.documents));
    return rc;
}

cJSON *lq_files_get(struct lq_files *files, const char *id) {
    pthread_mutex_lock(&files->lock);
    const struct lq_file_info *f = table_find(files, id);
    cJSON *json = f ? record_json(f) : NULL;
    pthread_mutex_unlock(&files->lock);
    return json;
}

static int order_by_creation(const void *a, const void *b) {
    const struct lq_file_info *x = a, *y = b;
    if (x->created_at != y->created_at) return x->created_at < y->created_at ? -1 : 1;
    return strcmp(x->id, y->id);
}

cJSON *lq_files_list(struct lq_files *files, const char *purpose, const char *after, size_t limit,
                     int ascending) {
    pthread_mutex_lock(&files->lock);
    size_t n = 0;
    struct lq_file_info *copy = malloc((files->count + 1) * sizeof *copy);
    for (size_t i = 0; copy && i < files->count; i++)
        if (!purpose || strcmp(files->table[i].purpose, purpose) == 0) copy[n++] = files->table[i];
    int after_known = !after || table_find(files, after);
    pthread_mutex_unlock(&files->lock);
    if (!copy || !after_known) {
        free(copy);
        return NULL;
    }
    qsort(copy, n, sizeof *copy, order_by_creation);
    if (!ascending)
        for (size_t i = 0; i < n / 2; i++) {
            struct lq_file_info swap = copy[i];
            copy[i] = copy[n - 1 - i], copy[n - 1 - i] = swap;
        }
    size_t start = 0;
    if (after) { /* after a file of another purpose: from where it would stand */
        struct lq_file_info key = {0};
        pthread_mutex_lock(&files->lock);
        const struct lq_file_info *found = table_find(files, after);
        if (found) key = *found;
        pthread_mutex_unlock(&files->lock);
        while (start < n && (ascending ? order_by_creation(&copy[start], &key) <= 0
                                       : order_by_creation(&copy[start], &key) >= 0))
            start++;
    }
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(root, "data");
    size_t end = n - start > limit ? start + limit : n;
    for (size_t i = start; i < end; i++) cJSON_AddItemToArray(data, record_json(&copy[i]));
    cJSON_AddBoolToObject(root, "has_more", end < n);
    if (end > start) {
        cJSON_AddStringToObject(root, "first_id", copy[start].id);
        cJSON_AddStringToObject(root, "last_id", copy[end - 1].id);
    }
    free(copy);
    return root;
}

int lq_files_delete(struct lq_files *files, const char *id, struct lq_error *err) {
    char content[PATH_MAX + 64], record_path[PATH_MAX + 64];
    pthread_mutex_lock(&files->lock);
    struct lq_file_info *f = table_find(files, id);
    int rc = LQ_OK;
    if (!f) {
        rc = lq_error_set(err, LQ_ENOTFOUND, "the file '%s' does not exist", id ? id : "");
    } else {
        path_of(files, f->id, ".json", record_path, sizeof record_path);
        path_of(files, f->id, "", content, sizeof content);
        if (unlink(record_path) != 0 && errno != ENOENT) {
            rc = lq_error_set(err, LQ_EIO, "cannot delete %s: %s", id, strerror(errno));
        } else {
            unlink(content); /* if this fails, the next start removes it (it has no record) */
            *f = files->table[--files->count];
        }
    }
    pthread_mutex_unlock(&files->lock);
    if (!rc) lq_log(LQ_LOG_INFO, "file deleted", LQ_LOG_STR("id", id));
    return rc;
}

int lq_files_resolve(struct lq_files *files, const char *id, char *path, size_t path_size,
                     struct lq_file_info *info, struct lq_error *err) {
    pthread_mutex_lock(&files->lock);
    const struct lq_file_info *f = table_find(files, id);
    if (f) {
        path_of(files, f->id, "", path, path_size);
        if (info) *info = *f;
    }
    pthread_mutex_unlock(&files->lock);
    if (!f)
        return lq_error_set(err, LQ_ENOTFOUND,
                            "the file '%s' does not exist (upload it with "
                            "POST /v1/files)",
                            id ? id : "");
    return LQ_OK;
}

int lq_files_open_content(struct lq_files *files, const char *id, int *fd, size_t *size,
                          struct lq_file_info *info) {
    char path[PATH_MAX + 64];
    pthread_mutex_lock(&files->lock);
    const struct lq_file_info *f = table_find(files, id);
    int rc = LQ_ENOTFOUND;
    if (f) {
        path_of(files, f->id, "", path, sizeof path);
        *fd = open(path, O_RDONLY | O_CLOEXEC);
        *size = f->bytes;
        if (info) *info = *f;
        rc = *fd >= 0 ? LQ_OK : LQ_EIO;
    }
    pthread_mutex_unlock(&files->lock);
    return rc;
}
