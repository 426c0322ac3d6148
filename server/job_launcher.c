/* Compress jobs through a launcher (see job_launcher.h): the command line, the child process
 * and its process group, its progress lines and its report. */
#define _GNU_SOURCE /* pipe2, close_range's system call number */
#include "server/job_launcher.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/file_util.h"
#include "server/log.h"

#define KILL_AFTER 10.0          /* seconds between SIGTERM and SIGKILL of a stopping child */
#define PIPES_AFTER_EXIT 2.0     /* seconds to drain the pipes once the launcher has exited */
#define REPORT_LIMIT (64u << 20) /* bytes of stdout kept: the report is one line of JSON */
#define LINE_SIZE 8192           /* a stderr line longer than this is cut */
#define TAIL_LINES 6             /* stderr lines kept for the error message */
#define TAIL_LINE_SIZE 240

/* ---------- the command line ---------- */

int lq_launcher_split(const char *command, char ***words, size_t *count, struct lq_error *err) {
    *words = NULL, *count = 0;
    size_t length = strlen(command);
    if (length > LQ_LAUNCHER_MAX)
        return lq_error_set(err, LQ_EINVAL, "is longer than %d characters", LQ_LAUNCHER_MAX);
    /* At most one word per two characters (plus one), and the words' bytes no more than the
     * command's: the pointers, then the words, in one block. */
    size_t max_words = length / 2 + 2;
    char **list = malloc((max_words + 1) * sizeof *list + length + max_words + 1);
    if (!list) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    char *out = (char *)(list + max_words + 1);
    size_t n = 0;
    int in_word = 0;
    const char *p = command;
    while (*p) {
        char c = *p;
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            if (in_word) *out++ = '\0', in_word = 0;
            p++;
            continue;
        }
        if (!in_word) {
            if (c == '~' || c == '#') {
                free(list);
                return lq_error_set(err, LQ_EINVAL,
                                    "a word starts with '%c' (at %zu), which a shell would "
                                    "expand; no shell runs the launcher: write it out or quote it",
                                    c, (size_t)(p - command) + 1);
            }
            list[n++] = out, in_word = 1;
        }
        if (c == '\'') {
            const char *end = strchr(p + 1, '\'');
            if (!end) {
                free(list);
                return lq_error_set(err, LQ_EINVAL, "unterminated ' (at %zu)",
                                    (size_t)(p - command) + 1);
            }
            memcpy(out, p + 1, (size_t)(end - p - 1));
            out += end - p - 1;
            p = end + 1;
        } else if (c == '"') {
            const char *q = p + 1;
            for (; *q && *q != '"'; q++) {
                if (*q == '\\' && q[1] && strchr("\"\\$`\n", q[1])) {
                    if (q[1] != '\n') *out++ = q[1];
                    q++;
                } else if (*q == '$' || *q == '`') {
                    free(list);
                    return lq_error_set(
                        err, LQ_EINVAL,
                        "'%c' (at %zu) would be expanded by a shell; no shell "
                        "runs the launcher: write the value out, or put it in '...'",
                        *q, (size_t)(q - command) + 1);
                } else {
                    *out++ = *q;
                }
            }
            if (!*q) {
                free(list);
                return lq_error_set(err, LQ_EINVAL, "unterminated \" (at %zu)",
                                    (size_t)(p - command) + 1);
            }
            p = q + 1;
        } else if (c == '\\') {
            if (!p[1]) {
                free(list);
                return lq_error_set(err, LQ_EINVAL, "ends with a lone backslash");
            }
            if (p[1] != '\n') *out++ = p[1];
            p += 2;
        } else if (strchr("$`|&;<>()", c)) {
            free(list);
            return lq_error_set(err, LQ_EINVAL,
                                "'%c' (at %zu) is shell syntax; no shell runs the launcher "
                                "(in '...' it passes as it is)",
                                c, (size_t)(p - command) + 1);
        } else {
            *out++ = c;
            p++;
        }
    }
    if (in_word) *out = '\0';
    if (n == 0) {
        free(list);
        return lq_error_set(err, LQ_EINVAL, "is empty: it names no program");
    }
    list[n] = NULL;
    *words = list, *count = n;
    return LQ_OK;
}

