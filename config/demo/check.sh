#!/bin/sh
# check.sh: plays config/demo/story.toml without the hub, the way the hub does.
#
#   1. Builds the runtime (config/demo/runtime/) with [upstream].build, run by
#      `sh -c` in a fresh copy of the source with $PREFIX an empty absolute
#      directory, then moves the install somewhere else (the hub packs $PREFIX
#      and test jobs unpack it elsewhere, so the runtime must be relocatable).
#   2. Runs every [[project]]'s test commands by `sh -c` in a fresh copy of the
#      project, with the runtime's bin/ first on PATH and TRUNKFARM_RUNTIME_PREFIX
#      set. Exit status 0 is green. All projects must be green.
#   3. Applies [break] to the runtime (replacing its `find`, which must occur
#      exactly once, by its `replace`), rebuilds and reruns: exactly the
#      projects in expect_red must be red, and the JUnit files must name
#      exactly expect_newly_failing as failing tests that passed in step 2.
#   4. Applies [fix] on top, rebuilds and reruns: all green again.
#
# Exits 0 if the story holds, 1 if it does not, 2 if the check itself cannot
# run. Needs sh, awk, sed, sort, comm, cc and coreutils; no python, no git, no
# network. CHECK_KEEP=1 keeps (and prints) the work directory.

set -u

demo=$(cd "$(dirname "$0")" && pwd) || exit 2
story=$demo/story.toml
work=$(mktemp -d "${TMPDIR:-/tmp}/trunkfarm-demo-check.XXXXXX") || exit 2
if [ "${CHECK_KEEP:-}" = 1 ]; then
    echo "work directory: $work"
else
    trap 'rm -rf "$work"' EXIT
fi
trap 'exit 130' INT TERM

problems=0
problem() {
    echo "   PROBLEM: $*"
    problems=$((problems + 1))
}
die() {
    echo "check.sh: $*" >&2
    exit 2
}

# ---------------------------------------------------------------- story.toml

# Prints "<table><TAB><key><TAB><value>" for every string in story.toml; an
# array gives one line per element, an empty array none. Tables are
# "upstream", "break", "fix" and "project.1", "project.2", ... Understands the
# subset story.toml uses: single-line basic and literal strings, arrays of them
# on one line, [table], [[project]] and comments.
awk '
function fail(msg) { printf "story.toml:%d: %s\n", NR, msg > "/dev/stderr"; bad = 1; exit 1 }
{
    line = $0
    sub(/^[ \t]+/, "", line)
    if (line == "" || substr(line, 1, 1) == "#") next
    if (line ~ /^\[\[[ \t]*project[ \t]*\]\]/) { table = "project." ++projects; next }
    if (line ~ /^\[[A-Za-z_]+\]/) { table = substr(line, 2, index(line, "]") - 2); next }
    eq = index(line, "=")
    if (!eq) fail("expected `key = value`")
    key = substr(line, 1, eq - 1)
    sub(/[ \t]+$/, "", key)
    rest = substr(line, eq + 1)
    n = length(rest)
    for (i = 1; i <= n; i++) {
        c = substr(rest, i, 1)
        if (c == "#") break
        if (c != "\"" && c != "\047") continue
        quote = c; value = ""; closed = 0
        for (i++; i <= n; i++) {
            c = substr(rest, i, 1)
            if (c == quote) { closed = 1; break }
            if (c == "\\" && quote == "\"") {
                c = substr(rest, ++i, 1)
                if (c != "\"" && c != "\\") fail("unsupported escape \\" c)
            }
            if (c == "\t") fail("tab in a string")
            value = value c
        }
        if (!closed) fail("unterminated string (strings must be on one line)")
        print table "\t" key "\t" value
    }
}
END { if (!bad && !projects) { print "story.toml: no [[project]]" > "/dev/stderr"; exit 1 } }
' "$story" >"$work/story.tsv" || die "cannot read $story"

