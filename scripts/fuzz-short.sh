#!/usr/bin/env bash
# Runs each fuzz target for FUZZTIME: fuzz-short.sh GO FUZZTIME pkg:Target...
#
# Go 1.26's fuzzing coordinator can fail a run whose -fuzztime ends while a
# worker is still executing an input (golang/go#75804, fixed in Go 1.27):
# the run ends with a bare "context deadline exceeded" and no failing input
# written. Such a run, and only such a run, is tried once more; any other
# failure (a failing input written, a panic, a test error) fails at once.
set -uo pipefail
go=$1 fuzztime=$2
shift 2
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# deadline_only reports whether the run in $out failed on the
# coordinator's deadline alone.
deadline_only() {
	grep -q '^    context deadline exceeded$' "$out" &&
		! grep -q 'Failing input written to' "$out" &&
		! grep -q '^panic:' "$out" &&
		[ "$(grep -c '^    ' "$out")" -eq 1 ]
}

for t in "$@"; do
	pkg=${t%%:*} name=${t#*:}
	for try in 1 2; do
		echo "fuzz $name for $fuzztime"
		if "$go" test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" "$pkg" 2>&1 | tee "$out"; then
			break
		fi
		if [ "$try" = 1 ] && deadline_only; then
			echo "fuzz $name: the fuzzing engine's deadline race (golang/go#75804), no failing input: trying once more"
			continue
		fi
		exit 1
	done
done
