/* The `lqd` command's subcommands. Each takes argc/argv from its own name on and returns
 * the process exit status: 0 success, 1 failure, 2 bad usage. */
#ifndef LQ_CLI_H
#define LQ_CLI_H

int lq_cli_decompose(int argc, char **argv);
int lq_cli_version(int argc, char **argv);
int lq_cli_generate(int argc, char **argv);
int lq_cli_eval(int argc, char **argv);
int lq_cli_compress(int argc, char **argv);
int lq_cli_finetune(int argc, char **argv);
int lq_cli_inspect(int argc, char **argv);
int lq_cli_import(int argc, char **argv);
int lq_cli_serve(int argc, char **argv);

/* Prints "lqd COMMAND: <format with value>" and a pointer to --help on stderr; returns 2,
 * the exit status of a usage error. */
int lq_cli_usage_error(const char *command, const char *format, const char *value);

/* Strict number parsing for options: the whole string must be a number in range.
 * Return 0 on success, -1 otherwise. */
int lq_cli_parse_int(const char *text, long min, long max, long *out);
int lq_cli_parse_double(const char *text, double min, double max, double *out);

#endif
