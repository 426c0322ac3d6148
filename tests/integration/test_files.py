"""The files API of `lqd serve` (finetuning datasets) over its real HTTP protocol: uploads as
multipart/form-data bodies written by hand (http.client) and through the official OpenAI client
(`client.files.create(file=..., purpose="fine-tune")`); upload -> list -> get -> content byte for
byte (bytes that look like multipart boundaries included), delete; 413 over --max-upload-size
(declared, and chunked without a length); 400 for a bad or missing purpose, a missing file, a
malformed dataset (naming the file and line) and malformed forms, each with OpenAI's error shape
and no temporary file left behind; auth on every route; concurrent uploads; and files surviving a
daemon restart, while what a crash leaves (half uploads, bytes without a record) is cleaned up.

Environment: LQD (the binary, default build/server/lqd), LQ_REPO_ROOT."""
import concurrent.futures
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_util  # noqa: E402
from serve_util import check, finish, multipart  # noqa: E402

KEY = "files-key-0123456789"
MAX_UPLOAD = 64 * 1024

try:
    import openai
except ImportError:  # the hand-written requests still run
    openai = None


class Daemon(serve_util.Daemon):
    """lqd serve on 127.0.0.1 with STATE as its state directory and a 64 KiB upload limit."""

    timeout = 60

    def __init__(self, state_dir, *extra):
        super().__init__(state_dir, "--api-key", KEY, "--max-upload-size", str(MAX_UPLOAD), *extra, key=KEY)

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0,
                             timeout=60)

    def stop(self, grace=15):
        return super().stop(grace)


def error_shape(body, code=None, param=None):
    """OpenAI's {"error": {"message", "type", "param", "code"}}, with code and param when given."""
    error = (body or {}).get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("message"), str) and error.get("type")
            and (code is None or error.get("code") == code) and (param is None or error.get("param") == param))


def leftovers(state_dir):
    """Names in STATE/files that are neither a file's bytes nor its record."""
    names = os.listdir(os.path.join(state_dir, "files"))
    return [n for n in names if not (n.startswith("file-") and ("." not in n or n.endswith(".json")))]


# Datasets: chat JSON lines with non-ASCII text, and plain text whose bytes look like multipart
# syntax (boundary-like lines, CRLF, "--") that the parser must not mistake for the form's own.
CHAT = "".join(json.dumps({"messages": [{"role": "user", "content": f"Tell story {i} ✨"},
                                         {"role": "assistant", "content": f"Once upon a time, Lily {i}. 日本"}]},
                          ensure_ascii=False) + "\n" for i in range(20)).encode()
TRICKY = (b"Once upon a time\r\n--lqd-boundary\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n"
          b"there was a girl.\r\n\r\n--\r\n-- --\r\n\xe2\x9c\xa8 Lily\n\nThe end.--\r\n")


def test_round_trip(daemon):
    before = int(time.time())
    status, chat = daemon.upload([("purpose", "fine-tune", None), ("file", CHAT, "train.jsonl")])
    check(status == 200, f"upload: {status} {chat}")
    if status != 200:
        return None, None
    check(chat["object"] == "file" and chat["id"].startswith("file-") and chat["purpose"] == "fine-tune",
          f"record {chat}")
    check(chat["bytes"] == len(CHAT) and chat["filename"] == "train.jsonl", f"record {chat}")
    check(before - 1 <= chat["created_at"] <= time.time() + 1, f"created_at {chat['created_at']}")
    check(chat["format"] == "chat" and chat["documents"] == 20, f"dataset shape {chat}")
    # The file part first this time, and a name with a path (a browser's): the last component.
    status, tricky = daemon.upload([("file", TRICKY, "C:\\data\\stories.txt"), ("purpose", "fine-tune", None)])
    check(status == 200 and tricky["filename"] == "stories.txt" and tricky["format"] == "plain"
          and tricky["documents"] == 4, f"tricky upload: {status} {tricky}")
    for record, data in ((chat, CHAT), (tricky, TRICKY)):
        status, got = daemon.json("GET", f"/v1/files/{record['id']}")
        check(status == 200 and got == record, f"get {record['id']}: {status} {got}")
        status, content, headers = daemon.request("GET", f"/v1/files/{record['id']}/content")
        check(status == 200 and content == data, f"content of {record['filename']}: {status}, "
              f"{len(content)} bytes, equal {content == data}")
        check(headers.get("content-length") == str(len(data)), f"content-length {headers.get('content-length')}")
        check(f'filename="{record["filename"]}"' in headers.get("content-disposition", ""),
              f"content-disposition {headers.get('content-disposition')}")
    # Lists: newest first by default, oldest first with order=asc, pages with limit and after.
    status, listed = daemon.json("GET", "/v1/files")
    ids = [f["id"] for f in listed["data"]] if status == 200 else []
    check(status == 200 and listed["object"] == "list" and listed["has_more"] is False, f"list {listed}")
    check(ids.index(tricky["id"]) < ids.index(chat["id"]) if chat["created_at"] < tricky["created_at"]
          else set(ids) >= {chat["id"], tricky["id"]}, f"list order {ids}")
    check(listed["data"][ids.index(chat["id"])] == chat, "listed record equals the upload's")
    status, ascending = daemon.json("GET", "/v1/files?order=asc")
    check(status == 200 and [f["id"] for f in ascending["data"]] == ids[::-1], f"asc {ascending}")
    status, page = daemon.json("GET", "/v1/files?order=asc&limit=1")
    check(status == 200 and len(page["data"]) == 1 and page["has_more"] is True, f"page 1 {page}")
    status, rest = daemon.json("GET", f"/v1/files?order=asc&limit=1&after={page['data'][0]['id']}")
    check(status == 200 and rest["data"][0]["id"] == ids[::-1][1], f"page 2 {rest}")
    status, filtered = daemon.json("GET", "/v1/files?purpose=batch")
    check(status == 200 and filtered["data"] == [], f"purpose filter {filtered}")
    status, filtered = daemon.json("GET", "/v1/files?purpose=fine-tune")
    check(status == 200 and len(filtered["data"]) == len(ids), f"purpose fine-tune {filtered}")
    return chat, tricky


