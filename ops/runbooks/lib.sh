# shellcheck shell=bash
# Helpers for the runbooks in this directory. The first block of every runbook sources it:
#
#     . "$CED_RUNBOOKS/lib.sh"
#
# It sources your site adapter ($CED_SITE: how processes are started and stopped where you
# run, see README.md) and defines read-only helpers. Nothing in this file changes the
# cluster. Every helper returns non-zero when its check fails, so under `set -e` (the test)
# a failed check stops the runbook, and in an interactive shell it prints why.

: "${CED_SITE:?set CED_SITE to your site adapter (README.md, section Environment)}"
# shellcheck source=/dev/null
. "$CED_SITE"

# retry SECONDS CMD [ARGS...]: run CMD every half second until it succeeds; fail (and say
# what) once SECONDS have passed.
retry() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "retry: still failing after the time allowed: $*" >&2
            return 1
        fi
        sleep 0.5
    done
}

# instance_ids: the instance ids of $CED_INSTANCES ("i1=http://host:7446 i2=...").
instance_ids() {
    local kv
    for kv in $CED_INSTANCES; do echo "${kv%%=*}"; done
}

# health_url ID: the health port URL of instance ID.
health_url() {
    local kv
    for kv in $CED_INSTANCES; do
        if [ "${kv%%=*}" = "$1" ]; then
            echo "${kv#*=}"
            return 0
        fi
    done
    echo "health_url: no instance '$1' in CED_INSTANCES" >&2
    return 1
}

# leaders: the ids of the instances whose /leader answers 200 (one per line).
leaders() {
    local id
    for id in $(instance_ids); do
        if curl -fsS -m 2 -o /dev/null "$(health_url "$id")/leader" 2>/dev/null; then
            echo "$id"
        fi
    done
}

# one_leader: exactly one instance answers /leader with 200 (prints its id).
one_leader() {
    local got
    got=$(leaders)
    [ -n "$got" ] && [ "$(echo "$got" | wc -l)" -eq 1 ] && echo "$got"
}

# healthy ID: /health of instance ID answers 200.
healthy() {
    curl -fsS -m 2 -o /dev/null "$(health_url "$1")/health" 2>/dev/null
}

# all_healthy: /health answers 200 on every instance of $CED_INSTANCES.
all_healthy() {
    local id
    for id in $(instance_ids); do
        healthy "$id" || { echo "not healthy: $id" >&2; return 1; }
    done
}

# etcd_names, etcd_endpoint NAME: the members of $ETCD_MEMBERS ("m1=http://host:2379 ...").
etcd_names() {
    local kv
    for kv in $ETCD_MEMBERS; do echo "${kv%%=*}"; done
}
etcd_endpoint() {
    local kv
    for kv in $ETCD_MEMBERS; do
        if [ "${kv%%=*}" = "$1" ]; then
            echo "${kv#*=}"
            return 0
        fi
    done
    echo "etcd_endpoint: no member '$1' in ETCD_MEMBERS" >&2
    return 1
}

# api HOST:PORT PATH [CURL ARGS...]: HTTPS request to the API of one instance (its
# advertise address) or of the load balancer ($CED_LB_API). The API certificate is the
# dispatcher certificate, whose only name is its CN "ctrl-exec-dispatcher": curl is told to
# connect to HOST:PORT while checking that name against the CA.
api() {
    local target=$1 path=$2
    shift 2
    local tls=(--cacert "$CED_CA")
    if [ -n "${CED_OPERATOR_CERT:-}" ]; then
        tls+=(--cert "$CED_OPERATOR_CERT" --key "$CED_OPERATOR_KEY")
    fi
    curl -fsS -m 30 "${tls[@]}" --connect-to "::$target" \
        "https://${CED_API_NAME:-ctrl-exec-dispatcher}$path" "$@"
}

# presented_serial HOST:PORT: the serial of the certificate a TLS listener presents, in
# lower-case hex without leading zeros (the form of /status and `ced cluster status`).
presented_serial() {
    openssl s_client -connect "$1" </dev/null 2>/dev/null |
        openssl x509 -noout -serial | sed -e 's/^serial=//' -e 's/^0*//' | tr 'A-F' 'a-f'
}

# haproxy_cmd COMMAND...: one command on HAProxy's runtime API (stats socket).
haproxy_cmd() {
    echo "$*" | socat stdio "unix-connect:$HAPROXY_SOCK"
}

# haproxy_up BACKEND: the servers of BACKEND that HAProxy considers running, sorted
# ("show servers state": field 4 is the server name, field 6 srv_op_state, 2 = running).
haproxy_up() {
    haproxy_cmd "show servers state $1" | awk '$1 ~ /^[0-9]+$/ && NF > 6 && $6 == 2 {print $4}' |
        sort
}

# leader_is ID: ID is the one instance whose /leader answers 200.
leader_is() {
    [ "$(one_leader)" = "$1" ]
}

# lb_serves_all: HAProxy's API backend has every instance of $CED_INSTANCES up, and only
# those; its pairing backend has exactly the leader up.
lb_serves_all() {
    local want up leader
    want=$(instance_ids | sort | xargs)
    up=$(haproxy_up be_ctrl_exec_api | xargs)
    if [ "$up" != "$want" ]; then
        echo "HAProxy API backend: up [$up], want [$want]" >&2
        return 1
    fi
    leader=$(one_leader) || { echo "no single leader" >&2; return 1; }
    up=$(haproxy_up be_ctrl_exec_pairing | xargs)
    if [ "$up" != "$leader" ]; then
        echo "HAProxy pairing backend: up [$up], want [$leader]" >&2
        return 1
    fi
}

# api_addrs: HOST:PORT of every member's API, from its advertise URL in the store.
api_addrs() {
    ced --config "$CED_CONFIG" cluster status --json |
        jq -r '.members[].advertise_url | sub("^https?://"; "") | sub("/.*$"; "")'
}

# cert_file_serial FILE: the serial of a certificate file, in the form of /status.
cert_file_serial() {
    openssl x509 -noout -serial -in "$1" | sed -e 's/^serial=//' -e 's/^0*//' | tr 'A-F' 'a-f'
}

# ping_all [HOST:PORT]: every registered agent answers a ping, sent by `ced ping` from this
# host or, given HOST:PORT, through that API (an instance's, or the load balancer's).
ping_all() {
    local agents n out
    agents=$(ced --config "$CED_CONFIG" list-agents --json | jq -r '.[].hostname') || return 1
    n=$(echo "$agents" | wc -w)
    if [ "$n" -eq 0 ]; then
        echo "ping_all: no registered agents" >&2
        return 1
    fi
    if [ $# -eq 0 ]; then
        # shellcheck disable=SC2086
        out=$(ced --config "$CED_CONFIG" ping --json $agents) || return 1
    else
        # shellcheck disable=SC2086
        out=$(api "$1" /ping -H 'Content-Type: application/json' \
            -d "$(jq -cn '{hosts: $ARGS.positional}' --args $agents)") || return 1
    fi
    if ! echo "$out" | jq -e --argjson n "$n" \
        '(.results | length) == $n and all(.results[]; .status == "ok")' >/dev/null; then
        echo "ping_all: not every agent answered${1:+ through $1}: $out" >&2
        return 1
    fi
    echo "all $n agents answered${1:+ through $1}"
}
