#!/bin/sh
# Runs greeter's tests with the `tiny` on PATH.
#
# Each tests/test_*.tiny runs after greeter.tiny. A test passes when it exits 0
# and its output equals its "# expect: " lines (with that prefix removed).
# Exits 1 if any test failed.

cd "$(dirname "$0")" || exit 2
if ! command -v tiny >/dev/null 2>&1; then
    echo "run-tests.sh: no 'tiny' on PATH" >&2
    exit 2
fi
echo "greeter tests, runtime: $(tiny --version)"

tmp=$(mktemp -d) || exit 2
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

for t in tests/test_*.tiny; do
    name=$(basename "$t" .tiny)
    sed -n 's/^# expect: \{0,1\}//p' "$t" >"$tmp/expected"
    if tiny greeter.tiny "$t" >"$tmp/actual" 2>&1 &&
        (cd "$tmp" && diff expected actual >diff); then
        echo "ok    $name"
        passed=$((passed + 1))
    else
        echo "FAIL  $name"
        if [ -s "$tmp/diff" ]; then
            sed 's/^/      /' "$tmp/diff"
        else
            sed 's/^/      /' "$tmp/actual"
        fi
        failed=$((failed + 1))
    fi
    rm -f "$tmp/diff"
done

echo "greeter: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
