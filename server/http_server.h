/* The HTTP side of the daemon: a libmicrohttpd server with a thread per connection, request
 * bodies gathered up to a size limit (multipart/form-data uploads streamed to disk instead),
 * bearer-token auth, a router built from routes.def, and responses as JSON, OpenAI-style
 * errors, streams or files.
 *
 * A handler runs on its connection's own thread, so it may block (waiting for generation,
 * loading a model) without holding up other clients; a stream's reader likewise blocks on
 * its connection's thread until it has bytes. Handlers learn that their client went away from
 * lq_http_request_client_gone. */
#ifndef LQ_HTTP_SERVER_H
#define LQ_HTTP_SERVER_H

#include <stddef.h>
#include <sys/types.h>

#include "core/error.h"
#include "server/metrics.h"

struct cJSON;
struct lq_http_server;
struct lq_http_request; /* one request and its response; owned by the server */

struct lq_http_server_options {
    const char *host;            /* address or name to bind ("127.0.0.1", "::1", "0.0.0.0") */
    int port;                    /* 0: any free port (see lq_http_server_port) */
    const char *const *api_keys; /* accepted bearer tokens (borrowed); none: no auth */
    size_t n_api_keys;
    size_t max_body;            /* larger request bodies get 413 */
    const char *upload_dir;     /* form uploads are written here (below); NULL: no streaming */
    size_t max_upload;          /* larger multipart/form-data bodies get 413 */
    unsigned max_connections;   /* more are refused at accept */
    unsigned idle_timeout;      /* seconds an idle connection is kept */
    struct lq_metrics *metrics; /* borrowed; requests are counted here */
    void *app;                  /* handed to every handler (struct lq_api) */
};

/* Binds and starts serving. LQ_EIO with a message when the address cannot be bound. */
int lq_http_server_start(const struct lq_http_server_options *options, struct lq_http_server **out,
                         struct lq_error *err);
/* The port bound (useful with port 0). */
int lq_http_server_port(const struct lq_http_server *server);
/* Stops accepting connections; those open are still served, with "Connection: close" on
 * every later response. */
void lq_http_server_quiesce(struct lq_http_server *server);
/* Requests between their arrival and the end of their response. */
int lq_http_server_active(const struct lq_http_server *server);
/* Closes every connection, waits for their threads and frees the server. Streams must be able
 * to end (their producers finished or cancelled) or this waits for them. */
void lq_http_server_stop(struct lq_http_server *server);

/* ---- inside a handler ---- */

const char *lq_http_request_method(const struct lq_http_request *request);
const char *lq_http_request_path(const struct lq_http_request *request);
/* The segment matched by the route's "{...}" placeholder, or NULL. */
const char *lq_http_request_path_param(const struct lq_http_request *request);
/* The body (NUL-terminated; may hold NULs), *length its size. Empty for a form upload. */
const char *lq_http_request_body(const struct lq_http_request *request, size_t *length);
/* A query-string argument (?name=value, decoded), or NULL. */
const char *lq_http_request_query(const struct lq_http_request *request, const char *name);
/* A request header (case-insensitive name), or NULL. */
const char *lq_http_request_header(const struct lq_http_request *request, const char *name);
/* Monotonic seconds at which the request arrived. */
double lq_http_request_arrival(const struct lq_http_request *request);
/* 1 when the client has closed its connection (checked without blocking). */
int lq_http_request_client_gone(struct lq_http_request *request);
/* Monotonic clock in seconds, as lq_http_request_arrival. */
double lq_http_now(void);

/* ---- multipart/form-data uploads ----
 * With an upload_dir, a multipart/form-data body is parsed as it arrives and never held in
 * memory: each file field is written to a temporary file in upload_dir, text fields are kept
 * (max_body bytes in all), a body over max_upload gets 413, one cut short before its closing
 * boundary 400. The handler runs once the whole body is in; without upload_dir such bodies
 * are gathered like any other. */

struct lq_http_form_field {
    const char *name;
    const char *filename;     /* a file field: the client's file name (may be ""); text: NULL */
    const char *content_type; /* of the part, as sent, or NULL */
    const char *value;        /* a text field: its value (NUL-terminated); a file field: NULL */
    const char *path;         /* a file field: the temporary file holding its bytes */
    size_t size;              /* bytes of the value or the file */
};

/* 1 when the body was multipart/form-data, parsed into fields. */
int lq_http_request_is_form(const struct lq_http_request *request);
/* The fields in the order sent (index < lq_http_request_form_count). */
size_t lq_http_request_form_count(const struct lq_http_request *request);
void lq_http_request_form_field(const struct lq_http_request *request, size_t index,
                                struct lq_http_form_field *out);
/* The index of the first field named so, or -1. */
int lq_http_request_form_find(const struct lq_http_request *request, const char *name);
/* The handler has moved field index's file away (renamed it): it is not deleted when the
 * request ends, as every other temporary file is. */
void lq_http_request_form_take(struct lq_http_request *request, size_t index);

/* Each request gets exactly one response; a handler that returns without one gets a 500.
 * These return 0, or LQ_ENOMEM / LQ_EIO when the response could not be queued. */

/* Adds a header to the response still to come (copied; 4 at most). */
void lq_http_set_header(struct lq_http_request *request, const char *name, const char *value);
int lq_http_respond(struct lq_http_request *request, int status, const char *content_type,
                    const void *body, size_t length);
int lq_http_respond_json(struct lq_http_request *request, int status, const struct cJSON *json);
/* {"error": {"message", "type", "param", "code"}} as OpenAI sends it; param and code may be
 * NULL (JSON null). */
int lq_http_respond_error(struct lq_http_request *request, int status, const char *type,
                          const char *code, const char *param, const char *format, ...)
    __attribute__((format(printf, 6, 7)));

/* The file fd (size bytes from its start) as the body; the server closes fd, also on error. */
int lq_http_respond_file(struct lq_http_request *request, int status, const char *content_type,
                         int fd, size_t size);

#define LQ_HTTP_STREAM_END 0      /* reader: the stream is complete */
#define LQ_HTTP_STREAM_ABORT (-1) /* reader: close the connection (client gone, failure) */
/* Fills buffer[0..size) with the next bytes: returns how many (> 0), LQ_HTTP_STREAM_END or
 * LQ_HTTP_STREAM_ABORT. Runs on the connection's thread and may block until bytes exist;
 * request stays valid while it runs. */
typedef ssize_t (*lq_http_stream_reader)(void *context, struct lq_http_request *request,
                                         char *buffer, size_t size);
/* A response of unknown length (chunked), read from reader until it ends; free_context(context)
 * is called once when the response is done with, whether it completed or not. On error the
 * context is freed too. */
int lq_http_respond_stream(struct lq_http_request *request, int status, const char *content_type,
                           lq_http_stream_reader reader, void (*free_context)(void *context),
                           void *context);

#endif