def test_openai_client(daemon):
    if openai is None:
        print("the openai package is not installed: the client part is skipped")
        return
    client = daemon.client()
    data = b'{"prompt": "Once upon a time,", "completion": " there was Lily."}\n' * 3
    created = client.files.create(file=("completion.jsonl", data), purpose="fine-tune")
    check(created.id.startswith("file-") and created.bytes == len(data) and created.purpose == "fine-tune"
          and created.filename == "completion.jsonl", f"client create: {created}")
    check(created.status == "processed", f"status {created.status}")
    retrieved = client.files.retrieve(created.id)
    check(retrieved.id == created.id and retrieved.bytes == len(data), f"client retrieve {retrieved}")
    check(client.files.content(created.id).content == data, "client content differs")
    listed = [f.id for f in client.files.list()]  # auto-pagination follows has_more
    check(created.id in listed, f"client list {listed}")
    deleted = client.files.delete(created.id)
    check(deleted.id == created.id and deleted.deleted is True, f"client delete {deleted}")
    try:
        client.files.retrieve(created.id)
        check(False, "a deleted file is still found")
    except openai.NotFoundError as error:
        check(error.status_code == 404, "404 after delete")
    try:
        client.files.create(file=("x.jsonl", data), purpose="batch")
        check(False, "purpose batch accepted")
    except openai.BadRequestError as error:
        check(error.status_code == 400 and "purpose" in str(error), f"bad purpose: {error}")
    try:
        client.files.create(file=("x.jsonl", b'{"prompt": "a"}\n'), purpose="fine-tune")
        check(False, "a malformed dataset accepted")
    except openai.BadRequestError as error:
        check("x.jsonl:1: expected a JSON object with \\\"prompt\\\" and \\\"completion\\\"" in str(error)
              or 'x.jsonl:1: expected a JSON object with "prompt" and "completion"' in str(error),
              f"malformed: {error}")