static int executable_file(const char *path) {
    struct stat info;
    return stat(path, &info) == 0 && S_ISREG(info.st_mode) && access(path, X_OK) == 0;
}

int lq_launcher_resolve(const char *program, char *path, size_t size, struct lq_error *err) {
    if (strchr(program, '/')) {
        snprintf(path, size, "%s", program);
        if (executable_file(path)) return LQ_OK;
        return lq_error_set(err, LQ_ENOTFOUND, "'%s' is not an executable file", program);
    }
    const char *search = getenv("PATH");
    if (!search || !*search) search = "/usr/local/bin:/usr/bin:/bin";
    for (const char *dir = search; dir;) {
        const char *colon = strchr(dir, ':');
        int dir_length = colon ? (int)(colon - dir) : (int)strlen(dir);
        if ((size_t)snprintf(path, size, "%.*s/%s", dir_length, dir_length ? dir : ".", program) <
                size &&
            executable_file(path))
            return LQ_OK;
        dir = colon ? colon + 1 : NULL;
    }
    return lq_error_set(err, LQ_ENOTFOUND, "'%s' is not found in PATH (%s)", program, search);
}

/* ---------- the child's argv ---------- */

struct argv_builder {
    char **words;
    size_t count, capacity;
    int failed;
};

static void add_word(struct argv_builder *b, const char *word) {
    if (b->failed) return;
    if (b->count + 2 > b->capacity) {
        size_t capacity = b->capacity ? b->capacity * 2 : 64;
        char **grown = realloc(b->words, capacity * sizeof *grown);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->words = grown, b->capacity = capacity;
    }
    if (!(b->words[b->count] = strdup(word)))
        b->failed = 1;
    else
        b->words[++b->count] = NULL;
}

static void add_format(struct argv_builder *b, const char *format, double value) {
    char text[64];
    snprintf(text, sizeof text, format, value);
    add_word(b, text);
}

static void free_words(struct argv_builder *b) {
    for (size_t i = 0; i < b->count; i++) free(b->words[i]);
    free(b->words);
}

/* This lqd executable (what /proc/self/exe names; an upgrade that replaced the file runs the
 * new one). */
static int self_executable(char *path, size_t size, struct lq_error *err) {
    ssize_t n = readlink("/proc/self/exe", path, size - 1);
    if (n <= 0)
        return lq_error_set(err, LQ_EIO, "cannot find the lqd executable: /proc/self/exe: %s",
                            strerror(errno));
    path[n] = '\0';
    const char *deleted = " (deleted)";
    size_t length = strlen(path), tail = strlen(deleted);
    if (length > tail && strcmp(path + length - tail, deleted) == 0) path[length - tail] = '\0';
    return LQ_OK;
}

/* launcher words, this lqd, compress and the job's options (as run_compress in jobs.c passes
 * them to lq_compress; the tokenizer is the CLI's default, the one found beside the source). */
