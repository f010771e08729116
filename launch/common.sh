# Helpers sourced by the launchers: shell quoting and a runner with a dry-run mode.

# Print one argument quoted for a POSIX shell: unchanged when it is plain, else in single quotes.
quote_arg() {
  local arg="$1"
  if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$arg"
  else
    printf "'%s'" "${arg//\'/\'\\\'\'}"
  fi
}

# Print a command line that a shell reads back as the same arguments.
quote_command() {
  local out="" arg
  for arg in "$@"; do
    out+="$(quote_arg "$arg") "
  done
  printf '%s\n' "${out% }"
}

# Run a command, or only print it when DRY_RUN is set. Real runs echo it to stderr first.
run_command() {
  if [ -n "${DRY_RUN:-}" ]; then
    quote_command "$@"
  else
    echo "+ $(quote_command "$@")" >&2
    "$@"
  fi
}

# Like run_command, but replace the shell with the command, so signals such as SIGTERM reach it.
exec_command() {
  if [ -n "${DRY_RUN:-}" ]; then
    quote_command "$@"
    exit 0
  fi
  echo "+ $(quote_command "$@")" >&2
  exec "$@"
}
