"""Prints 'N passed, N failed, N skipped' for one or more meson testlog.json files."""
import json
import sys

counts = {"OK": 0, "FAIL": 0, "SKIP": 0}
for path in sys.argv[1:]:
    for line in open(path):
        result = json.loads(line).get("result", "FAIL")
        key = result if result in counts else ("OK" if result == "EXPECTEDFAIL" else "FAIL")
        counts[key] += 1
print(f"{counts['OK']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
