# shellcheck shell=bash
# Site adapter for hosts run by systemd, reached over ssh (see README.md, "Site adapter").
# NOT exercised by the runbook test (the lab's adapter is ops/lab/site.sh): copy it, set
# the host maps and unit names of your site, and rehearse a runbook before you need it.
#
#   SITE_HOSTS       instance id -> host:       "i1=10.0.0.11 i2=10.0.0.12 i3=10.0.0.13"
#   SITE_ETCD_HOSTS  etcd member -> host:       "m1=10.0.0.21 m2=10.0.0.22 m3=10.0.0.23"
#   SITE_LB_HOST     the HAProxy host:          "10.0.0.10"
#
# Units: ctrl-exec-api@ID.service with ExecStart=ctrl-exec-api --config $CED_CONF_DIR/%i.conf
# (SIGTERM is the graceful stop: KillMode=mixed, TimeoutStopSec=40), etcd.service (Debian's
# etcd-server, configured in /etc/default/etcd with ETCD_INITIAL_CLUSTER_STATE=new, which
# etcd ignores while a data dir exists) and haproxy.service (master-worker: reload = USR2).

: "${SITE_HOSTS:?}" "${SITE_ETCD_HOSTS:?}" "${SITE_LB_HOST:?}"
SITE_SSH=${SITE_SSH:-ssh -o BatchMode=yes}
SITE_ETCD_DATA=${SITE_ETCD_DATA:-/var/lib/etcd/default}

_site_lookup() { # _site_lookup MAP KEY
    local kv
    for kv in $1; do
        if [ "${kv%%=*}" = "$2" ]; then
            echo "${kv#*=}"
            return 0
        fi
    done
    echo "site: no '$2' in the host map" >&2
    return 1
}

_site_on() { # _site_on HOST COMMAND...
    local host=$1
    shift
    # shellcheck disable=SC2086
    $SITE_SSH "$host" "$@"
}

instance_start() {
    _site_on "$(_site_lookup "$SITE_HOSTS" "$1")" sudo systemctl start "ctrl-exec-api@$1"
}

instance_stop() {
    # systemctl stop waits for the unit to exit (SIGTERM drain, then SIGKILL at the timeout)
    _site_on "$(_site_lookup "$SITE_HOSTS" "$1")" sudo systemctl stop "ctrl-exec-api@$1"
}

instance_logs() {
    _site_on "$(_site_lookup "$SITE_HOSTS" "$1")" \
        sudo journalctl -u "ctrl-exec-api@$1" -n "${2:-40}" --no-pager
}

etcd_start() {
    _site_on "$(_site_lookup "$SITE_ETCD_HOSTS" "$1")" sudo systemctl start etcd
}

etcd_stop() {
    _site_on "$(_site_lookup "$SITE_ETCD_HOSTS" "$1")" sudo systemctl stop etcd
}

etcd_wipe() {
    local host
    host=$(_site_lookup "$SITE_ETCD_HOSTS" "$1")
    _site_on "$host" "systemctl is-active --quiet etcd && { echo 'etcd runs: stop it first' >&2; exit 1; };" \
        "if [ -d '$SITE_ETCD_DATA' ]; then sudo mv '$SITE_ETCD_DATA' '$SITE_ETCD_DATA.broken.\$(date +%s)'; fi"
    if [ -n "${2:-}" ]; then  # a new cluster: a new token gives it a new cluster id
        _site_on "$host" "sudo sed -i 's/^ETCD_INITIAL_CLUSTER_TOKEN=.*/ETCD_INITIAL_CLUSTER_TOKEN=$2/' /etc/default/etcd"
    fi
}

haproxy_install() {
    haproxy -c -q -f "$1"
    scp -q "$1" "$SITE_LB_HOST:/tmp/ctrl-exec-haproxy.cfg"
    _site_on "$SITE_LB_HOST" "sudo haproxy -c -q -f /tmp/ctrl-exec-haproxy.cfg &&" \
        "sudo install -m 0644 /tmp/ctrl-exec-haproxy.cfg /etc/haproxy/haproxy.cfg &&" \
        "sudo systemctl reload haproxy"
}
