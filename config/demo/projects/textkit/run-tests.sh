#!/bin/sh
# Runs textkit's tests with the `tiny` on PATH and writes junit.xml.
#
# Each tests/test_*.tiny runs after textkit.tiny. A test passes when it exits 0
# and its output equals its "# expect: " lines (with that prefix removed).
# junit.xml gets one testcase per test file: classname "textkit", name the
# file name without ".tiny". Exits 1 if any test failed.

cd "$(dirname "$0")" || exit 2
if ! command -v tiny >/dev/null 2>&1; then
    echo "run-tests.sh: no 'tiny' on PATH" >&2
    exit 2
fi
echo "textkit tests, runtime: $(tiny --version)"

tmp=$(mktemp -d) || exit 2
trap 'rm -rf "$tmp"' EXIT

# Milliseconds since the epoch (whole seconds where date has no %N).
now_ms() {
    ns=$(date +%s%N 2>/dev/null)
    case $ns in
        '' | *[!0-9]*) echo $(($(date +%s) * 1000)) ;;
        *) echo $((ns / 1000000)) ;;
    esac
}

seconds() { awk -v ms="$1" 'BEGIN { printf "%.3f", ms / 1000 }'; }

# Escapes stdin for XML, dropping the control characters XML cannot hold.
xml_escape() {
    tr -d '\000-\010\013\014\016-\037' |
        sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g'
}

passed=0
failed=0
: >"$tmp/cases"
suite_start=$(now_ms)

for t in tests/test_*.tiny; do
    name=$(basename "$t" .tiny)
    sed -n 's/^# expect: \{0,1\}//p' "$t" >"$tmp/expected"
    start=$(now_ms)
    tiny textkit.tiny "$t" >"$tmp/actual" 2>"$tmp/stderr"
    status=$?
    time=$(seconds $(($(now_ms) - start)))

    if [ "$status" -ne 0 ]; then
        message="tiny exited with status $status: $(tail -n 1 "$tmp/stderr")"
        cat "$tmp/stderr" >"$tmp/details"
    elif ! (cd "$tmp" && diff -u expected actual >diff); then
        # Drop the timestamps from the "--- expected" and "+++ actual" lines.
        sed '1,2s/[[:space:]]*[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] .*$//' "$tmp/diff" >"$tmp/details"
        message="output differs from the expected output"
    else
        echo "PASS  $name"
        passed=$((passed + 1))
        printf '    <testcase classname="textkit" name="%s" time="%s"/>\n' "$name" "$time" >>"$tmp/cases"
        continue
    fi

    echo "FAIL  $name: $message"
    sed 's/^/      /' "$tmp/details"
    failed=$((failed + 1))
    {
        printf '    <testcase classname="textkit" name="%s" time="%s">\n' "$name" "$time"
        printf '      <failure message="%s">' "$(printf '%s' "$message" | xml_escape)"
        xml_escape <"$tmp/details"
        printf '</failure>\n    </testcase>\n'
    } >>"$tmp/cases"
done

total=$((passed + failed))
time=$(seconds $(($(now_ms) - suite_start)))
{
    echo '<?xml version="1.0" encoding="UTF-8"?>'
    printf '<testsuites name="textkit" tests="%d" failures="%d" errors="0" time="%s">\n' "$total" "$failed" "$time"
    printf '  <testsuite name="textkit" tests="%d" failures="%d" errors="0" skipped="0" time="%s">\n' "$total" "$failed" "$time"
    cat "$tmp/cases"
    echo '  </testsuite>'
    echo '</testsuites>'
} >junit.xml

echo "textkit: $passed passed, $failed failed (junit.xml)"
[ "$failed" -eq 0 ]
