#include "server/http_server.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "server/api.h"
#include "server/log.h"

/* ---------- the route table (server/routes.def) ---------- */

typedef void (*route_handler)(void *app, struct lq_http_request *request);

struct route {
    const char *method, *pattern;
    route_handler handler;
    int auth;
};

static const struct route routes[] = {
#define LQ_ROUTE(method, pattern, handler, auth) {method, pattern, handler, auth},
#include "server/routes.def"
#undef LQ_ROUTE
};
#define N_ROUTES (sizeof routes / sizeof routes[0])

/* Matches path against pattern segment by segment; a "{...}" segment matches one non-empty
 * segment, copied to param. */
static int route_matches(const char *pattern, const char *path, char *param, size_t param_size) {
    param[0] = '\0';
    while (*pattern && *path) {
        if (*pattern != '/' || *path != '/') return 0;
        pattern++, path++;
        const char *pattern_end = strchr(pattern, '/'), *path_end = strchr(path, '/');
        size_t pattern_length = pattern_end ? (size_t)(pattern_end - pattern) : strlen(pattern);
        size_t path_length = path_end ? (size_t)(path_end - path) : strlen(path);
        if (pattern_length > 1 && pattern[0] == '{' && pattern[pattern_length - 1] == '}') {
            if (path_length == 0 || path_length >= param_size) return 0;
            memcpy(param, path, path_length);
            param[path_length] = '\0';
        } else if (pattern_length != path_length || memcmp(pattern, path, path_length) != 0) {
            return 0;
        }
        pattern += pattern_length, path += path_length;
    }
    return *pattern == '\0' && *path == '\0';
}

/* The route for method and path: literal patterns first, then placeholders. *allowed is set
 * to that route's method when the path matches only routes of another (405, not 404). */
static const struct route *route_find(const char *method, const char *path, char *param,
                                      size_t param_size, const char **allowed_elsewhere) {
    *allowed_elsewhere = NULL;
    const char *want = strcmp(method, "HEAD") == 0 ? "GET" : method;
    for (int literal = 1; literal >= 0; literal--)
        for (size_t i = 0; i < N_ROUTES; i++) {
            if ((strchr(routes[i].pattern, '{') == NULL) != literal) continue;
            if (!route_matches(routes[i].pattern, path, param, param_size)) continue;
            if (strcmp(routes[i].method, want) == 0) return &routes[i];
            *allowed_elsewhere = routes[i].method;
        }
    return NULL;
}

/* ---------- server and request state ---------- */

#define MAX_EXTRA_HEADERS 4
#define MAX_PATH 1024

struct lq_http_server {
    struct MHD_Daemon *daemon;
    struct lq_http_server_options options;
    char **api_keys; /* copies */
    int port;
    atomic_int active;
    atomic_int closing;
};

/* One field of a multipart/form-data body. */
struct form_field {
    char *name, *filename, *content_type; /* filename: NULL for a text field */
    char *value;                          /* a text field's bytes (NUL-terminated) */
    char *path;                           /* a file field's temporary file; NULL once deleted */
    int fd;                               /* open while the field is being written, else -1 */
    size_t size;
    int taken; /* moved away by the handler: not deleted */
};

#define MAX_FORM_FIELDS 16
/* A body beyond the limit is counted and dropped; past this many bytes more the connection is
 * closed (a chunked upload that never ends). */
#define DISCARD_LIMIT (64u << 20)

struct lq_http_request {
    struct lq_http_server *server;
    struct MHD_Connection *connection;
    const struct route *route;
    char method[16];
    char path[MAX_PATH];
    char param[256];
    char *body;
    size_t body_length, body_capacity;
    size_t body_received; /* all bytes seen, kept or not */
    int body_too_large;
    int responded, status;
    double arrival;
    char *header_names[MAX_EXTRA_HEADERS], *header_values[MAX_EXTRA_HEADERS];
    int n_headers;
    /* multipart/form-data with an upload directory: parsed as it arrives. */
    int is_form;
    struct MHD_PostProcessor *form;
    struct form_field *fields; /* MAX_FORM_FIELDS */
    size_t n_fields;
    size_t form_text;      /* bytes of text fields kept */
    int form_status;       /* refused while streaming: the status to answer with form_message */
    size_t form_failed_at; /* body bytes seen then; the rest is read and dropped */
    char form_message[256];
};

