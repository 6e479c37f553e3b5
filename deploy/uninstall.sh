#!/bin/bash
# Remove what deploy/install.sh installed. Kept unless --purge: the gateway's store
# (messages not yet delivered to the cloud!), the services' state, /etc/edgeferry (the
# node's identity and credentials) and the edgeferry user. Mosquitto stays installed
# and goes back to Debian's own configuration.
#
# usage: sudo deploy/uninstall.sh [--purge] [--destdir DIR] [--no-systemctl]
set -euo pipefail

destdir=${DESTDIR:-}
purge=0
no_systemctl=${EDGEFERRY_NO_SYSTEMCTL:-0}
while [ "$#" -gt 0 ]; do
    case "$1" in
        --purge) purge=1; shift ;;
        --destdir) destdir=$2; shift 2 ;;
        --no-systemctl) no_systemctl=1; shift ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -n "$destdir" ]; then
    no_systemctl=1
elif [ "$(id -u)" -ne 0 ]; then
    echo "error: run as root (sudo $0), or give --destdir DIR" >&2
    exit 1
fi
say() { echo "edgeferry uninstall: $*"; }
units=$destdir/etc/systemd/system

if [ "$no_systemctl" != 1 ]; then
    for u in $(systemctl list-units --all --plain --no-legend 'edgeferry*' | awk '{print $1}'); do
        systemctl disable --now --quiet "$u" || true
    done
    systemctl disable --quiet edgeferry.target edgeferry-gateway.service 2>/dev/null || true
fi
rm -f "$units/edgeferry-gateway.service" "$units/edgeferry-ingest.service" "$units/edgeferry-service@.service" \
      "$units/edgeferry.target" "$units/mosquitto.service.d/edgeferry.conf"
rmdir "$units/mosquitto.service.d" 2>/dev/null || true
rm -rf "$destdir/opt/edgeferry"
say "removed the units and /opt/edgeferry"

if [ "$purge" = 1 ]; then
    rm -rf "$destdir/etc/edgeferry" "$destdir"/var/lib/edgeferry-* "$destdir"/var/lib/private/edgeferry-*
    if [ -z "$destdir" ] && id -u edgeferry >/dev/null 2>&1; then userdel edgeferry; fi
    say "purged /etc/edgeferry, the gateway's store and the services' state"
else
    say "kept /etc/edgeferry and /var/lib/edgeferry-* (the store); --purge removes them"
fi
if [ "$no_systemctl" != 1 ]; then
    systemctl daemon-reload
    systemctl try-restart mosquitto.service || true
fi
