/* A directory written whole or not at all: built in DIR.tmp-XXXXXX beside DIR by a fill
 * callback, synced, then renamed into place; an existing DIR is replaced only with force and
 * only when it is empty or of the writer's own kind (so --force on a wrong path cannot delete
 * someone's data), moved aside first and put back if the rename fails. lqd compress (LQ model
 * directories) and lqd import (HF directories from GGUF files) write through it. */
#ifndef LQ_DIR_WRITE_H
#define LQ_DIR_WRITE_H

#include "core/error.h"

struct lq_dir_kind {
    const char *force_replaces;       /* in "DIR already exists (--force replaces %s)" */
    const char *name;                 /* in "DIR exists and is not %s: not replacing it" */
    int (*is_ours)(const char *path); /* 1 when an existing directory may be replaced */
};

/* Whether dir can be written: its parent exists, and dir does not or may be replaced. */
int lq_dir_check_destination(const char *dir, int force, const struct lq_dir_kind *kind,
                             struct lq_error *err);

/* Checks dir as above, then fills a fresh temporary directory with fill(tmp, context, err)
 * and renames it into place. On any error nothing is left behind and an old dir is intact. */
int lq_dir_write_atomic(const char *dir, int force, const struct lq_dir_kind *kind,
                        int (*fill)(const char *tmp, void *context, struct lq_error *err),
                        void *context, struct lq_error *err);

/* 1 when DIR/model.safetensors opens and its header carries the metadata key: how a writer
 * recognises its own directories (an is_ours callback). */
int lq_dir_model_has_metadata(const char *dir, const char *key);

/* Removes path and, when it is a directory, everything under it, never following links.
 * 0 (also when path does not exist) or -1. */
int lq_remove_tree(const char *path);

/* fsync of a directory, so that renames in it survive a crash (best effort). */
void lq_sync_dir(const char *path);

#endif
