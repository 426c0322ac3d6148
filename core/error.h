/* Error codes and messages shared by every lqd module.
 * Public functions return 0 or a negative LQ_E* code and, when given a non-NULL
 * struct lq_error, fill it with a message a person can act on. */
#ifndef LQ_ERROR_H
#define LQ_ERROR_H

enum lq_status {
    LQ_OK = 0,
    LQ_EINVAL = -1,       /* bad argument or option */
    LQ_ENOMEM = -2,       /* allocation failed */
    LQ_EIO = -3,          /* file could not be read or written */
    LQ_EFORMAT = -4,      /* file content is malformed */
    LQ_ENOTFOUND = -5,    /* named thing (tensor, file, model) does not exist */
    LQ_EUNSUPPORTED = -6, /* valid but not supported (dtype, shape, ...) */
    LQ_EINFEASIBLE = -7,  /* constraint cannot be met (bit budget too small, ...) */
    LQ_ESOLVER = -8,      /* numerical library (LAPACK, GLPK) failed */
    LQ_ENUMERIC = -9,     /* NaN/Inf or overflow in the data */
};

#define LQ_ERROR_MESSAGE_SIZE 512

struct lq_error {
    int code;
    char message[LQ_ERROR_MESSAGE_SIZE];
};

/* Records code and a printf-style message in err (if non-NULL); returns code so that
 * callers can write `return lq_error_set(err, LQ_EINVAL, "...")`. */
int lq_error_set(struct lq_error *err, int code, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefixes err's message with "prefix: " (context such as a file name); returns err->code. */
int lq_error_prefix(struct lq_error *err, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

/* Static name of a status code, e.g. "invalid argument". */
const char *lq_strerror(int code);

#endif
