#include "server/log.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static enum lq_log_format log_format = LQ_LOG_TEXT;
static enum lq_log_level log_level = LQ_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void lq_log_configure(enum lq_log_format format, enum lq_log_level level) {
    log_format = format;
    log_level = level;
}

int lq_log_level_parse(const char *name) {
    for (int i = 0; i < 4; i++)
        if (strcasecmp(name, level_names[i]) == 0) return i;
    if (strcasecmp(name, "warning") == 0) return LQ_LOG_WARN;
    return -1;
}

/* A line under construction; text past the end is dropped (and the line marked "..."). */
struct line {
    char data[4096];
    size_t length;
};

static void put(struct line *line, const char *text, size_t length) {
    size_t room = sizeof line->data - 2 - line->length; /* keep room for '\n' */
    if (length > room) length = room;
    memcpy(line->data + line->length, text, length);
    line->length += length;
}

static void put_string(struct line *line, const char *text) {
    put(line, text, strlen(text));
}

/* JSON string contents: quotes, backslashes and control characters escaped. */
static void put_json_escaped(struct line *line, const char *text) {
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        char escape[8];
        if (*p == '"' || *p == '\\') {
            escape[0] = '\\', escape[1] = (char)*p;
            put(line, escape, 2);
        } else if (*p < 0x20 || *p == 0x7f) {
            snprintf(escape, sizeof escape, "\\u%04x", *p);
            put(line, escape, 6);
        } else {
            put(line, (const char *)p, 1);
        }
    }
}

/* Text values: bare when they are one plain word, else quoted like JSON. */
static void put_text_value(struct line *line, const char *text) {
    int plain = text[0] != '\0';
    for (const unsigned char *p = (const unsigned char *)text; *p && plain; p++)
        plain = *p > 0x20 && *p != '"' && *p != '\\' && *p != '=' && *p != 0x7f;
    if (plain) {
        put_string(line, text);
        return;
    }
    put_string(line, "\"");
    put_json_escaped(line, text);
    put_string(line, "\"");
}

void lq_log_write(enum lq_log_level level, const char *message, const struct lq_log_field *fields,
                  size_t count) {
    if (level < log_level) return;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm utc;
    gmtime_r(&now.tv_sec, &utc);
    char stamp[96];
    int milliseconds = (int)(now.tv_nsec / 1000000) % 1000;
    snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", utc.tm_year + 1900,
             utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec, milliseconds);
    struct line line = {.length = 0};
    int json = log_format == LQ_LOG_JSON;
    if (json) {
        put_string(&line, "{\"time\":\"");
        put_string(&line, stamp);
        put_string(&line, "\",\"level\":\"");
        put_string(&line, level_names[level]);
        put_string(&line, "\",\"msg\":\"");
        put_json_escaped(&line, message);
        put_string(&line, "\"");
    } else {
        put_string(&line, stamp);
        put_string(&line, " ");
        put_string(&line, level_names[level]);
        put_string(&line, " ");
        put_string(&line, message);
    }
    for (size_t i = 0; i < count; i++) {
        const struct lq_log_field *f = &fields[i];
        char number[64];
        if (f->type == LQ_LOG_FIELD_INT)
            snprintf(number, sizeof number, "%lld", f->integer);
        else if (f->type == LQ_LOG_FIELD_NUMBER)
            snprintf(number, sizeof number, "%.6g", f->number);
        const char *string = f->string ? f->string : "";
        if (json) {
            put_string(&line, ",\"");
            put_json_escaped(&line, f->key);
            put_string(&line, "\":");
            if (f->type == LQ_LOG_FIELD_STRING) {
                put_string(&line, "\"");
                put_json_escaped(&line, string);
                put_string(&line, "\"");
            } else {
                put_string(&line, number);
            }
        } else {
            put_string(&line, " ");
            put_string(&line, f->key);
            put_string(&line, "=");
            put_text_value(&line, f->type == LQ_LOG_FIELD_STRING ? string : number);
        }
    }
    if (json) put_string(&line, "}");
    line.data[line.length++] = '\n';
    ssize_t written = write(STDERR_FILENO, line.data, line.length);
    (void)written; /* nowhere left to report a failing stderr */
}
