#!/usr/bin/env bash
# Shared helpers for the launch scripts (sourced, not run).
#
# DRY_RUN=1 (or --dry-run as the first argument of a script) prints every command that
# would run, one per line prefixed with "+ ", and runs none of them.

DRY_RUN="${DRY_RUN:-0}"

# One word for a shell command line: as is when it is plain, else single-quoted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf '%s' "${1@Q}"
  fi
}

# All arguments quoted and joined by spaces: a command line another shell (ssh) can run.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="$(quote "${word}") "
  done
  printf '%s' "${out% }"
}

# Prints the command (quoted, prefixed with "+ "), then runs it unless DRY_RUN=1.
run() {
  echo "+ $(quote_all "$@")"
  if [[ "${DRY_RUN}" != "1" ]]; then
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 1
}

# Fails with a message naming the variable when it is empty.
require() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "set ${name} (see the header of this script)"
  done
}