# get TABLE KEY: the key's strings, one a line.
get() {
    awk -F '\t' -v t="$1" -v k="$2" '$1 == t && $2 == k { print $3 }' "$work/story.tsv"
}
# need TABLE KEY...: fails unless each key has a string.
need() {
    t=$1
    shift
    for k in "$@"; do
        [ -n "$(get "$t" "$k")" ] || die "story.toml: [$t] needs $k"
    done
}

need upstream build first_message first_author
need break file find message author
need fix file find message author
get upstream build >"$work/build.cmds"
tables=$(cut -f 1 "$work/story.tsv" | grep '^project\.' | sort -u -t . -k 2n)
projects=
for t in $tables; do
    need "$t" name test
    projects="$projects $(get "$t" name)"
done
get break expect_red | sort >"$work/expect_red"
get break expect_newly_failing | sort >"$work/expect_newly_failing"
for name in $(cat "$work/expect_red"); do
    case " $projects " in *" $name "*) ;; *) die "story.toml: expect_red names $name, which is not a [[project]]" ;; esac
done
[ "$(get fix find)" = "$(get break replace)" ] || die "story.toml: fix.find must be exactly break.replace"

table_of() {
    for t in $tables; do
        [ "$(get "$t" name)" = "$1" ] && echo "$t" && return
    done
}

# ------------------------------------------------------------ steps of a run

# substitute FILE FIND REPLACE: replaces the one occurrence of FIND in FILE.
substitute() {
    FIND=$2 REPLACE=$3 awk '
        BEGIN { find = ENVIRON["FIND"]; repl = ENVIRON["REPLACE"]; if (find == "") exit 3 }
        {
            out = ""; line = $0
            while ((k = index(line, find)) > 0) {
                out = out substr(line, 1, k - 1) repl
                line = substr(line, k + length(find))
                n++
            }
            print out line
        }
        END { if (n != 1) { print n + 0 > "/dev/stderr"; exit 3 } }
    ' "$1" >"$1.new" 2>"$work/count" || {
        rm -f "$1.new"
        return 1
    }
    mv "$1.new" "$1"
}

# apply SECTION: applies [break] or [fix] to the upstream source.
apply() {
    file=$(get "$1" file)
    [ -f "$work/upstream/$file" ] || die "story.toml: [$1] file $file is not in the runtime"
    substitute "$work/upstream/$file" "$(get "$1" find)" "$(get "$1" replace)" ||
        die "story.toml: [$1] find must occur exactly once in $file, found $(cat "$work/count" 2>/dev/null || echo 0) times"
}

# build PHASE: builds the current upstream source; sets $runtime.
build() {
    dir=$work/$1
    mkdir -p "$dir/prefix"
    cp -R "$work/upstream" "$dir/src"
    while IFS= read -r cmd; do
        if ! (cd "$dir/src" && PREFIX="$dir/prefix" sh -c "$cmd") >>"$dir/build.log" 2>&1 </dev/null; then
            echo "   build: FAILED at: $cmd"
            sed 's/^/   | /' "$dir/build.log"
            exit 1
        fi
    done <"$work/build.cmds"
    runtime=$dir/runtime
    mv "$dir/prefix" "$runtime"
    if [ ! -x "$runtime/bin/tiny" ]; then
        echo "   build: FAILED: nothing installed at \$PREFIX/bin/tiny"
        exit 1
    fi
    echo "   build: ok ($("$runtime/bin/tiny" --version), installed, then moved)"
}