static int build_argv(char **launcher_words, size_t n_launcher, const char *executable,
                      const struct lq_job_spec *s, const char *cache_dir, int force,
                      struct argv_builder *b, struct lq_error *err) {
    for (size_t i = 0; i < n_launcher; i++) add_word(b, launcher_words[i]);
    add_word(b, executable);
    add_word(b, "compress");
    add_word(b, "--model"), add_word(b, s->source);
    add_word(b, "--bits"), add_format(b, "%.17g", s->target_bits);
    add_word(b, "--rank"), add_format(b, "%.0f", (double)s->rank);
    add_word(b, "--out"), add_word(b, s->output);
    add_word(b, "--configs"), add_word(b, s->configs);
    add_word(b, "--iters"), add_format(b, "%.0f", (double)s->iters);
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", s->seed);
    add_word(b, "--seed"), add_word(b, seed);
    if (cache_dir) add_word(b, "--cache-dir"), add_word(b, cache_dir);
    if (s->fisher.file[0]) {
        /* The calibration text linked into the job's directory, and the draw of the job: the
         * CLI draws as jobs.c's fisher_estimate does, so F and its cache key are the same. */
        snprintf(seed, sizeof seed, "%llu", s->fisher.seed);
        add_word(b, "--fisher"), add_word(b, s->fisher.path);
        add_word(b, "--fisher-samples"), add_format(b, "%.0f", (double)s->fisher.samples);
        add_word(b, "--fisher-seq-len"), add_format(b, "%.0f", (double)s->fisher.seq_len);
        add_word(b, "--fisher-seed"), add_word(b, seed);
    }
    if (force) add_word(b, "--force");
    add_word(b, "--progress-json");
    add_word(b, "--json");
    return b->failed ? lq_error_set(err, LQ_ENOMEM, "out of memory") : LQ_OK;
}

/* ---------- the child ---------- */

/* Between fork and exec only async-signal-safe calls: the child's own process group (so that
 * a signal reaches every process the launcher starts), SIGTERM when the daemon's job thread
 * dies (the launcher passes it on: mpirun to its ranks), default signal handling (the daemon
 * ignores SIGPIPE), stdin from /dev/null, stdout and stderr into the pipes, nothing else
 * open. An exec failure's errno goes back through status_fd (closed on exec). */
static void child_exec(const char *path, char **argv, pid_t parent, int out_fd, int err_fd,
                       int status_fd) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(127); /* the daemon died before prctl */
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP) sigaction(s, &action, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd < 0 || dup2(null_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0) {
        int code = errno;
        ssize_t written = write(status_fd, &code, sizeof code);
        (void)written;
        _exit(127);
    }
    /* The daemon's other descriptors (sockets, files), but status_fd until the exec. */
    int closed = -1;
#ifdef SYS_close_range
    if (status_fd > 3) closed = (int)syscall(SYS_close_range, 3u, (unsigned)status_fd - 1, 0u);
    if (closed == 0 || status_fd == 3)
        closed = (int)syscall(SYS_close_range, (unsigned)status_fd + 1, ~0u, 0u);
#endif
    if (closed != 0)
        for (int fd = 3; fd < 4096; fd++)
            if (fd != status_fd) close(fd);
    execv(path, argv);
    int code = errno;
    ssize_t written = write(status_fd, &code, sizeof code);
    (void)written;
    _exit(127);
}

static double monotonic_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* ---------- what the child prints ---------- */

struct output {
    const char *id;
    const struct lq_job_launcher_hooks *hooks;
    char *report; /* stdout */
    size_t report_length, report_capacity;
    char line[LINE_SIZE]; /* the stderr line being read */
    size_t line_length;
    char tail[TAIL_LINES][TAIL_LINE_SIZE]; /* the last plain stderr lines, a ring */
    int tail_next, tail_count;
};

static void keep_line(struct output *o, const char *line) {
    snprintf(o->tail[o->tail_next], TAIL_LINE_SIZE, "%s", line);
    o->tail_next = (o->tail_next + 1) % TAIL_LINES;
    if (o->tail_count < TAIL_LINES) o->tail_count++;
}

static double json_number(const cJSON *object, const char *key) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, key);
    return cJSON_IsNumber(item) ? item->valuedouble : 0.0;
}

static size_t json_count(const cJSON *object, const char *key) {
    double value = json_number(object, key);
    return value > 0 ? (size_t)value : 0;
}

/* A {"event": "progress", ...} line of lqd compress --progress-json, handed to the hooks as
 * lq_compress's own report (or the Fisher estimate's); 0 when line is not one. */
