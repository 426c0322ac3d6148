/* The compress launcher's command line (server/job_launcher.h): every command it accepts splits
 * into the words /bin/sh makes of it (sh is the reference), and what a shell would expand or
 * interpret is refused with a message naming it. */
#include "server/job_launcher.h"
#include "tests/unit/lq_test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The words sh makes of command: `sh -c 'for w in COMMAND; do printf "%s\0" "$w"; done'` would
 * glob, so each word is printed by printf's own argument list instead. */
static size_t sh_words(const char *command, char *out, size_t size) {
    char script[4096];
    snprintf(script, sizeof script, "printf '%%s\\0' %s", command);
    char path[] = "/tmp/lq_test_launcher_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    FILE *file = fdopen(fd, "w");
    fputs(script, file);
    fclose(file);
    char shell[256];
    snprintf(shell, sizeof shell, "/bin/sh %s", path);
    FILE *pipe = popen(shell, "r");
    size_t length = pipe ? fread(out, 1, size, pipe) : 0;
    if (pipe) pclose(pipe);
    remove(path);
    return length;
}

static void check_like_sh(const char *command) {
    char **words = NULL;
    size_t count = 0;
    struct lq_error err = {0};
    int rc = lq_launcher_split(command, &words, &count, &err);
    CHECK_MSG(rc == 0, "%s: %s", command, err.message);
    if (rc) return;
    char expected[4096];
    size_t length = sh_words(command, expected, sizeof expected);
    size_t at = 0, i = 0;
    for (; i < count && at < length; i++) {
        CHECK_MSG(strcmp(words[i], expected + at) == 0, "%s: word %zu '%s', sh '%s'", command, i,
                  words[i], expected + at);
        at += strlen(expected + at) + 1;
    }
    CHECK_MSG(i == count && at == length, "%s: %zu words, sh made more or fewer", command, count);
    CHECK(words[count] == NULL);
    free(words);
}

static void test_split_like_sh(void) {
    const char *commands[] = {
        "mpirun",
        "mpirun -n 4 --hostfile /etc/hosts",
        "  mpirun\t-n  4  ",
        "'/opt/my launcher/run' -n 2",
        "mpirun -x \"OMP_NUM_THREADS=2\" --mca btl ^openib",
        "a \"double \\\" quote\" 'single \" inside' back\\ slash",
        "a \"\\\\ \\$ \\` kept\" \"\\n stays\"",
        "a '' \"\" b",
        "a 'x'\"y\"z",
        "srun --ntasks=8 --cpus-per-task=4 --export=ALL,LQ_THREADS=4",
        "a 'it''s' x",
    };
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) check_like_sh(commands[i]);
}

static void test_split_refuses(void) {
    const struct {
        const char *command, *word;
    } refused[] = {
        {"", "empty"},
        {"   \t ", "empty"},
        {"mpirun 'x", "unterminated '"},
        {"mpirun \"x", "unterminated \""},
        {"mpirun x\\", "backslash"},
        {"mpirun --hostfile $HOME/hosts", "'$'"},
        {"mpirun \"$HOME\"", "'$'"},
        {"mpirun `hostname`", "'`'"},
        {"mpirun | tee", "'|'"},
        {"mpirun; rm", "';'"},
        {"mpirun && x", "'&'"},
        {"mpirun > log", "'>'"},
        {"mpirun < in", "'<'"},
        {"(mpirun)", "'('"},
        {"mpirun ~/hosts", "'~'"},
        {"mpirun #comment", "'#'"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        char **words = (char **)1;
        size_t count = 7;
        struct lq_error err = {0};
        int rc = lq_launcher_split(refused[i].command, &words, &count, &err);
        CHECK_MSG(rc == LQ_EINVAL && strstr(err.message, refused[i].word), "'%s': %d '%s'",
                  refused[i].command, rc, err.message);
        CHECK(words == NULL && count == 0);
    }
    char *long_command = malloc(LQ_LAUNCHER_MAX + 2);
    memset(long_command, 'a', LQ_LAUNCHER_MAX + 1);
    long_command[LQ_LAUNCHER_MAX + 1] = '\0';
    char **words = NULL;
    size_t count = 0;
    CHECK(lq_launcher_split(long_command, &words, &count, NULL) == LQ_EINVAL);
    long_command[LQ_LAUNCHER_MAX] = '\0';
    CHECK(lq_launcher_split(long_command, &words, &count, NULL) == 0 && count == 1);
    free(words);
    /* The most words a command of n characters holds: "a a a ...". */
    for (int i = 0; i < LQ_LAUNCHER_MAX; i++) long_command[i] = i % 2 ? ' ' : 'a';
    long_command[LQ_LAUNCHER_MAX] = '\0';
    CHECK(lq_launcher_split(long_command, &words, &count, NULL) == 0 &&
          count == LQ_LAUNCHER_MAX / 2);
    free(words);
    free(long_command);
}

static void test_resolve(void) {
    char path[4096];
    struct lq_error err = {0};
    CHECK(lq_launcher_resolve("sh", path, sizeof path, &err) == 0 && strstr(path, "/sh"));
    CHECK(lq_launcher_resolve("/bin/sh", path, sizeof path, &err) == 0 &&
          strcmp(path, "/bin/sh") == 0);
    CHECK(lq_launcher_resolve("lq-no-such-launcher", path, sizeof path, &err) == LQ_ENOTFOUND &&
          strstr(err.message, "not found in PATH"));
    CHECK(lq_launcher_resolve("/nonexistent/mpirun", path, sizeof path, &err) == LQ_ENOTFOUND &&
          strstr(err.message, "not an executable"));
    char plain[] = "/tmp/lq_test_launcher_XXXXXX"; /* a file without execute permission */
    int fd = mkstemp(plain);
    CHECK(fd >= 0);
    close(fd);
    CHECK(lq_launcher_resolve(plain, path, sizeof path, &err) == LQ_ENOTFOUND);
    remove(plain);
}

LQ_TEST_MAIN(LQ_TEST(test_split_like_sh), LQ_TEST(test_split_refuses), LQ_TEST(test_resolve))
