#!/bin/sh
# Start the locked-down local broker: write the password file and ACL from the device
# variables into a directory only this user reads, then exec mosquitto. Never echoes them.
set -eu
run=${EDGEFERRY_MOSQUITTO_RUN:-/mosquitto/run}  # the image renders its config with this path
umask 077
if [ -z "${EDGEFERRY_BROKER_PASSWD_B64:-}" ] || [ -z "${EDGEFERRY_BROKER_ACL_B64:-}" ]; then
    echo "error: EDGEFERRY_BROKER_PASSWD_B64 and EDGEFERRY_BROKER_ACL_B64 are not set: run" \
         "'edgeferry provision' and set its balena/mosquitto.env as service variables (docs/deploy.md)" >&2
    exit 1
fi
printf '%s' "$EDGEFERRY_BROKER_PASSWD_B64" | base64 -d > "$run/passwd.tmp"
printf '%s' "$EDGEFERRY_BROKER_ACL_B64" | base64 -d > "$run/acl.tmp"
mv "$run/passwd.tmp" "$run/passwd"
mv "$run/acl.tmp" "$run/acl"
unset EDGEFERRY_BROKER_PASSWD_B64 EDGEFERRY_BROKER_ACL_B64
exec "$@"
