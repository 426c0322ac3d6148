/* Compress jobs through a launcher (lqd serve --compress-launcher "mpirun -n 4 --hostfile F"):
 * instead of compressing in the daemon, a job runs
 *     <launcher words...> <this lqd executable> compress --model SRC ... --progress-json --json
 * as a child process in its own process group, reads its progress lines (stderr, one JSON
 * object per line) into the job's progress and events, and builds the job's result from the
 * report it prints on stdout, so that a client sees what an in-process job gives (plus a
 * "launcher" field). No shell runs: the launcher is split into words here, with the shell's
 * quoting rules and none of its expansions. */
#ifndef LQ_JOB_LAUNCHER_H
#define LQ_JOB_LAUNCHER_H

#include <stddef.h>

#include "core/compress.h"
#include "core/error.h"
#include "server/jobs.h"

struct cJSON;

#define LQ_LAUNCHER_MAX 1024 /* characters of a launcher command line */

/* Splits command into words as a POSIX shell would without running one: blanks separate
 * words; '...' quotes everything, "..." everything but \" \\ \$ \` (which a backslash
 * escapes), and a backslash outside quotes escapes the next character. What a shell would
 * expand or interpret ($, `, |, &, ;, <, >, (, ), a word starting with ~ or #) is refused,
 * as are an unterminated quote, no word at all, and more than LQ_LAUNCHER_MAX characters.
 * *words is one allocation (free(*words)), NULL-terminated; *count the words. */
int lq_launcher_split(const char *command, char ***words, size_t *count, struct lq_error *err);

/* The path execv would run for program (the first word): as given when it holds a '/', else
 * found in $PATH. LQ_ENOTFOUND when no executable file is there. */
int lq_launcher_resolve(const char *program, char *path, size_t size, struct lq_error *err);

/* How a launched run talks to the job table (jobs.c implements them under its lock, the same
 * functions an in-process compression calls). */
struct lq_job_launcher_hooks {
    void *context;
    int (*stop_requested)(void *context); /* 0: go on, 1: cancelled, 2: the daemon is stopping */
    int (*progress)(void *context, const struct lq_compress_progress *progress);
    int (*fisher_progress)(void *context, int done, int total);
    void (*warning)(void *context, const char *message);
    void (*event)(void *context, const char *type, struct cJSON *extra); /* appends; takes extra */
};

/* Runs the compress job spec (id: its name in logs) through launcher, writing spec->output
 * (--force when force: an earlier attempt may have written it), the error table cached in
 * cache_dir (NULL: the CLI's default). A cancel or a daemon shutdown sends SIGTERM to the
 * child's process group, SIGKILL 10 s later if it is still there; when the launcher exits,
 * whatever is left of its group is killed. Returns the status to record: SUCCEEDED (*result
 * set, *wrote_output 1), FAILED (err: the exit status or signal and the child's last stderr
 * lines), CANCELLED (*wrote_output 1 when the child finished writing before it stopped) or
 * QUEUED when the daemon is stopping. */
enum lq_job_status lq_job_launcher_run(const char *launcher, const char *id,
                                       const struct lq_job_spec *spec, const char *cache_dir,
                                       int force, const struct lq_job_launcher_hooks *hooks,
                                       struct cJSON **result, int *wrote_output,
                                       struct lq_error *err);

#endif
