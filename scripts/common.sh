# Shell functions shared by the set-up scripts. Source it after setting `script_name`.

# Print "<script_name>: MESSAGE" to standard error and exit 1.
fail() {
    echo "$script_name: $*" >&2
    exit 1
}

# Run a command as root: directly when this is root, otherwise through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        fail "'$*' needs root, but this is not root and sudo is missing; rerun as root"
    fi
}

# wait_for SECONDS LOG DESCRIPTION COMMAND...: run COMMAND once a second until it succeeds.
# After SECONDS, print the last lines of LOG and fail. Sets `elapsed` to the seconds waited.
wait_for() {
    limit=$1
    log=$2
    description=$3
    shift 3
    elapsed=0
    until "$@" >/dev/null 2>&1; do
        if [ "$elapsed" -ge "$limit" ]; then
            echo "$script_name: last lines of $log:" >&2
            tail -n 20 "$log" >&2 2>/dev/null || true
            fail "$description did not respond to '$*' within $limit s; read $log"
        fi
        sleep 1
        elapsed=$((elapsed + 1))
    done
}
