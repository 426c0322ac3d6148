/* Structured logs on stderr: one line per event, as text ("2024-05-01T12:00:00.123Z info
 * request method=GET path=/health status=200") or as JSON lines ({"time":...,"level":"info",
 * "msg":"request","method":"GET",...}). Safe to call from any thread; a line is written with
 * one write(2), so lines from different threads never interleave. */
#ifndef LQ_LOG_H
#define LQ_LOG_H

#include <stddef.h>

enum lq_log_level { LQ_LOG_DEBUG, LQ_LOG_INFO, LQ_LOG_WARN, LQ_LOG_ERROR };
enum lq_log_format { LQ_LOG_TEXT, LQ_LOG_JSON };

/* Sets the format and the lowest level written (defaults: text, info). Call before threads
 * start logging. */
void lq_log_configure(enum lq_log_format format, enum lq_log_level level);
/* "debug", "info", "warn", "error" -> level; -1 when unknown. */
int lq_log_level_parse(const char *name);

enum lq_log_field_type { LQ_LOG_FIELD_STRING, LQ_LOG_FIELD_INT, LQ_LOG_FIELD_NUMBER };

/* One key=value of a line; build them with LQ_LOG_STR / LQ_LOG_INT / LQ_LOG_NUM. */
struct lq_log_field {
    const char *key;
    enum lq_log_field_type type;
    const char *string; /* NULL is written as an empty string */
    long long integer;
    double number;
};

#define LQ_LOG_STR(k, v)                                                                           \
    ((struct lq_log_field){.key = (k), .type = LQ_LOG_FIELD_STRING, .string = (v)})
#define LQ_LOG_INT(k, v)                                                                           \
    ((struct lq_log_field){.key = (k), .type = LQ_LOG_FIELD_INT, .integer = (v)})
#define LQ_LOG_NUM(k, v)                                                                           \
    ((struct lq_log_field){.key = (k), .type = LQ_LOG_FIELD_NUMBER, .number = (v)})

/* Writes message with fields[0..count) if level is enabled. */
void lq_log_write(enum lq_log_level level, const char *message, const struct lq_log_field *fields,
                  size_t count);

/* lq_log(LQ_LOG_INFO, "listening", LQ_LOG_STR("host", host), LQ_LOG_INT("port", port)); at least
 * one field (lq_log_write(level, message, NULL, 0) for none). */
#define lq_log(level, message, ...)                                                                \
    do {                                                                                           \
        const struct lq_log_field lq_log_fields_[] = {__VA_ARGS__};                                \
        lq_log_write((level), (message), lq_log_fields_,                                           \
                     sizeof lq_log_fields_ / sizeof lq_log_fields_[0]);                            \
    } while (0)

#endif
