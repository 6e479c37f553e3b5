#!/bin/sh
# Start one edgeferry process on balena. EDGEFERRY_ROLE (set per service in
# docker-compose.yml) says which credentials it takes:
#   gateway  EDGEFERRY_LOCAL (user gateway) and EDGEFERRY_LOCAL_PASSWORD_FILE from
#            EDGEFERRY_GATEWAY_PASSWORD (a 0600 file, not the URL); TLS files from
#            EDGEFERRY_TLS_{CERT,KEY,CA}_B64 or a volume mounted at /identity
#   NAME     EDGEFERRY_USERNAME=NAME and EDGEFERRY_PASSWORD_FILE (--password-file) from
#            EDGEFERRY_<NAME>_PASSWORD (a 0600 file, not the environment)
#   sim      exits 0 at once unless EDGEFERRY_SIM_DEVICES is a positive number
# Secrets are written 0600 under $HOME/.identity and never echoed.
set -eu
umask 077
role=${EDGEFERRY_ROLE:-}
broker_host=${EDGEFERRY_BROKER_HOST:-mosquitto}
ident="${HOME:-/data}/.identity"

decode() {  # decode VAR FILE: write base64 variable VAR into FILE if it is set
    eval "value=\${$1:-}"
    if [ -n "$value" ]; then
        mkdir -p "$ident"
        printf '%s' "$value" | base64 -d > "$2.tmp" && mv "$2.tmp" "$2"
        unset "$1"
        return 0
    fi
    return 1
}

case "$role" in
    gateway)
        pw=${EDGEFERRY_GATEWAY_PASSWORD:-}
        unset EDGEFERRY_GATEWAY_PASSWORD
        if [ -z "${EDGEFERRY_LOCAL:-}" ] && [ -n "$pw" ]; then
            mkdir -p "$ident"
            printf '%s\n' "$pw" > "$ident/gateway.password"
            export EDGEFERRY_LOCAL="mqtt://gateway@${broker_host}:1883"
            export EDGEFERRY_LOCAL_PASSWORD_FILE="$ident/gateway.password"
        fi
        for kind in CERT KEY CA; do
            lower=$(echo "$kind" | tr '[:upper:]' '[:lower:]')
            if decode "EDGEFERRY_TLS_${kind}_B64" "$ident/node.$lower"; then
                eval "export EDGEFERRY_${kind}_FILE=$ident/node.$lower"
            elif [ -f "/identity/node.$lower" ]; then
                eval "export EDGEFERRY_${kind}_FILE=/identity/node.$lower"
            fi
        done
        ;;
    sim)
        case "${EDGEFERRY_SIM_DEVICES:-0}" in
            ''|0|*[!0-9]*) echo "simulated fleet off (set EDGEFERRY_SIM_DEVICES to a number of devices)"; exit 0 ;;
        esac
        pw=${EDGEFERRY_SIM_PASSWORD:-}
        unset EDGEFERRY_SIM_PASSWORD
        if [ -z "$pw" ]; then
            echo "error: EDGEFERRY_SIM_PASSWORD is not set (edgeferry provision --device-class sim)" >&2
            exit 1
        fi
        mkdir -p "$ident"
        printf '%s\n' "$pw" > "$ident/sim.password"
        set -- sim run --broker "mqtt://${broker_host}:1883" --username sim --password-file "$ident/sim.password" \
            --devices "$EDGEFERRY_SIM_DEVICES" --no-progress "$@"
        ;;
esac
if [ -n "$role" ] && [ "$role" != gateway ] && [ "$role" != sim ]; then
    var=$(echo "EDGEFERRY_${role}_PASSWORD" | tr '.-' '__' | tr '[:lower:]' '[:upper:]')
    eval "pw=\${$var:-}"
    unset "$var"
    if [ -z "${EDGEFERRY_PASSWORD:-}" ] && [ -z "${EDGEFERRY_PASSWORD_FILE:-}" ] && [ -n "$pw" ]; then
        mkdir -p "$ident"
        pwfile="$ident/$(echo "$role" | tr -c 'A-Za-z0-9_.\n-' '_').password"
        printf '%s\n' "$pw" > "$pwfile"
        export EDGEFERRY_USERNAME="${EDGEFERRY_USERNAME:-$role}" EDGEFERRY_PASSWORD_FILE="$pwfile"
    fi
    pw=
fi
exec edgeferry "$@"