static int progress_line(struct output *o, const char *line) {
    if (line[0] != '{') return 0;
    cJSON *event = lq_json_parse(line, strlen(line));
    const cJSON *kind = cJSON_GetObjectItemCaseSensitive(event, "event");
    const cJSON *phase = cJSON_GetObjectItemCaseSensitive(event, "phase");
    int handled = 0;
    if (cJSON_IsString(kind) && strcmp(kind->valuestring, "progress") == 0 &&
        cJSON_IsString(phase)) {
        if (strcmp(phase->valuestring, "fisher") == 0) {
            o->hooks->fisher_progress(o->hooks->context, (int)json_number(event, "sequences_done"),
                                      (int)json_number(event, "sequences_total"));
            handled = 1;
        }
        static const enum lq_compress_phase phases[] = {LQ_COMPRESS_TABLE, LQ_COMPRESS_ILP,
                                                        LQ_COMPRESS_FINAL};
        for (size_t i = 0; i < sizeof phases / sizeof phases[0] && !handled; i++) {
            if (strcmp(phase->valuestring, lq_compress_phase_name(phases[i])) != 0) continue;
            struct lq_compress_progress p = {
                .phase = phases[i],
                .matrices_done = json_count(event, "matrices_done"),
                .matrices_total = json_count(event, "matrices_total"),
                .cells_done = json_count(event, "cells_done"),
                .cells_total = json_count(event, "cells_total"),
                .cells_cached = json_count(event, "cells_cached"),
                .elapsed_seconds = json_number(event, "elapsed_seconds"),
                .eta_seconds = json_number(event, "eta_seconds"),
                .finished = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(event, "finished")),
            };
            o->hooks->progress(o->hooks->context, &p);
            handled = 1;
        }
    }
    cJSON_Delete(event);
    return handled;
}

static void stderr_line(struct output *o) {
    o->line[o->line_length] = '\0';
    o->line_length = 0;
    char *line = o->line;
    while (*line == ' ' || *line == '\t') line++;
    size_t length = strlen(line);
    while (length && (line[length - 1] == '\r' || line[length - 1] == ' ')) line[--length] = '\0';
    if (!length || progress_line(o, line)) return;
    static const char warning[] = "lqd compress: warning: ";
    if (strncmp(line, warning, sizeof warning - 1) == 0)
        o->hooks->warning(o->hooks->context, line + sizeof warning - 1);
    keep_line(o, line);
    lq_log(LQ_LOG_DEBUG, "compress launcher", LQ_LOG_STR("job", o->id), LQ_LOG_STR("stderr", line));
}

static void stderr_bytes(struct output *o, const char *data, size_t length) {
    for (size_t i = 0; i < length; i++) {
        if (data[i] == '\n' || o->line_length == LINE_SIZE - 1) stderr_line(o);
        if (data[i] != '\n') o->line[o->line_length++] = data[i];
    }
}

static void stdout_bytes(struct output *o, const char *data, size_t length) {
    if (o->report_length + length + 1 > o->report_capacity) {
        size_t capacity = o->report_capacity ? o->report_capacity : 65536;
        while (capacity < o->report_length + length + 1) capacity *= 2;
        if (capacity > REPORT_LIMIT) return; /* the rest is dropped: no report is that long */
        char *grown = realloc(o->report, capacity);
        if (!grown) return;
        o->report = grown, o->report_capacity = capacity;
    }
    memcpy(o->report + o->report_length, data, length);
    o->report_length += length;
    o->report[o->report_length] = '\0';
}

/* Reads what fd holds; closes it (sets it to -1) at its end. */
static void drain(int *fd, struct output *o, int is_stdout) {
    char buffer[65536];
    ssize_t n = read(*fd, buffer, sizeof buffer);
    if (n > 0) {
        if (is_stdout)
            stdout_bytes(o, buffer, (size_t)n);
        else
            stderr_bytes(o, buffer, (size_t)n);
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        if (!is_stdout && o->line_length) stderr_line(o);
        close(*fd);
        *fd = -1;
    }
}

/* "; its last messages: a | b | c" from the tail, as much as fits in size. */
static void tail_text(const struct output *o, char *out, size_t size) {
    out[0] = '\0';
    if (!o->tail_count) return;
    size_t used = (size_t)snprintf(out, size, "; its last messages: ");
    for (int k = 0; k < o->tail_count && used < size; k++) {
        int index = (o->tail_next - o->tail_count + k + TAIL_LINES) % TAIL_LINES;
        used += (size_t)snprintf(out + used, size - used, "%s%s", k ? " | " : "", o->tail[index]);
    }
}

