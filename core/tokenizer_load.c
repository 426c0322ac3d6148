/* Reading tokenizer files: the format is told by content; llama2.c tokenizer.bin and
 * SentencePiece tokenizer.model are read here, HF tokenizer.json in tokenizer_json.c. */
#include "core/tokenizer_internal.h"

#include "core/gguf.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Tokenizer files are a few MB; this only stops a wrong path from reading a checkpoint. */
#define MAX_FILE_BYTES ((size_t)1 << 30)

static int read_file(const char *path, uint8_t **data, size_t *size, struct lq_error *err) {
    FILE *file = fopen(path, "rb");
    if (!file) return lq_error_set(err, LQ_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat info;
    if (fstat(fileno(file), &info) != 0 || !S_ISREG(info.st_mode)) {
        fclose(file);
        return lq_error_set(err, LQ_EIO, "%s: not a regular file", path);
    }
    if ((uint64_t)info.st_size > MAX_FILE_BYTES) {
        fclose(file);
        return lq_error_set(err, LQ_EFORMAT, "%s: %lld bytes is too large for a tokenizer", path,
                            (long long)info.st_size);
    }
    size_t length = (size_t)info.st_size;
    uint8_t *buffer = malloc(length ? length : 1);
    if (!buffer) {
        fclose(file);
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for %zu bytes", path, length);
    }
    size_t got = fread(buffer, 1, length, file);
    int failed = ferror(file);
    fclose(file);
    if (failed || got != length) {
        free(buffer);
        return lq_error_set(err, LQ_EIO, "%s: read %zu of %zu bytes", path, got, length);
    }
    *data = buffer;
    *size = length;
    return LQ_OK;
}

static int32_t read_i32(const uint8_t *p) {
    uint32_t value =
        (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    int32_t result;
    memcpy(&result, &value, sizeof result);
    return result;
}

static float read_f32(const uint8_t *p) {
    int32_t bits = read_i32(p);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* "<s>" at id 1 or "</s>" at id 2, bare or wrapped in newlines as llama2.c writes them. */
static bool is_control_text(const char *text, size_t length, int id) {
    const char *name = id == 1 ? "<s>" : "</s>";
    size_t name_length = strlen(name);
    if (length == name_length + 2 && text[0] == '\n' && text[length - 1] == '\n') {
        text++;
        length -= 2;
    }
    return length == name_length && memcmp(text, name, length) == 0;
}

/* llama2.c's export: int32 max_token_length, then per piece float score, int32 length and
 * the bytes, with spaces where SentencePiece has "▁", and "\n<s>\n" / "\n</s>\n" for ids 1
 * and 2. Types are not stored: <unk>, <s>, </s> at 0..2 and <0xNN> are recognised. */
int lq_tokenizer_parse_bin(const uint8_t *data, size_t size, const char *label,
                           struct lq_tokenizer **out, struct lq_error *err) {
    if (size < 4)
        return lq_error_set(err, LQ_EFORMAT, "%s: %zu bytes, too short for a tokenizer.bin", label,
                            size);
    int32_t max_length = read_i32(data);
    if (max_length <= 0 || max_length > LQ_TOKENIZER_MAX_PIECE_BYTES)
        return lq_error_set(err, LQ_EFORMAT, "%s: max_token_length %d is out of range", label,
                            max_length);
    struct lq_tokenizer *tokenizer = lq_tokenizer_new();
    char *piece = malloc((size_t)max_length * LQ_TOKENIZER_SPACE_BYTES + 1);
    if (!tokenizer || !piece) {
        lq_tokenizer_free(tokenizer);
        free(piece);
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    }
    int rc = LQ_OK, byte_pieces = 0;
    size_t at = 4;
    while (rc == LQ_OK && at < size) {
        int id = tokenizer->vocab_size;
        if (size - at < 8) {
            rc = lq_error_set(err, LQ_EFORMAT,
                              "%s: truncated: piece %d header needs 8 bytes at "
                              "byte %zu, %zu left",
                              label, id, at, size - at);
            break;
        }
        float score = read_f32(data + at);
        int32_t length = read_i32(data + at + 4);
        at += 8;
        if (length <= 0 || length > max_length) {
            rc = lq_error_set(err, LQ_EFORMAT, "%s: piece %d has length %d, outside 1..%d", label,
                              id, length, max_length);
            break;
        }
        if ((size_t)length > size - at) {
            rc = lq_error_set(err, LQ_EFORMAT,
                              "%s: truncated: piece %d needs %d bytes at byte "
                              "%zu, %zu left",
                              label, id, length, at, size - at);
            break;
        }
        const char *text = (const char *)data + at;
        at += (size_t)length;
        int type = LQ_TOKEN_NORMAL;
        size_t n = 0;
        if (id == 0 && length == 5 && memcmp(text, "<unk>", 5) == 0) {
            type = LQ_TOKEN_UNKNOWN;
            tokenizer->unk_id = id;
        } else if ((id == 1 || id == 2) && is_control_text(text, (size_t)length, id)) {
            type = LQ_TOKEN_CONTROL; /* without the newlines llama2.c's run.c prints */
            n = text[0] == '\n' ? (size_t)length - 2 : (size_t)length;
            memcpy(piece, text[0] == '\n' ? text + 1 : text, n);
            *(id == 1 ? &tokenizer->bos_id : &tokenizer->eos_id) = id;
        } else if (length == 6 && memcmp(text, "<0x", 3) == 0 && text[5] == '>') {
            type = LQ_TOKEN_BYTE;
            byte_pieces++;
        }
        if (n == 0) {
            for (int32_t i = 0; i < length; i++) {
                if (text[i] == ' ' && type == LQ_TOKEN_NORMAL) {
                    memcpy(piece + n, LQ_TOKENIZER_SPACE, LQ_TOKENIZER_SPACE_BYTES);
                    n += LQ_TOKENIZER_SPACE_BYTES;
                } else {
                    piece[n++] = text[i];
                }
            }
        }
        rc = lq_tokenizer_add_piece(tokenizer, piece, n, score, type, label, err);
    }
    free(piece);
    /* llama2.c itself has no flag: the byte pieces being there is what turns fallback on. */
    tokenizer->byte_fallback = byte_pieces > 0;
    if (rc == LQ_OK) rc = lq_tokenizer_finish(tokenizer, label, err);
    if (rc != LQ_OK) {
        lq_tokenizer_free(tokenizer);
        return rc;
    }
    *out = tokenizer;
    return LQ_OK;
}

/* A bounds-checked reader of the protobuf wire format, for the few fields needed. */
struct pb_reader {
    const uint8_t *at, *end, *begin;
};

enum { PB_VARINT = 0, PB_FIXED64 = 1, PB_BYTES = 2, PB_FIXED32 = 5 };

static bool pb_varint(struct pb_reader *reader, uint64_t *value) {
    uint64_t result = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (reader->at >= reader->end) return false;
        uint8_t byte = *reader->at++;
        result |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *value = result;
            return true;
        }
    }
    return false; /* more than 10 bytes */
}

static bool pb_bytes(struct pb_reader *reader, struct pb_reader *inner) {
    uint64_t length;
    if (!pb_varint(reader, &length) || length > (uint64_t)(reader->end - reader->at)) return false;
    *inner = (struct pb_reader){reader->at, reader->at + length, reader->begin};
    reader->at += length;
    return true;
}

static bool pb_skip(struct pb_reader *reader, unsigned wire) {
    uint64_t ignored;
    struct pb_reader inner;
    size_t left = (size_t)(reader->end - reader->at);
    switch (wire) {
    case PB_VARINT:
        return pb_varint(reader, &ignored);
    case PB_FIXED64:
        if (left < 8) return false;
        reader->at += 8;
        return true;
    case PB_BYTES:
        return pb_bytes(reader, &inner);
    case PB_FIXED32:
        if (left < 4) return false;
        reader->at += 4;
        return true;
    default: /* groups (3, 4) are not in sentencepiece_model.proto; 6, 7 do not exist */
        return false;
    }
}

struct model_spec {
    int model_type, byte_fallback, treat_whitespace_as_suffix;
    int add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
    bool has_charsmap, has_rules;
    char name[64];
    struct pb_reader unk_surface, bos_piece, eos_piece;
    bool has_unk_surface, has_bos_piece, has_eos_piece;
};

#define PB_ERROR(label, reader, what)                                                              \
    lq_error_set(err, LQ_EFORMAT, "%s: bad protobuf at byte %zu: %s", label,                       \
                 (size_t)((reader)->at - (reader)->begin), what)

/* Reads the next field's tag; false at the end of the message. *rc is set on a bad tag. */
static bool pb_next(struct pb_reader *reader, uint64_t *field, unsigned *wire, int *rc,
                    const char *label, struct lq_error *err) {
    if (reader->at >= reader->end) return false;
    uint64_t tag;
    if (!pb_varint(reader, &tag) || (tag >> 3) == 0 || (tag >> 3) > 0x1fffffff) {
        *rc = PB_ERROR(label, reader, "invalid field tag");
        return false;
    }
    *field = tag >> 3;
    *wire = (unsigned)(tag & 7);
    return true;
}

static int parse_piece(struct pb_reader *reader, struct lq_tokenizer *tokenizer, const char *label,
                       struct lq_error *err) {
    struct pb_reader text = {0};
    float score = 0;
    uint64_t type = LQ_TOKEN_NORMAL, field;
    unsigned wire;
    int rc = LQ_OK;
    while (rc == LQ_OK && pb_next(reader, &field, &wire, &rc, label, err)) {
        bool ok;
        if (field == 1 && wire == PB_BYTES) {
            ok = pb_bytes(reader, &text);
        } else if (field == 2 && wire == PB_FIXED32) {
            ok = reader->end - reader->at >= 4;
            if (ok) score = read_f32(reader->at), reader->at += 4;
        } else if (field == 3 && wire == PB_VARINT) {
            ok = pb_varint(reader, &type);
        } else if (field <= 3) {
            return PB_ERROR(label, reader, "piece field has the wrong wire type");
        } else {
            ok = pb_skip(reader, wire);
        }
        if (!ok) rc = PB_ERROR(label, reader, "piece field runs past its message");
    }
    if (rc != LQ_OK) return rc;
    if (type < LQ_TOKEN_NORMAL || type > LQ_TOKEN_BYTE)
        return lq_error_set(err, LQ_EFORMAT, "%s: piece %d has unknown type %llu", label,
                            tokenizer->vocab_size, (unsigned long long)type);
    if (type == LQ_TOKEN_UNKNOWN) {
        if (tokenizer->unk_id >= 0)
            return lq_error_set(err, LQ_EFORMAT, "%s: pieces %d and %d are both <unk>", label,
                                tokenizer->unk_id, tokenizer->vocab_size);
        tokenizer->unk_id = tokenizer->vocab_size;
    }
    return lq_tokenizer_add_piece(tokenizer, (const char *)text.at,
                                  text.at ? (size_t)(text.end - text.at) : 0, score, (int)type,
                                  label, err);
}

/* TrainerSpec (field 2) and NormalizerSpec (field 3): the scalar fields lqd acts on. */
static int parse_spec(struct pb_reader *reader, bool trainer, struct model_spec *spec,
                      const char *label, struct lq_error *err) {
    uint64_t field, value;
    unsigned wire;
    int rc = LQ_OK;
    while (rc == LQ_OK && pb_next(reader, &field, &wire, &rc, label, err)) {
        int *flag = NULL;
        struct pb_reader *text = NULL;
        bool *seen = NULL;
        if (trainer) {
            if (field == 3) flag = &spec->model_type;
            if (field == 35) flag = &spec->byte_fallback;
            if (field == 24) flag = &spec->treat_whitespace_as_suffix;
            if (field == 44) text = &spec->unk_surface, seen = &spec->has_unk_surface;
            if (field == 46) text = &spec->bos_piece, seen = &spec->has_bos_piece;
            if (field == 47) text = &spec->eos_piece, seen = &spec->has_eos_piece;
        } else {
            if (field == 3) flag = &spec->add_dummy_prefix;
            if (field == 4) flag = &spec->remove_extra_whitespaces;
            if (field == 5) flag = &spec->escape_whitespaces;
        }
        bool ok = true;
        if (flag) {
            ok = wire == PB_VARINT && pb_varint(reader, &value);
            if (ok) *flag = value > 0x7fffffff ? 0x7fffffff : (int)value;
        } else if (text) {
            ok = wire == PB_BYTES && pb_bytes(reader, text);
            *seen = true;
        } else if (!trainer && field <= 2 && wire == PB_BYTES) {
            struct pb_reader bytes = {0};
            ok = pb_bytes(reader, &bytes);
            size_t length = ok ? (size_t)(bytes.end - bytes.at) : 0;
            if (ok && field == 1) {
                if (length >= sizeof spec->name) length = sizeof spec->name - 1;
                memcpy(spec->name, bytes.at, length);
                spec->name[length] = '\0';
            } else {
                spec->has_charsmap = length > 0;
            }
        } else if (!trainer && field == 6 && wire == PB_BYTES) {
            struct pb_reader bytes = {0};
            ok = pb_bytes(reader, &bytes);
            spec->has_rules = ok && bytes.end > bytes.at;
        } else {
            ok = pb_skip(reader, wire);
        }
        if (!ok)
            rc = PB_ERROR(label, reader,
                          trainer ? "bad trainer_spec field" : "bad normalizer_spec field");
    }
    return rc;
}

/* Id of the CONTROL piece named by bos_piece/eos_piece (SentencePiece's bos_id()), or -1. */
static int control_id(const struct lq_tokenizer *tokenizer, const struct pb_reader *name,
                      bool named, const char *fallback) {
    const char *text = named ? (const char *)name->at : fallback;
    size_t length = named ? (size_t)(name->end - name->at) : strlen(fallback);
    int id = text ? lq_tokenizer_find(tokenizer, text, length) : -1;
    return id >= 0 && tokenizer->types[id] == LQ_TOKEN_CONTROL ? id : -1;
}

static int check_spec(struct lq_tokenizer *tokenizer, const struct model_spec *spec,
                      const char *label, struct lq_error *err) {
    if (spec->model_type != 2)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: model_type is %s (%d); lqd reads BPE "
                            "models only",
                            label, spec->model_type == 1 ? "UNIGRAM" : "not BPE", spec->model_type);
    if (spec->treat_whitespace_as_suffix)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: treat_whitespace_as_suffix is not "
                            "supported",
                            label);
    if (spec->has_charsmap || spec->has_rules)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: normalizer \"%s\" rewrites characters "
                            "(precompiled_charsmap); lqd implements the identity normalizer only",
                            label, spec->name);
    tokenizer->byte_fallback = spec->byte_fallback != 0;
    tokenizer->add_dummy_prefix = spec->add_dummy_prefix != 0;
    tokenizer->remove_extra_whitespaces = spec->remove_extra_whitespaces != 0;
    tokenizer->escape_whitespaces = spec->escape_whitespaces != 0;
    if (spec->has_unk_surface) {
        size_t length = (size_t)(spec->unk_surface.end - spec->unk_surface.at);
        tokenizer->unk_surface = malloc(length + 1);
        if (!tokenizer->unk_surface)
            return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
        if (length) memcpy(tokenizer->unk_surface, spec->unk_surface.at, length);
        tokenizer->unk_surface[length] = '\0';
    }
    return LQ_OK;
}

