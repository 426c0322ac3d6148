#include "error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int lq_error_set(struct lq_error *err, int code, const char *format, ...) {
    if (err) {
        va_list args;
        va_start(args, format);
        vsnprintf(err->message, sizeof err->message, format, args);
        va_end(args);
        err->code = code;
    }
    return code;
}

int lq_error_prefix(struct lq_error *err, const char *format, ...) {
    if (!err) return LQ_OK;
    char prefix[LQ_ERROR_MESSAGE_SIZE];
    va_list args;
    va_start(args, format);
    vsnprintf(prefix, sizeof prefix, format, args);
    va_end(args);
    /* Built piecewise so that truncation of a long message is explicit, not a warning. */
    char joined[LQ_ERROR_MESSAGE_SIZE];
    size_t used = strnlen(prefix, sizeof joined - 1);
    memcpy(joined, prefix, used);
    const char *separator = ": ";
    for (const char *s = separator; *s && used < sizeof joined - 1; s++) joined[used++] = *s;
    size_t rest = strnlen(err->message, sizeof err->message);
    if (rest > sizeof joined - 1 - used) rest = sizeof joined - 1 - used;
    memcpy(joined + used, err->message, rest);
    joined[used + rest] = '\0';
    memcpy(err->message, joined, sizeof joined);
    return err->code;
}

const char *lq_strerror(int code) {
    switch (code) {
    case LQ_OK:
        return "success";
    case LQ_EINVAL:
        return "invalid argument";
    case LQ_ENOMEM:
        return "out of memory";
    case LQ_EIO:
        return "input/output error";
    case LQ_EFORMAT:
        return "malformed data";
    case LQ_ENOTFOUND:
        return "not found";
    case LQ_EUNSUPPORTED:
        return "unsupported";
    case LQ_EINFEASIBLE:
        return "infeasible";
    case LQ_ESOLVER:
        return "solver failure";
    case LQ_ENUMERIC:
        return "numerical error";
    default:
        return "unknown error";
    }
}
