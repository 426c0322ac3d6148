#include "core/dir_write.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/file_util.h"
#include "core/safetensors.h"

#define PATH_SIZE 4096

int lq_remove_tree(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(st.st_mode)) return unlink(path);
    DIR *dir = opendir(path);
    if (!dir) return -1;
    int rc = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
        char child[PATH_SIZE];
        if ((size_t)snprintf(child, sizeof child, "%s/%s", path, entry->d_name) >= sizeof child ||
            lq_remove_tree(child) != 0)
            rc = -1;
    }
    closedir(dir);
    return rmdir(path) != 0 ? -1 : rc;
}

int lq_dir_model_has_metadata(const char *dir, const char *key) {
    char file[PATH_SIZE + 32];
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    struct lq_safetensors *st;
    if (lq_safetensors_open(file, &st, NULL) != 0) return 0;
    int yes = lq_safetensors_metadata(st, key) != NULL;
    lq_safetensors_close(st);
    return yes;
}

void lq_sync_dir(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return;
    fsync(fd);
    close(fd);
}

static int directory_is_empty(const char *path) {
    DIR *dir = opendir(path);
    if (!dir) return 0;
    struct dirent *entry;
    int empty = 1;
    while (empty && (entry = readdir(dir)) != NULL)
        if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0) empty = 0;
    closedir(dir);
    return empty;
}

/* dir without trailing slashes into path, and the directory holding it ("/" for "/x", "."
 * for a bare name) into parent; both PATH_SIZE bytes. */
static int split_dir(const char *dir, char *path, char *parent, struct lq_error *err) {
    size_t length = strlen(dir);
    while (length > 1 && dir[length - 1] == '/') length--;
    if (length == 0) return lq_error_set(err, LQ_EINVAL, "empty output directory name");
    if (length + 32 >= PATH_SIZE) return lq_error_set(err, LQ_EINVAL, "%s: path too long", dir);
    memcpy(path, dir, length);
    path[length] = '\0';
    snprintf(parent, PATH_SIZE, "%s", path);
    char *slash = strrchr(parent, '/');
    if (slash == parent)
        parent[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(parent, PATH_SIZE, ".");
    return LQ_OK;
}

int lq_dir_check_destination(const char *dir, int force, const struct lq_dir_kind *kind,
                             struct lq_error *err) {
    char path[PATH_SIZE], parent[PATH_SIZE];
    int rc = split_dir(dir, path, parent, err);
    if (rc) return rc;
    if (!lq_path_is_dir(parent))
        return lq_error_set(err, LQ_EINVAL, "%s: parent directory %s does not exist", path, parent);
    struct stat st;
    if (lstat(path, &st) != 0) return LQ_OK;
    if (!force)
        return lq_error_set(err, LQ_EINVAL, "%s already exists (--force replaces %s)", path,
                            kind->force_replaces);
    if (!S_ISDIR(st.st_mode) || (!directory_is_empty(path) && !kind->is_ours(path)))
        return lq_error_set(err, LQ_EINVAL, "%s exists and is not %s: not replacing it", path,
                            kind->name);
    return LQ_OK;
}

int lq_dir_write_atomic(const char *dir, int force, const struct lq_dir_kind *kind,
                        int (*fill)(const char *tmp, void *context, struct lq_error *err),
                        void *context, struct lq_error *err) {
    char path[PATH_SIZE], parent[PATH_SIZE], tmp[PATH_SIZE + 16], old[PATH_SIZE + 16] = "";
    int rc = split_dir(dir, path, parent, err);
    if (rc || (rc = lq_dir_check_destination(path, force, kind, err))) return rc;
    snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", path);
    if (!mkdtemp(tmp)) return lq_error_set(err, LQ_EIO, "%s: %s", tmp, strerror(errno));
    chmod(tmp, 0755); /* mkdtemp makes it 0700; a model directory is shared like any other */
    if ((rc = fill(tmp, context, err))) {
        lq_remove_tree(tmp);
        return rc;
    }
    lq_sync_dir(tmp);
    struct stat st;
    int replacing = lstat(path, &st) == 0;
    if (replacing) {
        /* The old directory goes aside (renamed onto a fresh empty one, which rename allows
         * for directories), the new one into place; if that fails, the old one comes back. */
        snprintf(old, sizeof old, "%s.old-XXXXXX", path);
        if (!mkdtemp(old) || rename(path, old) != 0) {
            rc = lq_error_set(err, LQ_EIO, "%s: cannot move the old directory aside: %s", path,
                              strerror(errno));
            rmdir(old);
            lq_remove_tree(tmp);
            return rc;
        }
    }
    if (rename(tmp, path) != 0) {
        rc = lq_error_set(err, LQ_EIO, "%s: %s", path, strerror(errno));
        if (replacing) rename(old, path);
        lq_remove_tree(tmp);
        return rc;
    }
    lq_sync_dir(parent);
    if (replacing && lq_remove_tree(old) != 0)
        return lq_error_set(err, LQ_EIO, "%s written, but the old copy %s could not be removed",
                            path, old);
    return LQ_OK;
}
