"""api/openapi.yaml and the daemon's router (server/routes.def) describe the same API: every
route the router serves is documented with its method, and every documented operation is
routed; routes without auth are exactly the operations with `security: []`; every $ref
resolves; every operation documents a 2xx answer and, when it needs a key, its 401; every
handler a route names exists in server/."""
import glob
import os
import re
import sys

SKIP = 77
ROOT = os.environ.get("LQ_REPO_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
try:
    import yaml
except ImportError:
    print("PyYAML is not installed (tests/run.sh installs it in .venv): skipped")
    sys.exit(SKIP)

failed = 0


def check(condition, message):
    global failed
    if not condition:
        failed += 1
        print("FAIL:", message)


def strip_comments(text):
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


routes_text = strip_comments(open(os.path.join(ROOT, "server/routes.def")).read())
ROUTE = re.compile(r'LQ_ROUTE\(\s*"([A-Z]+)"\s*,\s*"([^"]+)"\s*,\s*(\w+)\s*,\s*([01])\s*\)')
routes = {(m.group(1).lower(), m.group(2)): (m.group(3), m.group(4) == "1")
          for m in ROUTE.finditer(routes_text)}
leftover = ROUTE.sub("", routes_text)
check("LQ_ROUTE" not in leftover, "routes.def has an LQ_ROUTE line this test cannot read")
check(len(routes) >= 10, f"only {len(routes)} routes read from routes.def")

spec = yaml.safe_load(open(os.path.join(ROOT, "api/openapi.yaml")))
check(str(spec.get("openapi", "")).startswith("3.0"), "openapi.yaml is not OpenAPI 3.0")
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}
documented = {}
for path, item in spec.get("paths", {}).items():
    for method, operation in item.items():
        if method in METHODS:
            documented[(method, path)] = operation

for key in sorted(routes):
    check(key in documented, f"route {key[0].upper()} {key[1]} is not in api/openapi.yaml")
for key in sorted(documented):
    check(key in routes, f"documented {key[0].upper()} {key[1]} is not routed in server/routes.def")

global_security = spec.get("security", [])
for key, (handler, auth) in routes.items():
    operation = documented.get(key)
    if operation is None:
        continue
    security = operation.get("security", global_security)
    check(auth == (security != []),
          f"{key[0].upper()} {key[1]}: auth {int(auth)} in routes.def but security {security!r}")
    responses = {str(code) for code in operation.get("responses", {})}
    check(any(code.startswith("2") for code in responses), f"{key[1]}: no 2xx response documented")
    if auth:
        check("401" in responses, f"{key[1]}: needs a key but documents no 401")
    for name in re.findall(r"{(\w+)}", key[1]):
        parameters = [p for p in operation.get("parameters", [])]
        resolved = []
        for p in parameters:
            if "$ref" in p:
                p = spec["components"]["parameters"][p["$ref"].split("/")[-1]]
            resolved.append(p.get("name"))
        check(name in resolved, f"{key[1]}: path parameter {name} is not documented")


def walk(node, where):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                parts = v.lstrip("#/").split("/")
                target = spec
                for part in parts:
                    target = target.get(part) if isinstance(target, dict) else None
                check(v.startswith("#/") and target is not None, f"{where}: $ref {v} does not resolve")
            else:
                walk(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            walk(v, f"{where}[{i}]")


walk(spec, "")

sources = "".join(open(f).read() for f in glob.glob(os.path.join(ROOT, "server/*.c")))
for key, (handler, _) in routes.items():
    check(re.search(r"\bvoid\s+" + handler + r"\s*\(", sources) is not None,
          f"handler {handler} of {key[1]} is not defined in server/")

print(f"{len(routes)} routes, {len(documented)} documented operations; {failed} failures")
sys.exit(1 if failed else 0)