/* ---------- the report ---------- */

static void copy_item(cJSON *to, const cJSON *from, const char *key) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(from, key);
    cJSON_AddItemToObject(to, key, item ? cJSON_Duplicate(item, 1) : cJSON_CreateNull());
}

/* The job's result from the report of lqd compress --json (its last line that is a JSON
 * object), in the keys and order of jobs.c's result_json, plus "launcher". NULL when stdout
 * holds no such report. */
static cJSON *result_from_report(const struct lq_job_spec *s, char *stdout_text,
                                 const char *launcher) {
    cJSON *report = NULL;
    for (char *end = stdout_text ? stdout_text + strlen(stdout_text) : NULL; end && !report;) {
        while (end > stdout_text && (end[-1] == '\n' || end[-1] == '\r')) *--end = '\0';
        char *start = end;
        while (start > stdout_text && start[-1] != '\n') start--;
        if (start == end) break;
        if (start[0] == '{') {
            report = lq_json_parse(start, strlen(start));
            if (!cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(report, "bits_per_param")) ||
                !cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(report, "configs"))) {
                cJSON_Delete(report);
                report = NULL;
            }
        }
        end = start;
    }
    if (!report) return NULL;
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "output", s->output);
    cJSON_AddNumberToObject(r, "target_bits", s->target_bits);
    copy_item(r, report, "min_budget");
    copy_item(r, report, "bits_per_param");
    copy_item(r, report, "effective_bits");
    cJSON_AddNumberToObject(r, "rank", s->rank);
    copy_item(r, report, "total_error");
    double relative = json_number(report, "relative_error");
    cJSON_AddNumberToObject(r, "relative_error", isfinite(relative) ? relative : 0.0);
    copy_item(r, report, "weighting");
    const cJSON *fisher = cJSON_GetObjectItemCaseSensitive(report, "fisher");
    if (s->fisher.file[0] && cJSON_IsObject(fisher)) {
        cJSON *f = cJSON_AddObjectToObject(r, "fisher");
        cJSON_AddStringToObject(f, "file", s->fisher.file);
        cJSON_AddNumberToObject(f, "samples", s->fisher.samples);
        copy_item(f, fisher, "seq_len");
        cJSON_AddNumberToObject(f, "seed", (double)s->fisher.seed);
        copy_item(f, fisher, "tokens");
        copy_item(f, fisher, "documents");
        copy_item(f, fisher, "seconds");
    } else {
        cJSON_AddNullToObject(r, "fisher");
    }
    copy_item(r, report, "n_matrices");
    copy_item(r, report, "n_configs");
    copy_item(r, report, "decompositions");
    copy_item(r, report, "cells_cached");
    copy_item(r, report, "cache");
    copy_item(r, report, "ilp_proven_optimal");
    cJSON *seconds = cJSON_AddObjectToObject(r, "seconds");
    const cJSON *report_seconds = cJSON_GetObjectItemCaseSensitive(report, "seconds");
    copy_item(seconds, report_seconds, "table");
    copy_item(seconds, report_seconds, "ilp");
    copy_item(seconds, report_seconds, "final");
    copy_item(r, report, "configs");
    cJSON_AddStringToObject(r, "launcher", launcher);
    /* under mpirun: the ranks and each one's share of the decompositions */
    if (cJSON_GetObjectItemCaseSensitive(report, "ranks")) {
        copy_item(r, report, "ranks");
        copy_item(r, report, "rank_decompositions");
    }
    cJSON_Delete(report);
    return r;
}

/* ---------- the run ---------- */