/* SentencePiece's ModelProto: pieces (1), trainer_spec (2), normalizer_spec (3); the
 * denormalizer (5) must not rewrite anything either. */
int lq_tokenizer_parse_model(const uint8_t *data, size_t size, const char *label,
                             struct lq_tokenizer **out, struct lq_error *err) {
    /* proto2 defaults: UNIGRAM, no byte fallback, and every normalizer flag on. */
    struct model_spec spec = {.model_type = 1,
                              .add_dummy_prefix = 1,
                              .remove_extra_whitespaces = 1,
                              .escape_whitespaces = 1};
    struct model_spec denormalizer = spec;
    struct lq_tokenizer *tokenizer = lq_tokenizer_new();
    if (!tokenizer) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    struct pb_reader reader = {data, data + size, data};
    uint64_t field;
    unsigned wire;
    int rc = LQ_OK;
    while (rc == LQ_OK && pb_next(&reader, &field, &wire, &rc, label, err)) {
        struct pb_reader inner;
        if (field >= 1 && field <= 5 && field != 4 && wire != PB_BYTES) {
            rc = PB_ERROR(label, &reader, "message field has the wrong wire type");
        } else if (field >= 1 && field <= 5 && field != 4) {
            if (!pb_bytes(&reader, &inner)) {
                rc = PB_ERROR(label, &reader, "field length runs past the end");
            } else if (field == 1) {
                rc = parse_piece(&inner, tokenizer, label, err);
            } else {
                rc = parse_spec(&inner, field == 2, field == 5 ? &denormalizer : &spec, label, err);
            }
        } else if (!pb_skip(&reader, wire)) {
            rc = PB_ERROR(label, &reader, "field runs past the end");
        }
    }
    if (rc == LQ_OK && tokenizer->vocab_size == 0)
        rc = lq_error_set(err, LQ_EFORMAT, "%s: no pieces: not a SentencePiece model", label);
    if (rc == LQ_OK && (denormalizer.has_charsmap || denormalizer.has_rules))
        rc = lq_error_set(err, LQ_EUNSUPPORTED,
                          "%s: the denormalizer rewrites characters; "
                          "lqd does not implement it",
                          label);
    if (rc == LQ_OK) rc = check_spec(tokenizer, &spec, label, err);
    if (rc == LQ_OK) rc = lq_tokenizer_finish(tokenizer, label, err);
    if (rc == LQ_OK) {
        tokenizer->bos_id = control_id(tokenizer, &spec.bos_piece, spec.has_bos_piece, "<s>");
        tokenizer->eos_id = control_id(tokenizer, &spec.eos_piece, spec.has_eos_piece, "</s>");
    }
    if (rc != LQ_OK) {
        lq_tokenizer_free(tokenizer);
        return rc;
    }
    *out = tokenizer;
    return LQ_OK;
}