double lq_http_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

const char *lq_http_request_method(const struct lq_http_request *r) {
    return r->method;
}
const char *lq_http_request_path(const struct lq_http_request *r) {
    return r->path;
}
const char *lq_http_request_path_param(const struct lq_http_request *r) {
    return r->param[0] ? r->param : NULL;
}
const char *lq_http_request_body(const struct lq_http_request *r, size_t *length) {
    *length = r->body_length;
    return r->body ? r->body : "";
}
const char *lq_http_request_header(const struct lq_http_request *r, const char *name) {
    return MHD_lookup_connection_value(r->connection, MHD_HEADER_KIND, name);
}
const char *lq_http_request_query(const struct lq_http_request *r, const char *name) {
    return MHD_lookup_connection_value(r->connection, MHD_GET_ARGUMENT_KIND, name);
}
double lq_http_request_arrival(const struct lq_http_request *r) {
    return r->arrival;
}

int lq_http_request_client_gone(struct lq_http_request *r) {
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(r->connection, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!info) return 1;
    struct pollfd probe = {.fd = info->connect_fd, .events = POLLIN};
    if (poll(&probe, 1, 0) <= 0) return 0;
    if (probe.revents & (POLLHUP | POLLERR | POLLNVAL)) return 1;
    if (!(probe.revents & POLLIN)) return 0;
    /* Readable: either the next pipelined request (data) or the client's FIN (0 bytes). */
    char byte;
    ssize_t n = recv(info->connect_fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

void lq_http_set_header(struct lq_http_request *r, const char *name, const char *value) {
    if (r->n_headers == MAX_EXTRA_HEADERS) return;
    char *n = strdup(name), *v = strdup(value);
    if (!n || !v) {
        free(n), free(v);
        return;
    }
    r->header_names[r->n_headers] = n;
    r->header_values[r->n_headers++] = v;
}

/* ---------- responses ---------- */

static int queue(struct lq_http_request *r, int status, const char *content_type,
                 struct MHD_Response *response) {
    if (!response) return LQ_ENOMEM;
    if (content_type) MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    for (int i = 0; i < r->n_headers; i++)
        MHD_add_response_header(response, r->header_names[i], r->header_values[i]);
    if (atomic_load(&r->server->closing))
        MHD_add_response_header(response, MHD_HTTP_HEADER_CONNECTION, "close");
    enum MHD_Result queued = MHD_queue_response(r->connection, (unsigned)status, response);
    MHD_destroy_response(response);
    if (queued != MHD_YES) return LQ_EIO;
    r->responded = 1;
    r->status = status;
    return LQ_OK;
}

int lq_http_respond(struct lq_http_request *r, int status, const char *content_type,
                    const void *body, size_t length) {
    if (r->responded) return LQ_EINVAL;
    struct MHD_Response *response =
        MHD_create_response_from_buffer(length, (void *)body, MHD_RESPMEM_MUST_COPY);
    return queue(r, status, content_type, response);
}

int lq_http_respond_file(struct lq_http_request *r, int status, const char *content_type, int fd,
                         size_t size) {
    if (r->responded) {
        close(fd);
        return LQ_EINVAL;
    }
    struct MHD_Response *response = MHD_create_response_from_fd64(size, fd);
    if (!response) close(fd);
    return queue(r, status, content_type, response);
}

int lq_http_respond_json(struct lq_http_request *r, int status, const cJSON *json) {
    char *text = json ? cJSON_PrintUnformatted(json) : NULL;
    if (!text) return lq_http_respond_error(r, 500, "server_error", NULL, NULL, "out of memory");
    size_t length = strlen(text);
    int rc = LQ_EINVAL;
    if (!r->responded) {
        struct MHD_Response *response =
            MHD_create_response_from_buffer_with_free_callback(length, text, cJSON_free);
        if (!response) cJSON_free(text);
        rc = queue(r, status, "application/json", response);
    } else {
        cJSON_free(text);
    }
    return rc;
}

int lq_http_respond_error(struct lq_http_request *r, int status, const char *type, const char *code,
                          const char *param, const char *format, ...) {
    char message[LQ_ERROR_MESSAGE_SIZE + 256];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    /* Built by hand so that it works when cJSON cannot allocate. */
    cJSON *root = cJSON_CreateObject(), *error = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(error, "message", message);
    cJSON_AddStringToObject(error, "type", type);
    if (param)
        cJSON_AddStringToObject(error, "param", param);
    else
        cJSON_AddNullToObject(error, "param");
    if (code)
        cJSON_AddStringToObject(error, "code", code);
    else
        cJSON_AddNullToObject(error, "code");
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    static const char fallback[] =
        "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,"
        "\"code\":null}}";
    int rc = lq_http_respond(r, status, "application/json", text ? text : fallback,
                             text ? strlen(text) : sizeof fallback - 1);
    cJSON_free(text);
    if (status >= 400)
        lq_log(status >= 500 ? LQ_LOG_WARN : LQ_LOG_INFO, "request refused",
               LQ_LOG_STR("method", r->method), LQ_LOG_STR("path", r->path),
               LQ_LOG_INT("status", status), LQ_LOG_STR("error", message));
    return rc;
}

struct stream {
    lq_http_stream_reader reader;
    void (*free_context)(void *context);
    void *context;
    struct lq_http_request *request; /* valid while the response is being sent */
};

static ssize_t stream_read(void *cls, uint64_t position, char *buffer, size_t size) {
    (void)position;
    struct stream *s = cls;
    ssize_t n = s->reader(s->context, s->request, buffer, size);
    if (n > 0) return n;
    return n == LQ_HTTP_STREAM_END ? MHD_CONTENT_READER_END_OF_STREAM
                                   : MHD_CONTENT_READER_END_WITH_ERROR;
}

static void stream_free(void *cls) {
    struct stream *s = cls;
    if (s->free_context) s->free_context(s->context);
    free(s);
}

int lq_http_respond_stream(struct lq_http_request *r, int status, const char *content_type,
                           lq_http_stream_reader reader, void (*free_context)(void *context),
                           void *context) {
    struct stream *s = calloc(1, sizeof *s);
    if (!s || r->responded) {
        free(s);
        if (free_context) free_context(context);
        return r->responded ? LQ_EINVAL : LQ_ENOMEM;
    }
    *s = (struct stream){reader, free_context, context, r};
    /* 16 KiB blocks: an SSE chunk is far smaller, so each read returns what is ready. */
    struct MHD_Response *response =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, s, stream_free);
    if (!response) {
        stream_free(s);
        return LQ_ENOMEM;
    }
    MHD_add_response_header(response, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(response, "X-Accel-Buffering", "no");
    return queue(r, status, content_type, response);
}

/* ---------- authentication ---------- */

/* Compares in time that depends on the lengths only, not on where the texts differ. */
static int equal_constant_time(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    unsigned char difference = la != lb;
    for (size_t i = 0; i < la; i++) difference |= (unsigned char)(a[i] ^ b[i % (lb ? lb : 1)]);
    return difference == 0;
}

static int authorized(const struct lq_http_server *server, struct lq_http_request *r) {
    if (server->options.n_api_keys == 0) return 1;
    const char *header = lq_http_request_header(r, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!header || strncasecmp(header, "Bearer ", 7) != 0) return 0;
    const char *token = header + 7;
    while (*token == ' ') token++;
    int match = 0;
    for (size_t i = 0; i < server->options.n_api_keys; i++)
        match |= equal_constant_time(token, server->api_keys[i]);
    return match;
}

/* ---------- multipart/form-data ---------- */

int lq_http_request_is_form(const struct lq_http_request *r) {
    return r->is_form;
}

size_t lq_http_request_form_count(const struct lq_http_request *r) {
    return r->n_fields;
}

void lq_http_request_form_field(const struct lq_http_request *r, size_t index,
                                struct lq_http_form_field *out) {
    const struct form_field *f = &r->fields[index];
    *out = (struct lq_http_form_field){
        f->name, f->filename, f->content_type, f->filename ? NULL : f->value, f->path, f->size};
}

int lq_http_request_form_find(const struct lq_http_request *r, const char *name) {
    for (size_t i = 0; i < r->n_fields; i++)
        if (strcmp(r->fields[i].name, name) == 0) return (int)i;
    return -1;
}

void lq_http_request_form_take(struct lq_http_request *r, size_t index) {
    r->fields[index].taken = 1;
}

/* Closes the temporary files; with remove, deletes those the handler has not taken. */
static void form_close_files(struct lq_http_request *r, int remove) {
    for (size_t i = 0; i < r->n_fields; i++) {
        struct form_field *f = &r->fields[i];
        if (f->fd >= 0) close(f->fd);
        f->fd = -1;
        if (remove && f->path && !f->taken) {
            unlink(f->path);
            free(f->path);
            f->path = NULL;
        }
    }
}

/* Refuses the upload (the first reason wins): its files go at once, the rest of the body is
 * read and dropped, and the status is answered when the body has ended. */
static void form_fail(struct lq_http_request *r, int status, const char *format, ...)
    __attribute__((format(printf, 3, 4)));
static void form_fail(struct lq_http_request *r, int status, const char *format, ...) {
    if (r->form_status) return;
    va_list args;
    va_start(args, format);
    vsnprintf(r->form_message, sizeof r->form_message, format, args);
    va_end(args);
    r->form_status = status;
    r->form_failed_at = r->body_received;
    form_close_files(r, 1);
}

static int write_all(int fd, const char *data, size_t size) {
    while (size) {
        ssize_t n = write(fd, data, size);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n, size -= (size_t)n;
    }
    return 0;
}

/* Starts a field: a temporary file for a file field, an empty value for a text one. */
static struct form_field *form_field_begin(struct lq_http_request *r, const char *name,
                                           const char *filename, const char *content_type) {
    if (r->n_fields == MAX_FORM_FIELDS) {
        form_fail(r, 400, "the form has more than %d fields", MAX_FORM_FIELDS);
        return NULL;
    }
    if (!r->fields && !(r->fields = calloc(MAX_FORM_FIELDS, sizeof *r->fields))) {
        form_fail(r, 500, "out of memory");
        return NULL;
    }
    form_close_files(r, 0); /* the previous file is complete */
    struct form_field *f = &r->fields[r->n_fields++];
    f->fd = -1;
    f->name = strdup(name);
    f->filename = filename ? strdup(filename) : NULL;
    f->content_type = content_type ? strdup(content_type) : NULL;
    if (!f->name || (filename && !f->filename) || (content_type && !f->content_type)) {
        form_fail(r, 500, "out of memory");
        return NULL;
    }
    if (!filename) {
        if (!(f->value = calloc(1, 1))) form_fail(r, 500, "out of memory");
        return f->value ? f : NULL;
    }
    size_t length = strlen(r->server->options.upload_dir) + 32;
    if (!(f->path = malloc(length))) {
        form_fail(r, 500, "out of memory");
        return NULL;
    }
    snprintf(f->path, length, "%s/.upload-XXXXXX", r->server->options.upload_dir);
    if ((f->fd = mkstemp(f->path)) < 0) {
        free(f->path);
        f->path = NULL;
        form_fail(r, 500, "cannot store the upload: %s", strerror(errno));
        return NULL;
    }
    return f;
}

/* MHD's post processor hands each field over in pieces, the first at offset 0 (with no bytes
 * for an empty field), the next ones at later offsets. */
static enum MHD_Result on_form_data(void *cls, enum MHD_ValueKind kind, const char *key,
                                    const char *filename, const char *content_type,
                                    const char *transfer_encoding, const char *data, uint64_t off,
                                    size_t size) {
    (void)kind, (void)transfer_encoding;
    struct lq_http_request *r = cls;
    if (r->form_status) return MHD_NO;
    struct form_field *f = r->n_fields ? &r->fields[r->n_fields - 1] : NULL;
    if (off == 0 || !f || strcmp(f->name, key) != 0)
        f = form_field_begin(r, key, filename, content_type);
    if (!f) return MHD_NO;
    if (size == 0) return MHD_YES;
    if (f->filename) {
        if (write_all(f->fd, data, size)) {
            form_fail(r, 500, "cannot store the upload: %s", strerror(errno));
            return MHD_NO;
        }
    } else {
        r->form_text += size;
        if (r->form_text > r->server->options.max_body) {
            form_fail(r, 413, "the form's text fields are larger than %zu bytes",
                      r->server->options.max_body);
            return MHD_NO;
        }
        char *grown = realloc(f->value, f->size + size + 1);
        if (!grown) {
            form_fail(r, 500, "out of memory");
            return MHD_NO;
        }
        f->value = grown;
        memcpy(f->value + f->size, data, size);
        f->value[f->size + size] = '\0';
    }
    f->size += size;
    return MHD_YES;
}

/* A piece of a form body: parsed, or counted and dropped once refused (then the connection
 * closes past DISCARD_LIMIT more bytes). 0 closes the connection. */
static int form_append(struct lq_http_server *server, struct lq_http_request *r, const char *data,
                       size_t size) {
    r->body_received += size;
    if (!r->form_status && r->body_received > server->options.max_upload)
        form_fail(r, 413, "the upload is larger than %zu bytes", server->options.max_upload);
    if (r->form_status) return r->body_received - r->form_failed_at < DISCARD_LIMIT;
    if (MHD_post_process(r->form, data, size) != MHD_YES)
        form_fail(r, 400, "the multipart/form-data body is malformed");
    return 1;
}

/* The body has ended: the parse is finished; 0, or the refusal is answered. A body that stops
 * before its closing boundary is refused: its last file would be silently cut short. */
static int form_end(struct lq_http_request *r) {
    if (MHD_destroy_post_processor(r->form) != MHD_YES)
        form_fail(r, 400,
                  "the multipart/form-data body is cut short or malformed (it must end "
                  "with the closing boundary)");
    r->form = NULL;
    form_close_files(r, 0);
    if (!r->form_status) return 0;
    const char *type = r->form_status >= 500 ? "server_error" : "invalid_request_error";
    const char *code = r->form_status == 413   ? "body_too_large"
                       : r->form_status == 400 ? "invalid_form"
                                               : NULL;
    lq_http_respond_error(r, r->form_status, type, code, NULL, "%s", r->form_message);
    return -1;
}

/* ---------- the request cycle ---------- */

static void request_free(struct lq_http_request *r) {
    for (int i = 0; i < r->n_headers; i++) free(r->header_names[i]), free(r->header_values[i]);
    if (r->form) MHD_destroy_post_processor(r->form);
    form_close_files(r, 1);
    for (size_t i = 0; i < r->n_fields; i++) {
        struct form_field *f = &r->fields[i];
        free(f->name), free(f->filename), free(f->content_type), free(f->value), free(f->path);
    }
    free(r->fields);
    free(r->body);
    free(r);
}

/* First call: route, auth and the declared body size, answered before the body is read. */
static void request_begin(struct lq_http_server *server, struct lq_http_request *r) {
    const char *allowed_elsewhere;
    r->route = route_find(r->method, r->path, r->param, sizeof r->param, &allowed_elsewhere);
    if (!r->route) {
        if (allowed_elsewhere) {
            lq_http_set_header(r, MHD_HTTP_HEADER_ALLOW, allowed_elsewhere);
            lq_http_respond_error(r, 405, "invalid_request_error", "method_not_allowed", NULL,
                                  "%s is not allowed on %s", r->method, r->path);
        } else {
            lq_http_respond_error(r, 404, "invalid_request_error", "not_found", NULL,
                                  "no route %s %s", r->method, r->path);
        }
        return;
    }
    if (r->route->auth && !authorized(server, r)) {
        lq_http_set_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
        lq_http_respond_error(r, 401, "invalid_request_error", "invalid_api_key", NULL,
                              "missing or incorrect API key: send 'Authorization: Bearer KEY'");
        return;
    }
    const char *type = lq_http_request_header(r, MHD_HTTP_HEADER_CONTENT_TYPE);
    int form = server->options.upload_dir && type &&
               strncasecmp(type, "multipart/form-data", strlen("multipart/form-data")) == 0;
    size_t limit = form ? server->options.max_upload : server->options.max_body;
    const char *declared = lq_http_request_header(r, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (declared) {
        char *end;
        errno = 0;
        unsigned long long length = strtoull(declared, &end, 10);
        if (errno || end == declared || length > limit) {
            lq_http_respond_error(r, 413, "invalid_request_error", "body_too_large", NULL,
                                  "the %s is larger than %zu bytes",
                                  form ? "upload" : "request body", limit);
            return;
        }
    }
    if (form) {
        r->is_form = 1;
        /* 64 KiB: the longest part header or text value piece MHD buffers at once. */
        r->form = MHD_create_post_processor(r->connection, 65536, on_form_data, r);
        if (!r->form)
            lq_http_respond_error(r, 400, "invalid_request_error", "invalid_form", NULL,
                                  "a multipart/form-data body needs a boundary parameter");
    }
}

static int body_append(struct lq_http_server *server, struct lq_http_request *r, const char *data,
                       size_t size) {
    r->body_received += size;
    if (r->body_too_large || r->body_length + size > server->options.max_body) {
        r->body_too_large = 1;
        free(r->body);
        r->body = NULL;
        r->body_length = r->body_capacity = 0;
        return r->body_received - server->options.max_body < DISCARD_LIMIT;
    }
    if (r->body_length + size + 1 > r->body_capacity) {
        size_t capacity = r->body_capacity ? r->body_capacity : 4096;
        while (capacity < r->body_length + size + 1) capacity *= 2;
        if (capacity > server->options.max_body + 1) capacity = server->options.max_body + 1;
        char *grown = realloc(r->body, capacity);
        if (!grown) return 0;
        r->body = grown, r->body_capacity = capacity;
    }
    memcpy(r->body + r->body_length, data, size);
    r->body_length += size;
    r->body[r->body_length] = '\0';
    return 1;
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *connection, const char *url,
                                 const char *method, const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **con_cls) {
    (void)version;
    struct lq_http_server *server = cls;
    struct lq_http_request *r = *con_cls;
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r) return MHD_NO;
        r->server = server, r->connection = connection, r->arrival = lq_http_now();
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->path, sizeof r->path, "%s", url);
        size_t length = strlen(r->path);
        while (length > 1 && r->path[length - 1] == '/') r->path[--length] = '\0';
        *con_cls = r;
        atomic_fetch_add(&server->active, 1);
        request_begin(server, r);
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t size = *upload_data_size;
        *upload_data_size = 0;
        if (r->responded) return MHD_YES; /* answered early: the body is not needed */
        if (r->form) return form_append(server, r, upload_data, size) ? MHD_YES : MHD_NO;
        return body_append(server, r, upload_data, size) ? MHD_YES : MHD_NO;
    }
    if (r->responded) return MHD_YES;
    if (r->form && form_end(r)) return MHD_YES;
    if (r->body_too_large) {
        lq_http_respond_error(r, 413, "invalid_request_error", "body_too_large", NULL,
                              "the request body is larger than %zu bytes",
                              server->options.max_body);
        return MHD_YES;
    }
    r->route->handler(server->options.app, r);
    if (!r->responded)
        lq_http_respond_error(r, 500, "server_error", NULL, NULL, "the handler gave no response");
    return MHD_YES;
}