def test_refusals(daemon, state_dir):
    good = b'{"text": "Lily played."}\n'
    cases = [
        ([("file", good, "a.jsonl")], 400, "missing_required_parameter", "purpose"),
        ([("purpose", "fine-tune", None)], 400, "missing_required_parameter", "file"),
        ([("purpose", "assistants", None), ("file", good, "a.jsonl")], 400, "invalid_value", "purpose"),
        ([("purpose", "fine-tune", None), ("file", good.decode(), None)], 400, "invalid_type", "file"),
        ([("purpose", "fine-tune", None), ("file", good, "a.jsonl"), ("file", good, "b.jsonl")], 400,
         "invalid_value", "file"),
        ([("purpose", "fine-tune", None), ("file", b"", "a.jsonl"), ("file", good, "b.jsonl")], 400,
         "invalid_value", "file"),
        ([("purpose", "fine-tune", None), ("file", good, "a.jsonl"), ("format", "csv", None)], 400,
         "invalid_value", "format"),
        ([("purpose", "fine-tune", None), ("file", b"", "empty.jsonl")], 400, "invalid_file", "file"),
        ([("purpose", "fine-tune", None), ("file", b"\x00\x01\x02binary", "model.bin")], 400, "invalid_file",
         "file"),
        ([("f%d" % i, "x", None) for i in range(17)], 400, "invalid_form", None),
    ]
    for fields, status_wanted, code, param in cases:
        status, body = daemon.upload(fields)
        check(status == status_wanted and error_shape(body, code, param),
              f"{[f[0] for f in fields]}: {status} {body}")
    # A malformed dataset: the message names the file and the line.
    bad = b"".join(json.dumps({"text": f"story {i}"}).encode() + b"\n" for i in range(16))
    bad += b'{"txt": "story 16"}\n{"text": "story 17"}\n'
    status, body = daemon.upload([("purpose", "fine-tune", None), ("file", bad, "train.jsonl")])
    check(status == 400 and error_shape(body, "invalid_file", "file")
          and body["error"]["message"] == 'train.jsonl:17: expected a JSON object with "text"',
          f"malformed JSONL: {status} {body}")
    status, body = daemon.upload([("purpose", "fine-tune", None),
                                  ("file", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "chat.jsonl")])
    check(status == 400 and body["error"]["message"] == "chat.jsonl:1: no assistant message: nothing to train on",
          f"chat without answer: {status} {body}")
    # An explicit format reads the file as such: JSON lines as plain text.
    status, body = daemon.upload([("purpose", "fine-tune", None), ("format", "plain", None), ("file", bad, "t.jsonl")])
    check(status == 200 and body["format"] == "plain" and body["documents"] == 1, f"format plain: {status} {body}")
    if status == 200:
        daemon.request("DELETE", f"/v1/files/{body['id']}")
    # Over --max-upload-size: refused from Content-Length before the body, and, sent chunked
    # without a length, once the limit is passed; the daemon goes on serving.
    big = b'{"text": "' + b"a" * (MAX_UPLOAD + 10) + b'"}\n'
    status, body = daemon.upload([("purpose", "fine-tune", None), ("file", big, "big.jsonl")])
    check(status == 413 and error_shape(body, "body_too_large"), f"too large: {status} {body}")
    form, content_type = multipart([("purpose", "fine-tune", None), ("file", big, "big.jsonl")])
    pieces = (form[i:i + 8192] for i in range(0, len(form), 8192))
    status, data, _ = daemon.request("POST", "/v1/files", pieces, headers={"Content-Type": content_type},
                                     chunked=True)
    check(status == 413 and error_shape(json.loads(data), "body_too_large"), f"chunked too large: {status} {data}")
    # Exactly under the limit passes: the limit counts the whole multipart body.
    fits = b'{"text": "' + b"a" * (MAX_UPLOAD - 400) + b'"}\n'
    status, body = daemon.upload([("purpose", "fine-tune", None), ("file", fits, "fits.jsonl")])
    check(status == 200 and body.get("bytes") == len(fits), f"just under the limit: {status} {body}")
    if status == 200:
        daemon.request("DELETE", f"/v1/files/{body['id']}")
    # Not a form; a form without a boundary; a form cut short.
    status, body = daemon.json("POST", "/v1/files", json.dumps({"file": "x", "purpose": "fine-tune"}),
                               headers={"Content-Type": "application/json"})
    check(status == 400 and error_shape(body, "invalid_content_type"), f"JSON body: {status} {body}")
    status, body = daemon.json("POST", "/v1/files", b"x", headers={"Content-Type": "multipart/form-data"})
    check(status == 400 and error_shape(body, "invalid_form"), f"no boundary: {status} {body}")
    form, content_type = multipart([("purpose", "fine-tune", None), ("file", good, "a.jsonl")])
    for cut in (form[:form.index(b"Lily")], form[:-4]):  # in the file; before the closing "--"
        status, body = daemon.json("POST", "/v1/files", cut, headers={"Content-Type": content_type})
        check(status == 400 and error_shape(body, "invalid_form"), f"form cut short: {status} {body}")
    # Unknown ids and bad list parameters.
    for method, path in (("GET", "/v1/files/file-000000000000000000000000"),
                         ("GET", "/v1/files/file-000000000000000000000000/content"),
                         ("DELETE", "/v1/files/file-000000000000000000000000"),
                         ("GET", "/v1/files/..%2f..%2fserve.json"), ("DELETE", "/v1/files/x")):
        status, body = daemon.json(method, path)
        check(status == 404 and error_shape(body), f"{method} {path}: {status} {body}")
    for query in ("limit=0", "limit=10001", "limit=x", "order=up", "after=file-nope"):
        status, body = daemon.json("GET", "/v1/files?" + query)
        check(status == 400 and error_shape(body), f"?{query}: {status} {body}")
    status, body = daemon.json("PUT", "/v1/files")
    check(status == 405 and error_shape(body), f"PUT /v1/files: {status}")
    check(leftovers(state_dir) == [], f"temporary files left: {leftovers(state_dir)}")
    check(daemon.request("GET", "/ready")[0] == 200, "the daemon stopped serving")


