/* Files over HTTP, as OpenAI's files API: POST /v1/files (multipart/form-data with "file" and
 * "purpose"; the HTTP layer has streamed the file to a temporary file already), GET /v1/files,
 * GET /v1/files/{id}, GET /v1/files/{id}/content and DELETE /v1/files/{id}. An upload is
 * checked as a finetuning dataset (core/dataset.h, structure only) before it is stored, so a
 * malformed one is refused with the line at fault; the store is server/files.c's. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/dataset.h"
#include "server/api.h"
#include "server/files.h"

static int files_available(struct lq_api *api, struct lq_http_request *request) {
    if (api->files) return 1;
    lq_http_respond_error(request, 503, "server_error", "files_unavailable", NULL,
                          "file storage is not available on this daemon");
    return 0;
}

static void file_not_found(struct lq_http_request *request, const char *id) {
    lq_http_respond_error(request, 404, "invalid_request_error", "file_not_found", "id",
                          "the file '%.64s' does not exist", id ? id : "");
}

/* The length of the longest prefix of s (at most max bytes) that is whole UTF-8 characters, or
 * (size_t)-1 when s is not valid UTF-8. */
static size_t utf8_prefix(const unsigned char *s, size_t max) {
    size_t i = 0, whole = 0;
    while (s[i]) {
        size_t n = s[i] < 0x80                    ? 0
                   : s[i] >= 0xc2 && s[i] <= 0xdf ? 1
                   : s[i] >= 0xe0 && s[i] <= 0xef ? 2
                   : s[i] >= 0xf0 && s[i] <= 0xf4 ? 3
                                                  : 9;
        if (n == 9) return (size_t)-1;
        for (size_t k = 1; k <= n; k++)
            if ((s[i + k] & 0xc0) != 0x80) return (size_t)-1;
        i += n + 1;
        if (i <= max) whole = i;
    }
    return whole;
}

/* The client's file name as stored: its last path component (browsers may send a full path),
 * control characters as '_', at most 255 bytes of whole UTF-8 characters (anything else
 * beyond ASCII as '_'), "upload" when empty. */
static void clean_filename(const char *given, char *out, size_t size) {
    const char *base = given;
    for (const char *p = given; *p; p++)
        if (*p == '/' || *p == '\\') base = p + 1;
    snprintf(out, size, "%s", base);
    for (char *p = out; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '_';
    size_t keep = utf8_prefix((const unsigned char *)base, size - 1);
    if (keep == (size_t)-1) {
        for (char *p = out; *p; p++)
            if ((unsigned char)*p >= 0x80) *p = '_';
    } else {
        out[keep] = '\0';
    }
    if (!out[0]) snprintf(out, size, "upload");
}

/* ---------- POST /v1/files ---------- */

static void refuse(struct lq_http_request *request, const char *code, const char *param,
                   const char *message) {
    lq_http_respond_error(request, 400, "invalid_request_error", code, param, "%s", message);
}

void lq_api_files_create(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!files_available(api, request)) return;
    if (!lq_http_request_is_form(request)) {
        refuse(request, "invalid_content_type", NULL,
               "upload files as multipart/form-data with the fields 'file' and 'purpose'");
        return;
    }
    struct lq_http_form_field purpose = {0}, file = {0}, format_field = {0};
    int purpose_index = lq_http_request_form_find(request, "purpose");
    int file_index = lq_http_request_form_find(request, "file");
    int format_index = lq_http_request_form_find(request, "format");
    size_t n_files = 0;
    for (size_t i = 0; i < lq_http_request_form_count(request); i++) {
        struct lq_http_form_field field;
        lq_http_request_form_field(request, i, &field);
        n_files += strcmp(field.name, "file") == 0;
    }
    if (purpose_index >= 0) lq_http_request_form_field(request, (size_t)purpose_index, &purpose);
    if (file_index >= 0) lq_http_request_form_field(request, (size_t)file_index, &file);
    if (format_index >= 0) lq_http_request_form_field(request, (size_t)format_index, &format_field);
    enum lq_dataset_format format = LQ_DATASET_AUTO;
    if (purpose_index < 0) {
        refuse(request, "missing_required_parameter", "purpose",
               "'purpose' is required: \"fine-tune\"");
    } else if (!purpose.value) {
        refuse(request, "invalid_type", "purpose", "'purpose' must be a text field");
    } else if (strcmp(purpose.value, "fine-tune") != 0) {
        lq_http_respond_error(request, 400, "invalid_request_error", "invalid_value", "purpose",
                              "purpose '%.64s' is not supported: lqd stores \"fine-tune\" files",
                              purpose.value);
    } else if (file_index < 0) {
        refuse(request, "missing_required_parameter", "file",
               "'file' is required: the dataset, as a file part of the form");
    } else if (!file.path) {
        refuse(request, "invalid_type", "file",
               "'file' must be a file part (Content-Disposition with a filename)");
    } else if (n_files > 1) {
        refuse(request, "invalid_value", "file", "the form holds more than one 'file'");
    } else if (format_index >= 0 &&
               (!format_field.value || lq_dataset_format_parse(format_field.value, &format))) {
        refuse(request, "invalid_value", "format",
               "'format' must be auto, plain, text, prompt-completion or chat");
    } else {
        char filename[256];
        clean_filename(file.filename, filename, sizeof filename);
        struct lq_dataset_summary summary;
        struct lq_error err = {0};
        int rc = lq_dataset_validate(file.path, filename, format, &summary, &err);
        if (rc == LQ_EFORMAT) {
            refuse(request, "invalid_file", "file", err.message);
            return;
        }
        cJSON *record = NULL;
        if (!rc)
            rc =
                lq_files_add(api->files, file.path, filename, "fine-tune", &summary, &record, &err);
        if (rc) {
            lq_http_respond_error(request, 500, "server_error", NULL, NULL, "%s", err.message);
            return;
        }
        lq_http_request_form_take(request, (size_t)file_index);
        lq_http_respond_json(request, 200, record);
        cJSON_Delete(record);
    }
}

