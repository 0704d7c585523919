#!/bin/sh
# Runs mathkit's tests with the `tiny` on PATH. Each tests/test_*.tiny is run
# after mathkit.tiny and passes when it exits 0 (every assert() held).
# Prints one line per test and a summary; exits 1 if any test failed.

cd "$(dirname "$0")" || exit 2
if ! command -v tiny >/dev/null 2>&1; then
    echo "run-tests.sh: no 'tiny' on PATH" >&2
    exit 2
fi
echo "mathkit tests, runtime: $(tiny --version)"

passed=0
failed=0
out=$(mktemp) || exit 2
trap 'rm -f "$out"' EXIT

for t in tests/test_*.tiny; do
    name=$(basename "$t" .tiny)
    if tiny mathkit.tiny "$t" >"$out" 2>&1; then
        echo "PASS  $name"
        passed=$((passed + 1))
    else
        echo "FAIL  $name"
        sed 's/^/      /' "$out"
        failed=$((failed + 1))
    fi
done

echo "mathkit: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
