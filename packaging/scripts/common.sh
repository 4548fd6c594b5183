# Shared by the maintainer scripts of the .deb and the .rpm (build.sh puts it in front).
unit=ocp-agentd.service
prefix=/opt/ocp_agentd

systemd_running() { [ -d /run/systemd/system ]; }

unit_prop() { systemctl show -p "$1" --value "$unit" 2>/dev/null || true; }

# Asks the running daemon to hand over: on SIGUSR2 it exits with status 75 leaving its
# programs running, systemd starts the (new) daemon at once (RestartForceExitStatus=75)
# and that one adopts every program with its pid unchanged. Waits until it is READY.
handover() {
    old=$(unit_prop MainPID)
    case $old in ''|0) return 0 ;; esac
    echo "ocp-agentd: handing over from pid $old to the new version (programs keep running)"
    kill -USR2 "$old" 2>/dev/null || return 0
    i=0
    while [ "$i" -lt 900 ]; do
        new=$(unit_prop MainPID)
        if [ "$(unit_prop ActiveState)" = active ] && [ -n "$new" ] && [ "$new" != 0 ] \
            && [ "$new" != "$old" ]; then
            echo "ocp-agentd: pid $new is ready"
            return 0
        fi
        sleep 0.1
        i=$((i + 1))
    done
    echo "ocp-agentd: the new daemon is not ready after 90 s; see: journalctl -u $unit" >&2
    return 0
}

install_or_upgrade() {
    # $1: the version that was configured before ("" on a first install)
    if ! systemd_running; then
        systemctl enable "$unit" >/dev/null 2>&1 || true
        return 0
    fi
    systemctl daemon-reload || true
    if [ "$(unit_prop ActiveState)" = active ]; then
        handover
    elif [ -z "$1" ] || ! systemctl is-enabled --quiet "$unit" 2>/dev/null; then
        systemctl enable "$unit" || true
        systemctl start "$unit" \
            || echo "ocp-agentd: could not start; see: journalctl -u $unit" >&2
    fi
    # else: an upgrade of a service the administrator stopped: leave it stopped.
}

stop_for_removal() {
    systemctl disable "$unit" >/dev/null 2>&1 || true
    if systemd_running; then
        # SIGTERM: the daemon stops all its programs before it exits.
        systemctl stop "$unit" || true
    fi
}

after_removal() {
    if systemd_running; then
        systemctl daemon-reload || true
        systemctl reset-failed "$unit" >/dev/null 2>&1 || true
    fi
    # Whatever Python or an administrator left in the package's private trees.
    rm -rf "$prefix" /run/ocp_agentd
}

purge_data() {
    rm -rf /var/lib/ocp_agentd /var/log/ocp_agentd /etc/ocp_agentd
}
