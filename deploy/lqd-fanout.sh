#!/usr/bin/env bash
# Sends one API call to every lqd replica: each `lqd serve` holds its own models and adapters in
# memory, so a swap (POST /v1/adapters/load, /v1/models/load, /v1/models/unload, ...) made
# through a load-balanced Service reaches one replica only. This script makes it reach all.
#
# usage: deploy/lqd-fanout.sh [--kubernetes [-n NAMESPACE] [-l SELECTOR]] | [--hosts URL...]
#                             [--key-file FILE] PATH JSON
#
#   --kubernetes     every Running pod matching SELECTOR (default app=lqd): the call runs inside
#                    each pod with `kubectl exec ... curl http://127.0.0.1:8080PATH`, with the
#                    pod's own key (the first line of /etc/lqd/api-key, as lqd.yaml mounts it);
#                    no pod IP needs to be reachable from here
#   --hosts URL...   base URLs (http://10.0.0.5:8080 ...), e.g. machines running lqd.service;
#                    the key from --key-file FILE or $LQD_API_KEY
#
# example (an adapter written to the shared models volume, then served by every replica):
#   deploy/lqd-fanout.sh --kubernetes /v1/adapters/load \
#       '{"model": "stories260K", "name": "tiny", "path": "adapters/stories260K/tiny"}'
#
# Prints one line per replica (its name, the HTTP status, the answer) and exits 1 when any
# replica did not answer 2xx: the caller sees a partial swap and can retry (loading under the
# same name again is idempotent: it replaces the adapter with the same files).
set -uo pipefail

mode="" namespace="" selector="app=lqd" key_file="" hosts=()
usage() { sed -n '5,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --kubernetes) mode=kubernetes; shift ;;
    -n|--namespace) namespace="$2"; shift 2 ;;
    -l|--selector) selector="$2"; shift 2 ;;
    --key-file) key_file="$2"; shift 2 ;;
    --hosts) mode=hosts; shift
      while [ $# -gt 0 ] && [[ "$1" == http://* || "$1" == https://* ]]; do hosts+=("$1"); shift; done ;;
    -h|--help) usage ;;
    --*) echo "lqd-fanout: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
if [ $# -ne 2 ] || [ -z "$mode" ]; then usage; fi
path="$1" body="$2"
[[ "$path" == /* ]] || { echo "lqd-fanout: PATH must start with / (e.g. /v1/adapters/load)" >&2; exit 2; }

failed=0
report() { # name, status, answer
  echo "$1 $2 $3"
  [[ "$2" == 2?? ]] || failed=1
}

if [ "$mode" = kubernetes ]; then
  kubectl_args=()
  [ -n "$namespace" ] && kubectl_args+=(-n "$namespace")
  pods=$(kubectl "${kubectl_args[@]}" get pods -l "$selector" --field-selector=status.phase=Running \
         -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}') || exit 1
  [ -n "$pods" ] || { echo "lqd-fanout: no Running pod matches $selector" >&2; exit 1; }
  for pod in $pods; do
    # The body and path travel as sh's positional parameters: no quoting of JSON needed.
    # shellcheck disable=SC2016 # expanded by the pod's sh, not here
    answer=$(kubectl "${kubectl_args[@]}" exec "$pod" -- sh -c '
        key=$(grep -v "^#" /etc/lqd/api-key 2>/dev/null | head -n 1)
        curl -sS -o /tmp/lqd-fanout.out -w "%{http_code}" -X POST \
             -H "Content-Type: application/json" ${key:+-H "Authorization: Bearer $key"} \
             --data-binary "$1" "http://127.0.0.1:8080$2"
        echo " $(cat /tmp/lqd-fanout.out 2>/dev/null)"; rm -f /tmp/lqd-fanout.out' sh "$body" "$path" 2>&1)
    report "$pod" "${answer%% *}" "${answer#* }"
  done
else
  [ ${#hosts[@]} -gt 0 ] || { echo "lqd-fanout: --hosts needs at least one http(s):// URL" >&2; exit 2; }
  key="${LQD_API_KEY:-}"
  [ -n "$key_file" ] && key=$(grep -v '^#' "$key_file" | head -n 1)
  out=$(mktemp)
  trap 'rm -f "$out"' EXIT
  for host in "${hosts[@]}"; do
    : > "$out"
    status=$(curl -sS -o "$out" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
             ${key:+-H "Authorization: Bearer $key"} --data-binary "$body" "${host%/}$path" 2>"$out.err")
    report "$host" "${status:-000}" "$(cat "$out" "$out.err" 2>/dev/null)"
    rm -f "$out.err"
  done
fi
exit "$failed"
