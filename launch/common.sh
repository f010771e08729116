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

# Set DRY_RUN when --dry-run appears anywhere in the arguments, and put the other arguments in
# ARGS. Accepting it in any position keeps "CONFIG WORKDIR --dry-run" from launching for real.
split_dry_run() {
  ARGS=()
  local arg
  for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then
      DRY_RUN=1
    else
      ARGS+=("$arg")
    fi
  done
}

# Exit with a one-line error unless an option got a value. Arguments: the launcher's name, an
# example value, then the option and what follows it ("$@" at the option).
require_value() {
  if [ $# -lt 4 ] || [ -z "$4" ] || [[ "$4" == --* ]]; then
    echo "$1: option $3 needs a value, for example $3 $2" >&2
    exit 2
  fi
}

# Exit with a one-line error unless $3 is a positive integer; $2 names the option.
require_positive_int() {
  if ! [[ "$3" =~ ^[1-9][0-9]*$ ]]; then
    echo "$1: $2 must be a positive integer, got '$3'" >&2
    exit 2
  fi
}

# Print the file of a --config value ($2) under the repository $1: FILE:ARGUMENT passes
# ARGUMENT to get_config, for example a study's size.
config_file_of() {
  if [ ! -f "$1/$2" ] && [[ "$2" == *:* ]]; then
    printf '%s\n' "${2%:*}"
  else
    printf '%s\n' "$2"
  fi
}

# Exit with a one-line error unless the cluster launcher $1 got a config file in the repository
# $2 ($3) and an absolute WORKDIR ($4), so that mistakes fail before the job is queued. With a
# local .venv, `ckt_jax.main --check_only` also checks the config and its overrides (the rest).
# It reads no model files, because those may exist only on the cluster.
check_cluster_args() {
  local name="$1" root="$2" config="$3" workdir="$4" file
  shift 4
  file="$(config_file_of "$root" "$config")"
  if [[ "$file" == /* ]] || [ ! -f "$root/$file" ]; then
    echo "$name: config file $config not found in the repository; pass a path relative to" \
      "its root, for example configs/smollm2_cpu.py" >&2
    exit 2
  fi
  if [[ "$workdir" != /* ]]; then
    echo "$name: WORKDIR $workdir is a relative path; pass an absolute path on a mount that" \
      "every host shares, for example /mnt/shared/runs/a" >&2
    exit 2
  fi
  if [ -x "$root/.venv/bin/python" ]; then
    local output status=0
    output="$(cd "$root" && JAX_PLATFORMS=cpu .venv/bin/python -m ckt_jax.main \
      --config "$config" --workdir "$workdir" --check_only "$@" 2>&1)" || status=$?
    if [ "$status" -eq 2 ]; then
      echo "$name: $(printf '%s\n' "$output" | sed -n 's/^ckt_jax: error: //p' | tail -n 1)" >&2
      exit 2
    fi
  fi
}

# Print a SLURM time limit ($1: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS) in seconds.
slurm_seconds() {
  local value="$1" days=0 fields
  if [[ "$value" == *-* ]]; then
    days="${value%%-*}"
    IFS=: read -ra fields <<< "${value#*-}"
    echo $(( 10#$days * 86400 + 10#${fields[0]:-0} * 3600 + 10#${fields[1]:-0} * 60
             + 10#${fields[2]:-0} ))
    return
  fi
  IFS=: read -ra fields <<< "$value"
  case ${#fields[@]} in
    1) echo $(( 10#${fields[0]} * 60 )) ;;
    2) echo $(( 10#${fields[0]} * 60 + 10#${fields[1]} )) ;;
    *) echo $(( 10#${fields[0]} * 3600 + 10#${fields[1]} * 60 + 10#${fields[2]} )) ;;
  esac
}