static void describe_exit(int status, char *out, size_t size) {
    if (WIFEXITED(status))
        snprintf(out, size, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(out, size, "was killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(out, size, "ended with wait status %d", status);
}

/* Starts argv[0]=path in its own process group, its stdout and stderr into *out_fd, *err_fd. */
static int spawn(const char *path, char **argv, pid_t *pid, int *out_fd, int *err_fd,
                 struct lq_error *err) {
    int out_pipe[2] = {-1, -1}, err_pipe[2] = {-1, -1}, status_pipe[2] = {-1, -1};
    if (pipe2(out_pipe, O_CLOEXEC) || pipe2(err_pipe, O_CLOEXEC) || pipe2(status_pipe, O_CLOEXEC)) {
        int code = errno;
        for (int i = 0; i < 2; i++) {
            if (out_pipe[i] >= 0) close(out_pipe[i]);
            if (err_pipe[i] >= 0) close(err_pipe[i]);
            if (status_pipe[i] >= 0) close(status_pipe[i]);
        }
        return lq_error_set(err, LQ_EIO, "cannot create pipes: %s", strerror(code));
    }
    pid_t parent = getpid();
    pid_t child = fork();
    if (child == 0) child_exec(path, argv, parent, out_pipe[1], err_pipe[1], status_pipe[1]);
    int fork_errno = errno;
    close(out_pipe[1]), close(err_pipe[1]), close(status_pipe[1]);
    if (child < 0) {
        close(out_pipe[0]), close(err_pipe[0]), close(status_pipe[0]);
        return lq_error_set(err, LQ_EIO, "cannot fork: %s", strerror(fork_errno));
    }
    /* Both sides set the group, so that a signal sent as soon as fork returns reaches it. */
    setpgid(child, child);
    int code = 0;
    ssize_t n;
    do n = read(status_pipe[0], &code, sizeof code);
    while (n < 0 && errno == EINTR);
    close(status_pipe[0]);
    if (n == (ssize_t)sizeof code) {
        waitpid(child, NULL, 0);
        close(out_pipe[0]), close(err_pipe[0]);
        return lq_error_set(err, LQ_EIO, "cannot run %s: %s", path, strerror(code));
    }
    *pid = child, *out_fd = out_pipe[0], *err_fd = err_pipe[0];
    return LQ_OK;
}

enum lq_job_status lq_job_launcher_run(const char *launcher, const char *id,
                                       const struct lq_job_spec *spec, const char *cache_dir,
                                       int force, const struct lq_job_launcher_hooks *hooks,
                                       cJSON **result, int *wrote_output, struct lq_error *err) {
    *result = NULL, *wrote_output = 0;
    char **launcher_words = NULL;
    size_t n_launcher = 0;
    struct argv_builder argv = {0};
    char program[PATH_MAX], executable[PATH_MAX];
    struct output output = {.id = id, .hooks = hooks};
    enum lq_job_status status = LQ_JOB_FAILED;
    int rc = lq_launcher_split(launcher, &launcher_words, &n_launcher, err);
    if (!rc) rc = lq_launcher_resolve(launcher_words[0], program, sizeof program, err);
    if (rc) {
        lq_error_prefix(err, "compress launcher '%.200s'", launcher);
        goto done;
    }
    if (self_executable(executable, sizeof executable, err) ||
        build_argv(launcher_words, n_launcher, executable, spec, cache_dir, force, &argv, err))
        goto done;
    pid_t pid = 0;
    int out_fd = -1, err_fd = -1;
    if (spawn(program, argv.words, &pid, &out_fd, &err_fd, err)) {
        lq_error_prefix(err, "compress launcher '%.200s'", launcher);
        goto done;
    }
    cJSON *launched = cJSON_CreateObject();
    cJSON *command = cJSON_AddArrayToObject(launched, "command");
    for (size_t i = 0; i < argv.count; i++)
        cJSON_AddItemToArray(command, cJSON_CreateString(argv.words[i]));
    cJSON_AddNumberToObject(launched, "pid", (double)pid);
    hooks->event(hooks->context, "launched", launched);
    lq_log(LQ_LOG_INFO, "compress job launched", LQ_LOG_STR("job", id),
           LQ_LOG_STR("launcher", launcher), LQ_LOG_INT("pid", (long)pid));

    int stop = 0, exited = 0, wait_status = 0, reaped_elsewhere = 0;
    double term_sent = 0, kill_sent = 0, exited_at = 0;
    while (!exited || out_fd >= 0 || err_fd >= 0) {
        struct pollfd fds[2];
        int n = 0;
        if (out_fd >= 0) fds[n++] = (struct pollfd){.fd = out_fd, .events = POLLIN};
        if (err_fd >= 0) fds[n++] = (struct pollfd){.fd = err_fd, .events = POLLIN};
        if (poll(fds, (nfds_t)n, 200) > 0)
            for (int i = 0; i < n; i++)
                if (fds[i].revents) {
                    if (fds[i].fd == out_fd)
                        drain(&out_fd, &output, 1);
                    else
                        drain(&err_fd, &output, 0);
                }
        double now = monotonic_now();
        if (!stop && (stop = hooks->stop_requested(hooks->context))) {
            kill(-pid, SIGTERM); /* mpirun passes it on to its ranks */
            term_sent = now;
        }
        if (stop && !exited && !kill_sent && now - term_sent >= KILL_AFTER) {
            lq_log(LQ_LOG_WARN, "compress launcher still running after SIGTERM: SIGKILL",
                   LQ_LOG_STR("job", id), LQ_LOG_INT("pid", (long)pid));
            kill(-pid, SIGKILL);
            kill_sent = now;
        }
        if (!exited) {
            /* The launcher has exited, not yet reaped: its pid still holds the group id, so
             * killing what is left of the group cannot reach anyone else's processes. */
            siginfo_t info;
            memset(&info, 0, sizeof info);
            int waited = waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT);
            if (waited == 0 && info.si_pid == pid) {
                kill(-pid, SIGKILL);
                exited = 1, exited_at = now;
            } else if (waited < 0 && errno == ECHILD) { /* reaped elsewhere (SIGCHLD ignored) */
                exited = 1, exited_at = now, reaped_elsewhere = 1;
            }
        } else if (now - exited_at > PIPES_AFTER_EXIT) {
            break; /* a process outside the group holds the pipes */
        }
    }
    if (out_fd >= 0) close(out_fd);
    if (err_fd >= 0) close(err_fd);
    while (!reaped_elsewhere && waitpid(pid, &wait_status, 0) < 0 && errno == EINTR) continue;
    if (reaped_elsewhere) wait_status = output.report ? 0 : 1 << 8; /* its status is lost */

    char how[160], tail[LQ_ERROR_MESSAGE_SIZE];
    describe_exit(wait_status, how, sizeof how);
    tail_text(&output, tail, sizeof tail);
    int success = WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0;
    if (success) *result = result_from_report(spec, output.report, launcher);
    *wrote_output = success;
    lq_log(success ? LQ_LOG_INFO : LQ_LOG_WARN, "compress launcher ended", LQ_LOG_STR("job", id),
           LQ_LOG_STR("exit", how));
    if (stop == 1) {
        status = LQ_JOB_CANCELLED;
        lq_error_set(err, LQ_EINVAL, "cancelled");
        cJSON_Delete(*result);
        *result = NULL;
    } else if (success && *result) {
        status = LQ_JOB_SUCCEEDED;
    } else if (stop == 2) {
        status = LQ_JOB_QUEUED;
        lq_error_set(err, LQ_EINVAL,
                     "interrupted by a daemon shutdown; resumes (from the cached error table) "
                     "at the next start");
    } else if (success) {
        lq_error_set(err, LQ_EFORMAT,
                     "compress launcher '%.100s' exited with status 0 but printed no lqd compress "
                     "--json report on stdout%s",
                     launcher, tail);
    } else {
        lq_error_set(err, LQ_EIO, "compress launcher '%.100s' %s%s", launcher, how, tail);
    }
done:
    free(output.report);
    free_words(&argv);
    free(launcher_words);
    return status;
}
