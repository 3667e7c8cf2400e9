# shellcheck shell=bash
# Site adapter of the local lab (ops/lab/runbook_lab.py): how the runbooks start and stop
# processes here. Every process runs from the lab directory $LAB_DIR with a pidfile in
# $LAB_DIR/run and a log in $LAB_DIR/logs, and is stopped by its PID, never by name.
#
# A site adapter defines these functions (ops/runbooks/site-systemd.sh is the systemd
# version of the same contract):
#   instance_start ID    start ctrl-exec-api with the config of instance ID
#   instance_stop ID     SIGTERM (it resigns, drains, deregisters), wait until it exited;
#                        succeeds if it was not running
#   instance_logs ID     the last lines of its log
#   etcd_start NAME      start etcd member NAME on its data dir
#   etcd_stop NAME       stop it (succeeds if it was not running)
#   etcd_wipe NAME [TOKEN] set a stopped member's data dir aside (a new, empty member),
#                        with TOKEN as its new initial-cluster-token
#   haproxy_install FILE check FILE with `haproxy -c`, make it HAProxy's config, reload
#
# Below them are lab_* functions that only the runbook test uses: they make the failures
# the runbooks respond to (```sh runbook-simulate blocks).

: "${LAB_DIR:?LAB_DIR is the lab directory (printed by python -m ops.lab.runbook_lab)}"

_lab_pid() { cat "$LAB_DIR/run/$1.pid" 2>/dev/null || true; }

# _lab_alive NAME: the process of pidfile NAME runs and is the one we started (its command
# line names the lab directory: a reused PID is never signalled).
_lab_alive() {
    local pid
    pid=$(_lab_pid "$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
        tr "\\0" " " <"/proc/$pid/cmdline" 2>/dev/null | grep -F "$LAB_DIR" >/dev/null
}

# _lab_spawn NAME CMD...: start CMD in its own session, log and pidfile named NAME.
_lab_spawn() {
    local name=$1
    shift
    if _lab_alive "$name"; then
        echo "$name is already running (pid $(_lab_pid "$name"))" >&2
        return 1
    fi
    mkdir -p "$LAB_DIR/run" "$LAB_DIR/logs"
    rm -f "$LAB_DIR/run/$name.pid"
    # the process writes its own PID (exec keeps it), whether or not setsid forked
    setsid sh -c 'echo $$ >"$0"; exec "$@"' "$LAB_DIR/run/$name.pid" "$@" \
        >>"$LAB_DIR/logs/$name.log" 2>&1 </dev/null &
    local i
    for ((i = 0; i < 50; i++)); do
        [ -s "$LAB_DIR/run/$name.pid" ] && return 0
        sleep 0.02
    done
    echo "$name: no pidfile after 1 s" >&2
    return 1
}

# _lab_signal NAME SIG [WAIT]: send SIG to pidfile NAME's process and wait up to WAIT
# seconds (default 20) for it to exit, then SIGKILL it.
_lab_signal() {
    local name=$1 sig=$2 wait=${3:-20} pid i
    _lab_alive "$name" || return 0
    pid=$(_lab_pid "$name")
    kill "-$sig" "$pid"
    for ((i = 0; i < wait * 10; i++)); do
        _lab_alive "$name" || return 0 # (a zombie has an empty command line)
        sleep 0.1
    done
    echo "$name (pid $pid) did not exit after SIG$sig within ${wait}s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

instance_start() {
    _lab_spawn "$1" ctrl-exec-api --config "$CED_CONF_DIR/$1.conf"
}

instance_stop() {
    _lab_signal "$1" TERM 30
}

instance_logs() {
    tail -n "${2:-40}" "$LAB_DIR/logs/$1.log"
}

etcd_start() {
    _lab_spawn "etcd-$1" etcd --config-file "$LAB_DIR/etcd/$1.yml"
}

etcd_stop() {
    _lab_signal "etcd-$1" TERM 20
}

etcd_wipe() {  # NAME [NEW_CLUSTER_TOKEN]
    if _lab_alive "etcd-$1"; then
        echo "etcd member $1 is running: stop it first" >&2
        return 1
    fi
    rm -rf "$LAB_DIR/etcd/$1.data"
    if [ -n "${2:-}" ]; then  # a new cluster: a new token gives it a new cluster id
        sed -i "s/^initial-cluster-token: .*/initial-cluster-token: $2/" "$LAB_DIR/etcd/$1.yml"
    fi
}

haproxy_install() {
    haproxy -c -q -f "$1"
    cp "$1" "$LAB_DIR/haproxy/haproxy.cfg"
    # master-worker mode (-W): SIGUSR2 makes the master load the new config into new
    # workers; the old ones finish their connections (what `systemctl reload haproxy` does)
    kill -USR2 "$(_lab_pid haproxy)"
}

# ----- lab only: the failures the runbook test makes happen ------------------------------

lab_haproxy_start() {
    _lab_spawn haproxy haproxy -W -db -f "$LAB_DIR/haproxy/haproxy.cfg"
}

lab_kill_instance() {
    _lab_signal "$1" KILL 5
}

lab_kill_etcd() {
    _lab_signal "etcd-$1" KILL 5
}

# lab_destroy_control_plane: every instance and etcd member killed, every etcd data dir
# and the shared state paths deleted; HAProxy and the agents are left alone.
lab_destroy_control_plane() {
    local id m
    for id in $(instance_ids); do lab_kill_instance "$id"; done
    for m in $(etcd_names); do
        lab_kill_etcd "$m"
        rm -rf "$LAB_DIR/etcd/$m.data"
    done
    # shellcheck disable=SC2086
    rm -rf $CED_SHARED_PATHS
}
