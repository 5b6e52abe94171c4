#!/usr/bin/env bash
# Every deploy check that runs the real thing, as .ci/run calls them after the test
# suite. Each step writes its own log, printed when it ends; a failing step does not
# stop the others, and the summary lists each with its time. Exits 1 if any failed.
#
#   1. podman-setup.sh       Podman, runc, mmdebstrap and the local base images
#   2. prometheus.sh         (in the background from the start: needs no Podman)
#   3. container-image.sh    the Dockerfile built and run as documented
#   4. build-deb.sh          the package, around the binary the Dockerfile built
#   5. systemd-package.sh    the package under systemd
# Needs BITCOIN_NODE, and the debug binary (for `sv2-tpd watch` and prometheus.sh).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

logs=$(mktemp -d)
summary=()
failed=0

# record NAME STATUS SECONDS: prints the step's log and adds it to the summary.
record() {
    local name="$1" status="$2" secs="$3" verdict=passed
    ((status == 0)) || { verdict="FAILED ($status)"; failed=1; }
    echo "==> $name: $verdict in ${secs}s; its log:" >&2
    cat "$logs/$name.log" >&2
    summary+=("$(printf '%-20s %-12s %4ss' "$name" "$verdict" "$secs")")
}

# step NAME COMMAND...: runs COMMAND with its output in NAME's log.
step() {
    local name="$1" started=$SECONDS status=0
    shift
    "$@" >"$logs/$name.log" 2>&1 || status=$?
    record "$name" "$status" $((SECONDS - started))
    return "$status"
}

prometheus_started=$SECONDS
bash "$REPO/tests/deploy/prometheus.sh" >"$logs/prometheus.log" 2>&1 &
prometheus_pid=$!

if step podman-setup bash "$REPO/tests/deploy/podman-setup.sh"; then
    # The package carries the binary the Dockerfile built (one release build, not two);
    # when that failed, build-deb.sh builds its own.
    binary=
    if step container-image bash "$REPO/tests/deploy/container-image.sh"; then
        binary="$logs/sv2-tpd"
        extract() {
            local id
            id=$(pm create localhost/sv2-tpd:ci) &&
                pm cp "$id:/usr/local/bin/sv2-tpd" "$binary" && pm rm -v "$id" >/dev/null
        }
        extract >"$logs/extract.log" 2>&1 || binary=
    fi
    deb_built() { bash "$REPO/tests/build-deb.sh" ${binary:+"$binary"} >"$logs/deb-path"; }
    if step build-deb deb_built; then
        step systemd-package bash "$REPO/tests/deploy/systemd-package.sh" "$(tail -n 1 "$logs/deb-path")"
    fi
else
    echo "skipping the Podman steps: the set-up failed" >&2
    failed=1
fi

prometheus_status=0
wait "$prometheus_pid" || prometheus_status=$?
record prometheus "$prometheus_status" $((SECONDS - prometheus_started))

echo "Deploy checks:" >&2
printf '  %s\n' "${summary[@]}" >&2
rm -rf "$logs"
exit "$failed"
