# Shared by the maintainer scripts of the .deb and the .rpm (build.sh puts it in front).
# They follow the distributions' own conventions for a service (Debian: what
# dh_installsystemd generates, with deb-systemd-helper and deb-systemd-invoke; RPM: the
# %systemd_post / %systemd_preun / %systemd_postun_with_restart macros, spelled out
# because nfpm scriptlets are plain sh) with one difference: where those restart the
# service on an upgrade, a running daemon hands over instead, so programs keep their pids.
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

is_active() { systemctl --quiet is-active "$unit" 2>/dev/null; }

purge_data() {
    rm -rf /var/lib/ocp_agentd /var/log/ocp_agentd /etc/ocp_agentd
}

# What Python or an administrator left in the package's private trees.
remove_leftovers() {
    rm -rf "$prefix" /run/ocp_agentd
}