static const char *method_label(const char *method) {
    static const char *const known[] = {"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS"};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(method, known[i]) == 0) return known[i];
    return "OTHER";
}

static void on_completed(void *cls, struct MHD_Connection *connection, void **con_cls,
                         enum MHD_RequestTerminationCode code) {
    (void)connection;
    struct lq_http_server *server = cls;
    struct lq_http_request *r = *con_cls;
    if (!r) return;
    *con_cls = NULL;
    double seconds = lq_http_now() - r->arrival;
    const char *route = r->route ? r->route->pattern : "unmatched";
    /* A client gone before any response is counted as nginx does, as 499. */
    int status = r->responded ? r->status : 499;
    if (server->options.metrics)
        lq_metrics_count_request(server->options.metrics, route, method_label(r->method), status,
                                 seconds);
    lq_log(code == MHD_REQUEST_TERMINATED_COMPLETED_OK ? LQ_LOG_INFO : LQ_LOG_WARN, "request",
           LQ_LOG_STR("method", r->method), LQ_LOG_STR("path", r->path),
           LQ_LOG_INT("status", status), LQ_LOG_NUM("ms", seconds * 1e3),
           LQ_LOG_INT("body_bytes", (long long)r->body_received),
           LQ_LOG_STR("end", code == MHD_REQUEST_TERMINATED_COMPLETED_OK   ? "ok"
                             : code == MHD_REQUEST_TERMINATED_CLIENT_ABORT ? "client closed"
                                                                           : "error"));
    request_free(r);
    atomic_fetch_sub(&server->active, 1);
}