int lq_tokenizer_load_buffer(const void *data, size_t size, const char *label,
                             struct lq_tokenizer **out, struct lq_error *err) {
    if (!out || (size > 0 && !data))
        return lq_error_set(err, LQ_EINVAL, "tokenizer load: missing argument");
    *out = NULL;
    if (!label) label = "<buffer>";
    const uint8_t *bytes = data;
    size_t first = 0;
    while (first < size && (bytes[first] == ' ' || bytes[first] == '\t' || bytes[first] == '\n' ||
                            bytes[first] == '\r'))
        first++;
    if (size == 0) return lq_error_set(err, LQ_EFORMAT, "%s: empty file", label);
    if (size >= 4 && memcmp(bytes, "GGUF", 4) == 0)
        return lq_tokenizer_parse_gguf(bytes, size, label, out, err);
    if (first < size && bytes[first] == '{')
        return lq_tokenizer_parse_json(bytes, size, label, out, err);
    /* A tokenizer.bin starts with a small int32 (max_token_length); a SentencePiece model
     * with a length-delimited field, whose third byte is never 0 in a valid file. */
    if (size >= 4 && read_i32(bytes) >= 1 && read_i32(bytes) <= LQ_TOKENIZER_MAX_PIECE_BYTES)
        return lq_tokenizer_parse_bin(bytes, size, label, out, err);
    if ((bytes[0] & 7) == PB_BYTES && (bytes[0] >> 3) >= 1 && (bytes[0] >> 3) <= 5)
        return lq_tokenizer_parse_model(bytes, size, label, out, err);
    return lq_error_set(err, LQ_EFORMAT,
                        "%s: not a tokenizer.json, SentencePiece tokenizer.model "
                        "or llama2.c tokenizer.bin (first byte 0x%02x)",
                        label, bytes[0]);
}