# Failing "<classname>.<name>"s of a JUnit file as the demo's runner writes it
# (one element a line); the number of test cases goes to $work/cases.
junit_failing() {
    awk -v cases="$work/cases" '
        function attr(key,   s) {
            if (!match($0, "[ \t]" key "=\"[^\"]*\"")) return ""
            s = substr($0, RSTART, RLENGTH)
            sub(/^[ \t][^=]*="/, "", s)
            sub(/"$/, "", s)
            return s
        }
        /<testcase[ \t>\/]/ { n++; name = attr("name"); cls = attr("classname"); if (cls != "") name = cls "." name }
        /<(failure|error)[ \t>\/]/ { print name }
        END { print n + 0 > cases }
    ' "$1"
}

# run_project PHASE NAME: runs one project's tests; prints its line and
# appends to PHASE/red and PHASE/failing.
run_project() {
    dir=$work/$1
    src=$dir/$2
    t=$(table_of "$2")
    cp -R "$demo/projects/$2" "$src"
    result=green
    get "$t" test >"$dir/$2.cmds"
    while IFS= read -r cmd; do
        if ! (cd "$src" && PATH="$runtime/bin:$PATH" TRUNKFARM_RUNTIME_PREFIX="$runtime" sh -c "$cmd") \
            >>"$dir/$2.log" 2>&1 </dev/null; then
            result=red
            break
        fi
    done <"$dir/$2.cmds"
    [ "$result" = red ] && echo "$2" >>"$dir/red"
    note=
    for report in $(get "$t" junit); do
        if [ ! -f "$src/$report" ]; then
            note="$note  $report: MISSING"
            problem "$2 did not write $report"
            continue
        fi
        junit_failing "$src/$report" | sort >"$dir/$2.failing"
        cat "$dir/$2.failing" >>"$dir/failing"
        nfail=$(wc -l <"$dir/$2.failing" | tr -d ' ')
        note="$note  $report: $(cat "$work/cases") tests, $nfail failing"
        [ "$nfail" -eq 0 ] || note="$note: $(words "$dir/$2.failing")"
        [ "$(cat "$work/cases")" -gt 0 ] || problem "$report of $2 holds no test case"
    done
    if [ -n "$note" ]; then
        printf '   %-8s %-5s%s\n' "$2" "$result" "$note"
    else
        printf '   %-8s %s\n' "$2" "$result"
    fi
}

# play PHASE: builds and runs every project; leaves PHASE/red and
# PHASE/failing sorted.
play() {
    mkdir -p "$work/$1"
    : >"$work/$1/red"
    : >"$work/$1/failing"
    build "$1"
    for name in $projects; do
        run_project "$1" "$name"
    done
    sort -o "$work/$1/red" "$work/$1/red"
    sort -u -o "$work/$1/failing" "$work/$1/failing"
}

words() {
    if [ -s "$1" ]; then tr '\n' ' ' <"$1" | sed 's/ $//'; else echo "(none)"; fi
}

# expect WHAT GOT-FILE WANT-FILE: compares two sorted lists.
expect() {
    if cmp -s "$2" "$3"; then
        echo "   ok: $1: $(words "$2")"
    else
        problem "$1: got [$(words "$2")], expected [$(words "$3")]"
        return 1
    fi
}

show_logs() {
    for name in $(cat "$work/$1/red"); do
        echo "   --- $name's test log:"
        sed 's/^/   | /' "$work/$1/$name.log"
    done
}

# --------------------------------------------------------------------- story

cp -R "$demo/runtime" "$work/upstream"
: >"$work/none"

echo "== 1/3 \"$(get upstream first_message)\" by $(get upstream first_author)"
play original
expect "red projects" "$work/original/red" "$work/none" || show_logs original
expect "failing tests" "$work/original/failing" "$work/none"

echo "== 2/3 \"$(get break message)\" by $(get break author)"
apply break
play broken
expect "red projects" "$work/broken/red" "$work/expect_red" || show_logs broken
comm -13 "$work/original/failing" "$work/broken/failing" >"$work/newly_failing"
expect "newly failing tests" "$work/newly_failing" "$work/expect_newly_failing"

echo "== 3/3 \"$(get fix message)\" by $(get fix author)"
apply fix
play fixed
expect "red projects" "$work/fixed/red" "$work/none" || show_logs fixed
comm -13 "$work/original/failing" "$work/fixed/failing" >"$work/newly_failing"
expect "newly failing tests" "$work/newly_failing" "$work/none"

if [ "$problems" -ne 0 ]; then
    echo "the story does NOT hold ($problems problem(s))"
    exit 1
fi
echo "the story holds"