def test_auth(daemon, file_id):
    form, content_type = multipart([("purpose", "fine-tune", None), ("file", CHAT, "train.jsonl")])
    routes = [("POST", "/v1/files", form, {"Content-Type": content_type}), ("GET", "/v1/files", None, None),
              ("GET", f"/v1/files/{file_id}", None, None), ("GET", f"/v1/files/{file_id}/content", None, None),
              ("DELETE", f"/v1/files/{file_id}", None, None)]
    for key in (None, "wrong-key"):
        for method, path, body, headers in routes:
            status, data, response_headers = daemon.request(method, path, body, key=key, headers=headers)
            check(status == 401 and error_shape(json.loads(data), "invalid_api_key")
                  and response_headers.get("www-authenticate") == "Bearer", f"{method} {path} key {key}: {status}")
    status, _ = daemon.json("GET", f"/v1/files/{file_id}")
    check(status == 200, "the file is still there after refused deletes")


def test_concurrent(daemon):
    datasets = [b"".join(json.dumps({"text": f"upload {k} line {i}"}).encode() + b"\n" for i in range(50 + k))
                for k in range(8)]

    def one(k):
        return daemon.upload([("purpose", "fine-tune", None), ("file", datasets[k], f"u{k}.jsonl")])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    ids = [body["id"] for status, body in results if status == 200]
    check(len(ids) == 8 and len(set(ids)) == 8, f"concurrent uploads: {[r[0] for r in results]}")
    for k, file_id in enumerate(ids):
        status, content, _ = daemon.request("GET", f"/v1/files/{file_id}/content")
        check(status == 200 and content == datasets[k], f"concurrent upload {k} content")
        status, body = daemon.json("DELETE", f"/v1/files/{file_id}")
        check(status == 200 and body == {"id": file_id, "object": "file", "deleted": True}, f"delete: {body}")
        status, _ = daemon.json("GET", f"/v1/files/{file_id}")
        check(status == 404, "deleted file still found")
        status, _, _ = daemon.request("GET", f"/v1/files/{file_id}/content")
        check(status == 404, "deleted file's content still served")


def test_restart(state_dir, kept):
    """kept: {id: bytes}. A second daemon on the same state directory serves the same files; what
    a crash can leave is removed at start."""
    files_dir = os.path.join(state_dir, "files")
    open(os.path.join(files_dir, ".upload-AbC123"), "wb").write(b"half an upload")
    open(os.path.join(files_dir, "file-0123456789abcdef01234567"), "wb").write(b"bytes, no record")
    # A record whose bytes are gone (deleted by hand): dropped.
    lost = "file-fedcba9876543210fedcba98"
    open(os.path.join(files_dir, lost + ".json"), "w").write(json.dumps(
        {"id": lost, "object": "file", "bytes": 3, "created_at": 1, "filename": "x.txt", "purpose": "fine-tune",
         "status": "processed", "format": "plain", "documents": 1}))
    daemon = Daemon(state_dir)
    try:
        status, listed = daemon.json("GET", "/v1/files")
        check(status == 200 and sorted(f["id"] for f in listed["data"]) == sorted(kept),
              f"after restart: {listed}")
        for file_id, data in kept.items():
            status, content, _ = daemon.request("GET", f"/v1/files/{file_id}/content")
            check(status == 200 and content == data, f"{file_id} after restart")
        check(sorted(os.listdir(files_dir)) == sorted([i for i in kept] + [i + ".json" for i in kept]),
              f"leftovers after restart: {sorted(os.listdir(files_dir))}")
    finally:
        check(daemon.stop() == 0, "second daemon exit status")


def main():
    work = tempfile.mkdtemp(prefix="lqd-files-test-")
    state_dir = os.path.join(work, "state")
    try:
        daemon = Daemon(state_dir)
        try:
            status, body = daemon.json("GET", "/v1/files")
            check(status == 200, f"GET /v1/files on a fresh daemon: {status} {body}")
            chat, tricky = test_round_trip(daemon)
            test_openai_client(daemon)
            test_refusals(daemon, state_dir)
            test_concurrent(daemon)
            kept = {}
            if chat:
                test_auth(daemon, chat["id"])
                status, body = daemon.json("DELETE", f"/v1/files/{tricky['id']}")
                check(status == 200 and body["deleted"] is True, f"delete tricky: {body}")
                check(not os.path.exists(os.path.join(state_dir, "files", tricky["id"])), "bytes left after delete")
                kept = {chat["id"]: CHAT}
        finally:
            check(daemon.stop() == 0, f"daemon exit status:\n{daemon.tail()}")
        test_restart(state_dir, kept)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finish("test_files")


if __name__ == "__main__":
    main()
