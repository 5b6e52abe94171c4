#!/usr/bin/env bash
# Copies the Docker build context into DEST as `docker build .` would send it: the
# repository's files (tracked and untracked, minus .gitignore'd build output; outside a
# git checkout, all files but target/) filtered by .dockerignore. Prints the copied paths.
#
#   bash tests/docker-context.sh DEST
#
# .dockerignore rules as Docker applies them: patterns are read in order, the last one
# that matches a path (or one of its parent directories) decides, and `!` re-includes.
# `*`, `?` and `[...]` never match `/`. `**` is not supported here and is refused.
set -euo pipefail

dest="${1:?usage: docker-context.sh DEST}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

patterns=()
if [ -f .dockerignore ]; then
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%%$'\r'}"
        line="$(echo "$line" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')"
        [[ -z "$line" || "$line" == \#* ]] && continue
        if [[ "$line" == *'**'* ]]; then
            echo "docker-context: '**' in .dockerignore is not supported by this script" >&2
            exit 1
        fi
        patterns+=("$line")
    done < .dockerignore
fi

components() { local slashes="${1//[^\/]/}"; echo $((${#slashes} + 1)); }

# Go's filepath.Match: same number of components, then a shell match (with equal
# component counts no wildcard can have swallowed a `/`).
matches() {
    local pattern="$1" name="$2"
    [ "$(components "$pattern")" -eq "$(components "$name")" ] || return 1
    # shellcheck disable=SC2053 # the pattern is meant to glob
    [[ "$name" == $pattern ]]
}

# Whether `pattern` matches `path` or one of its parent directories.
covers() {
    local pattern="$1" path="$2"
    while :; do
        matches "$pattern" "$path" && return 0
        [[ "$path" == */* ]] || return 1
        path="${path%/*}"
    done
}

excluded() {
    local path="$1" verdict=1 pattern negate
    for pattern in "${patterns[@]}"; do
        negate=0
        if [[ "$pattern" == '!'* ]]; then
            negate=1
            pattern="${pattern#!}"
        fi
        pattern="${pattern#/}"
        pattern="${pattern%/}"
        if covers "$pattern" "$path"; then
            verdict=$negate
        fi
    done
    return "$verdict"
}

# The candidate files: from git when this is a checkout, else everything but target/.
list_files() {
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files --cached --others --exclude-standard -z
    else
        find . \( -path ./target -o -path ./.git \) -prune -o -type f -printf '%P\0'
    fi
}

mkdir -p "$dest"
list_files | while IFS= read -r -d '' path; do
    [ -e "$path" ] || continue # deleted but still tracked
    if ! excluded "$path"; then
        mkdir -p "$dest/$(dirname "$path")"
        cp -p "$path" "$dest/$path"
        echo "$path"
    fi
done