static void on_mhd_log(void *cls, const char *format, va_list args) {
    (void)cls;
    char message[512];
    vsnprintf(message, sizeof message, format, args);
    size_t length = strlen(message);
    while (length && (message[length - 1] == '\n' || message[length - 1] == ' '))
        message[--length] = '\0';
    lq_log(LQ_LOG_WARN, "microhttpd", LQ_LOG_STR("detail", message));
}

/* ---------- lifecycle ---------- */

int lq_http_server_start(const struct lq_http_server_options *options, struct lq_http_server **out,
                         struct lq_error *err) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *address;
    int gai = getaddrinfo(options->host, NULL, &hints, &address);
    if (gai)
        return lq_error_set(err, LQ_EINVAL, "cannot resolve host '%s': %s", options->host,
                            gai_strerror(gai));
    struct sockaddr_storage bind_address;
    memset(&bind_address, 0, sizeof bind_address);
    memcpy(&bind_address, address->ai_addr, address->ai_addrlen);
    int ipv6 = address->ai_family == AF_INET6;
    freeaddrinfo(address);
    if (ipv6)
        ((struct sockaddr_in6 *)&bind_address)->sin6_port = htons((uint16_t)options->port);
    else
        ((struct sockaddr_in *)&bind_address)->sin_port = htons((uint16_t)options->port);

    struct lq_http_server *server = calloc(1, sizeof *server);
    if (!server) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    server->options = *options;
    server->api_keys = calloc(options->n_api_keys + 1, sizeof *server->api_keys);
    for (size_t i = 0; server->api_keys && i < options->n_api_keys; i++)
        server->api_keys[i] = strdup(options->api_keys[i]);
    server->options.api_keys = NULL; /* the copies are used */
    atomic_init(&server->active, 0);
    atomic_init(&server->closing, 0);
    /* A thread per connection: handlers and stream readers block on their own thread while a
     * sequence generates, which keeps the code straight; poll() lifts select()'s fd limit, and
     * the inter-thread channel lets MHD_quiesce_daemon stop accepting while serving on. */
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                     MHD_USE_POLL | MHD_USE_ITC | MHD_USE_ERROR_LOG | (ipv6 ? MHD_USE_IPv6 : 0);
    server->daemon = MHD_start_daemon(
        flags, (uint16_t)options->port, NULL, NULL, on_access, server, MHD_OPTION_EXTERNAL_LOGGER,
        on_mhd_log, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&bind_address,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, server, MHD_OPTION_CONNECTION_LIMIT,
        options->max_connections, MHD_OPTION_CONNECTION_TIMEOUT, options->idle_timeout,
        MHD_OPTION_END);
    if (!server->daemon || !server->api_keys) {
        int port = options->port;
        lq_http_server_stop(server);
        return lq_error_set(err, LQ_EIO, "cannot listen on %s port %d (in use, or not allowed?)",
                            options->host, port);
    }
    const union MHD_DaemonInfo *info =
        MHD_get_daemon_info(server->daemon, MHD_DAEMON_INFO_BIND_PORT);
    server->port = info ? info->port : options->port;
    *out = server;
    return LQ_OK;
}

int lq_http_server_port(const struct lq_http_server *server) {
    return server->port;
}

void lq_http_server_quiesce(struct lq_http_server *server) {
    atomic_store(&server->closing, 1);
    MHD_socket listener = MHD_quiesce_daemon(server->daemon);
    if (listener != MHD_INVALID_SOCKET) close(listener);
}

int lq_http_server_active(const struct lq_http_server *server) {
    return atomic_load(&server->active);
}

void lq_http_server_stop(struct lq_http_server *server) {
    if (!server) return;
    atomic_store(&server->closing, 1);
    if (server->daemon) MHD_stop_daemon(server->daemon);
    for (size_t i = 0; server->api_keys && i < server->options.n_api_keys; i++)
        free(server->api_keys[i]);
    free(server->api_keys);
    free(server);
}