/* ---------- reads and delete ---------- */

/* "1".."10000" -> *out; -1 when not such a number. */
static int parse_limit(const char *text, size_t *out) {
    size_t value = 0;
    if (!text[0] || strlen(text) > 5) return -1;
    for (const char *p = text; *p; p++) {
        if (*p < '0' || *p > '9') return -1;
        value = value * 10 + (size_t)(*p - '0');
    }
    if (value < 1 || value > 10000) return -1;
    *out = value;
    return 0;
}

void lq_api_files_list(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!files_available(api, request)) return;
    const char *purpose = lq_http_request_query(request, "purpose");
    const char *after = lq_http_request_query(request, "after");
    const char *limit_text = lq_http_request_query(request, "limit");
    const char *order = lq_http_request_query(request, "order");
    size_t limit = 10000;
    if (limit_text && parse_limit(limit_text, &limit)) {
        refuse(request, "invalid_value", "limit", "'limit' must be an integer in [1, 10000]");
        return;
    }
    if (order && strcmp(order, "asc") != 0 && strcmp(order, "desc") != 0) {
        refuse(request, "invalid_value", "order", "'order' must be asc or desc");
        return;
    }
    int ascending = order && strcmp(order, "asc") == 0;
    cJSON *list = lq_files_list(api->files, purpose && *purpose ? purpose : NULL,
                                after && *after ? after : NULL, limit, ascending);
    if (!list) {
        lq_http_respond_error(request, 400, "invalid_request_error", "invalid_value", "after",
                              "'after': the file '%.64s' does not exist", after ? after : "");
        return;
    }
    lq_http_respond_json(request, 200, list);
    cJSON_Delete(list);
}

void lq_api_files_get(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!files_available(api, request)) return;
    const char *id = lq_http_request_path_param(request);
    cJSON *record = id ? lq_files_get(api->files, id) : NULL;
    if (!record) {
        file_not_found(request, id);
        return;
    }
    lq_http_respond_json(request, 200, record);
    cJSON_Delete(record);
}

void lq_api_files_content(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!files_available(api, request)) return;
    const char *id = lq_http_request_path_param(request);
    int fd = -1;
    size_t size = 0;
    struct lq_file_info info;
    int rc = id ? lq_files_open_content(api->files, id, &fd, &size, &info) : LQ_ENOTFOUND;
    if (rc == LQ_ENOTFOUND) {
        file_not_found(request, id);
        return;
    }
    if (rc) {
        lq_http_respond_error(request, 500, "server_error", NULL, NULL, "cannot read the file '%s'",
                              id);
        return;
    }
    /* The name for a download, in the plain form every client reads: ASCII, no quotes. */
    char disposition[300], ascii[256];
    snprintf(ascii, sizeof ascii, "%s", info.filename);
    for (char *p = ascii; *p; p++)
        if ((unsigned char)*p >= 0x80 || *p == '"' || *p == '\\') *p = '_';
    snprintf(disposition, sizeof disposition, "attachment; filename=\"%s\"", ascii);
    lq_http_set_header(request, "Content-Disposition", disposition);
    lq_http_respond_file(request, 200, "application/octet-stream", fd, size);
}

void lq_api_files_delete(void *app, struct lq_http_request *request) {
    struct lq_api *api = app;
    if (!files_available(api, request)) return;
    const char *id = lq_http_request_path_param(request);
    struct lq_error err = {0};
    int rc = id ? lq_files_delete(api->files, id, &err) : LQ_ENOTFOUND;
    if (rc == LQ_ENOTFOUND) {
        file_not_found(request, id);
        return;
    }
    if (rc) {
        lq_http_respond_error(request, 500, "server_error", NULL, NULL, "%s", err.message);
        return;
    }
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "id", id);
    cJSON_AddStringToObject(root, "object", "file");
    cJSON_AddBoolToObject(root, "deleted", 1);
    lq_http_respond_json(request, 200, root);
    cJSON_Delete(root);
}