int lq_tokenizer_load(const char *path, struct lq_tokenizer **out, struct lq_error *err) {
    if (!path || !out) return lq_error_set(err, LQ_EINVAL, "tokenizer load: missing argument");
    *out = NULL;
    struct stat info;
    if (stat(path, &info) != 0)
        return lq_error_set(err, errno == ENOENT ? LQ_ENOTFOUND : LQ_EIO, "%s: %s", path,
                            strerror(errno));
    if (S_ISDIR(info.st_mode)) {
        static const char *const names[] = {"tokenizer.json", "tokenizer.model", "tokenizer.bin"};
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
            char joined[4096];
            int n = snprintf(joined, sizeof joined, "%s/%s", path, names[i]);
            if (n < 0 || (size_t)n >= sizeof joined)
                return lq_error_set(err, LQ_EINVAL, "%s: path too long", path);
            if (stat(joined, &info) == 0 && S_ISREG(info.st_mode))
                return lq_tokenizer_load(joined, out, err);
        }
        return lq_error_set(err, LQ_ENOTFOUND,
                            "%s: no tokenizer.json, tokenizer.model or "
                            "tokenizer.bin in this directory",
                            path);
    }
    /* A GGUF model is mapped, not read: only its metadata is needed. */
    FILE *file = fopen(path, "rb");
    char magic[4] = {0};
    bool is_gguf = file && fread(magic, 1, 4, file) == 4 && memcmp(magic, "GGUF", 4) == 0;
    if (file) fclose(file);
    if (is_gguf) {
        struct lq_gguf *gguf = NULL;
        int rc = lq_gguf_open(path, &gguf, err);
        if (rc == LQ_OK) rc = lq_tokenizer_from_gguf(gguf, path, out, err);
        lq_gguf_close(gguf);
        return rc;
    }
    uint8_t *data = NULL;
    size_t size = 0;
    int rc = read_file(path, &data, &size, err);
    if (rc != LQ_OK) return rc;
    rc = lq_tokenizer_load_buffer(data, size, path, out, err);
    free(data);
    return rc;
}
