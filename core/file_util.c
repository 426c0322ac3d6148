#include "file_util.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int lq_path_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int lq_path_is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int lq_file_read_all(const char *path, size_t max_bytes, char **data, size_t *length,
                     struct lq_error *err) {
    *data = NULL;
    *length = 0;
    FILE *file = fopen(path, "rb");
    if (!file) return lq_error_set(err, LQ_EIO, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(file), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(file);
        return lq_error_set(err, LQ_EIO, "%s: not a regular file", path);
    }
    if ((size_t)st.st_size > max_bytes) {
        fclose(file);
        return lq_error_set(err, LQ_EFORMAT, "%s: %lld bytes is larger than the %zu allowed", path,
                            (long long)st.st_size, max_bytes);
    }
    char *buffer = malloc((size_t)st.st_size + 1);
    if (!buffer) {
        fclose(file);
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", path);
    }
    size_t got = fread(buffer, 1, (size_t)st.st_size, file);
    int failed = ferror(file);
    fclose(file);
    if (failed || got != (size_t)st.st_size) {
        free(buffer);
        return lq_error_set(err, LQ_EIO, "%s: short read", path);
    }
    buffer[got] = '\0';
    *data = buffer;
    *length = got;
    return LQ_OK;
}

static int sync_directory_of(const char *path) {
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", path);
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int lq_file_write_atomic(const char *path, const void *data, size_t length, struct lq_error *err) {
    char temporary[4096];
    if ((size_t)snprintf(temporary, sizeof temporary, "%s.tmp-XXXXXX", path) >= sizeof temporary)
        return lq_error_set(err, LQ_EINVAL, "%s: path too long", path);
    int fd = mkstemp(temporary);
    if (fd < 0) return lq_error_set(err, LQ_EIO, "%s: %s", path, strerror(errno));
    const char *bytes = data;
    size_t written = 0;
    while (written < length) {
        ssize_t n = write(fd, bytes + written, length - written);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        written += (size_t)n;
    }
    int saved = errno;
    /* mkstemp creates 0600; give the file the usual permissions of a new file. */
    mode_t mask = umask(0);
    umask(mask);
    int ok = written == length && fchmod(fd, 0666 & ~mask) == 0 && fsync(fd) == 0;
    if (!ok && written == length) saved = errno;
    if (close(fd) != 0 && ok) ok = 0, saved = errno;
    if (!ok || rename(temporary, path) != 0) {
        if (ok) saved = errno;
        unlink(temporary);
        return lq_error_set(err, LQ_EIO, "%s: %s", path, strerror(saved));
    }
    sync_directory_of(path);
    return LQ_OK;
}

int lq_file_copy(const char *source, const char *destination, struct lq_error *err) {
    char *data;
    size_t length;
    int rc = lq_file_read_all(source, (size_t)1 << 32, &data, &length, err);
    if (rc) return rc;
    rc = lq_file_write_atomic(destination, data, length, err);
    free(data);
    return rc;
}

static pthread_mutex_t json_lock = PTHREAD_MUTEX_INITIALIZER;

struct cJSON *lq_json_parse_end(const char *text, size_t length, const char **end) {
    pthread_mutex_lock(&json_lock);
    cJSON *root = cJSON_ParseWithLengthOpts(text, length, end, 0);
    pthread_mutex_unlock(&json_lock);
    return root;
}

struct cJSON *lq_json_parse(const char *text, size_t length) {
    return lq_json_parse_end(text, length, NULL);
}
