#!/bin/bash
# Install edgeferry on Raspberry Pi OS (Bookworm, 64-bit) or Debian 12 with systemd:
#   - Mosquitto from the distribution, run from edgeferry's config (a systemd drop-in),
#   - edgeferry in a virtual environment under /opt/edgeferry (Bookworm is PEP 668:
#     no pip into the system Python),
#   - configuration under /etc/edgeferry, the node's identity and broker credentials from
#     `edgeferry provision` (--provisioned DIR),
#   - the systemd units, enabled.
# Running it again changes nothing that is already in place (files are replaced only when
# their content differs; a configuration you edited is kept).
#
# usage: sudo deploy/install.sh [--provisioned DIR] [--services "aggregator rules"]
#                               [--destdir DIR] [--no-apt] [--no-systemctl] [--no-venv]
#   --provisioned DIR  the output of `edgeferry provision` for this node
#   --services LIST    built-in services to enable (default: aggregator rules)
#   --destdir DIR      install below DIR instead of / (packaging, tests); implies no
#                      apt, no systemctl, no user creation and no chown
#   --no-apt, --no-systemctl, --no-venv   skip that step
# The same through the environment: DESTDIR, EDGEFERRY_NO_APT=1, EDGEFERRY_NO_SYSTEMCTL=1,
# EDGEFERRY_NO_VENV=1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(cd "$here/.." && pwd)
destdir=${DESTDIR:-}
provisioned=""
services="aggregator rules"
no_apt=${EDGEFERRY_NO_APT:-0}
no_systemctl=${EDGEFERRY_NO_SYSTEMCTL:-0}
no_venv=${EDGEFERRY_NO_VENV:-0}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --provisioned) provisioned=$2; shift 2 ;;
        --services) services=$2; shift 2 ;;
        --destdir) destdir=$2; shift 2 ;;
        --no-apt) no_apt=1; shift ;;
        --no-systemctl) no_systemctl=1; shift ;;
        --no-venv) no_venv=1; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -n "$destdir" ]; then
    destdir=$(mkdir -p "$destdir" && cd "$destdir" && pwd)
    no_apt=1 no_systemctl=1
    as_root=0
elif [ "$(id -u)" -ne 0 ]; then
    echo "error: run as root (sudo $0), or give --destdir DIR" >&2
    exit 1
else
    as_root=1
fi
if [ -n "$provisioned" ] && [ ! -f "$provisioned/node.yaml" ]; then
    echo "error: $provisioned is not the output of 'edgeferry provision' (no node.yaml)" >&2
    exit 1
fi

etc=$destdir/etc/edgeferry
opt=$destdir/opt/edgeferry
units=$destdir/etc/systemd/system
changed=0

say() { echo "edgeferry install: $*"; }

# put SRC DEST MODE [OWNER]: install a file only when its content or mode differs
put() {
    local from=$1 to=$2 mode=$3 owner=${4:-}
    mkdir -p "$(dirname "$to")"
    if [ -f "$to" ] && cmp -s "$from" "$to" && [ "$(stat -c %a "$to")" = "${mode#0}" ]; then
        return 0
    fi
    install -m "$mode" "$from" "$to"
    if [ "$as_root" = 1 ] && [ -n "$owner" ]; then chown "$owner" "$to"; fi
    say "wrote ${to#"$destdir"}"
    changed=1
}

# keep SRC DEST MODE: install a configuration file only if it is not there (user edits stay)
keep() {
    if [ ! -e "$2" ]; then put "$1" "$2" "$3"; fi
}

dir() {  # dir PATH MODE [OWNER]
    if [ ! -d "$1" ]; then install -d -m "$2" "$1"; say "created ${1#"$destdir"}"; changed=1; fi
    if [ "$as_root" = 1 ] && [ -n "${3:-}" ]; then chown "$3" "$1"; fi
}

# 1. Mosquitto and Python's venv module from the distribution
if [ "$no_apt" != 1 ]; then
    missing=()
    dpkg -s mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
    dpkg -s python3-venv >/dev/null 2>&1 || missing+=(python3-venv)
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
        changed=1
    fi
fi

# 2. the gateway's system user (the services run as systemd DynamicUsers)
if [ "$as_root" = 1 ] && ! id -u edgeferry >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin edgeferry
    say "created the system user edgeferry"
    changed=1
fi

# 3. edgeferry in a virtual environment, reinstalled only when the sources changed
if [ "$no_venv" != 1 ]; then
    stamp=$(cd "$src" && find pyproject.toml setup.py edge gateway firmware_sim edgeferry -type f -name '*.py' -o \
            -type f -name '*.toml' -o -type f -name '*.conf' -o -type f -name '*.c' | LC_ALL=C sort | xargs sha256sum \
            | sha256sum | cut -d' ' -f1)
    if [ ! -x "$opt/venv/bin/python" ]; then
        python3 -m venv "$opt/venv"
        say "created the virtual environment ${opt#"$destdir"}/venv"
        changed=1
    fi
    if [ "$(cat "$opt/.source-sha256" 2>/dev/null)" != "$stamp" ]; then
        "$opt/venv/bin/pip" install -q --upgrade "$src"
        echo "$stamp" > "$opt/.source-sha256"
        say "installed edgeferry into ${opt#"$destdir"}/venv"
        # the MQTT parse accelerator (edge/_cparse.c) is built only where gcc and the
        # Python headers are installed; without it the gateway parses in pure Python
        if ! "$opt/venv/bin/python" -c "import edge._cparse" 2>/dev/null; then
            say "note: no C compiler or Python headers: the gateway parses MQTT in pure Python" \
                "(for the C accelerator: apt-get install gcc python3-dev, then" \
                "${opt#"$destdir"}/venv/bin/pip install --force-reinstall --no-deps $src)"
        fi
        changed=1
    fi
fi
for doc in deploy.md operations.md; do
    if [ -f "$src/docs/$doc" ]; then put "$src/docs/$doc" "$opt/docs/$doc" 0644; fi
done

# 4. configuration
dir "$etc" 0755
dir "$etc/services" 0755
dir "$etc/secrets" 0700
dir "$etc/tls" 0750 root:edgeferry
dir "$etc/mosquitto" 0750 root:mosquitto
# one file for every service of the node (each service reads its own section); modules of
# your own services go into /etc/edgeferry/services (the units' working directory)
keep "$src/deploy/services/services.yaml" "$etc/services.yaml" 0644
if [ -n "$provisioned" ]; then
    keep "$provisioned/node.yaml" "$etc/gateway.yaml" 0644  # you may have edited it (cloud URL)
    put "$provisioned/tls/ca.crt" "$etc/tls/ca.crt" 0644
    put "$provisioned/tls/node.crt" "$etc/tls/node.crt" 0644
    put "$provisioned/tls/node.key" "$etc/tls/node.key" 0600 edgeferry:edgeferry
    put "$provisioned/mosquitto/passwd" "$etc/mosquitto/passwd" 0640 root:mosquitto
    put "$provisioned/mosquitto/acl" "$etc/mosquitto/acl" 0640 root:mosquitto
    put "$provisioned/secrets/gateway.env" "$etc/secrets/gateway.env" 0600 root:root
    put "$provisioned/credentials/gateway.password" "$etc/secrets/gateway.password" 0600 root:root
    for name in $services; do  # each service's password, handed over by systemd (LoadCredential)
        if [ -f "$provisioned/credentials/$name.password" ]; then
            put "$provisioned/credentials/$name.password" "$etc/secrets/$name.password" 0600 root:root
        fi
    done
fi

# 5. the local broker's config: edge.conf's tuning plus the locked-down listener
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
sh "$src/deploy/mosquitto/render-conf.sh" "$src/deploy/mosquitto/edge.conf" "$src/deploy/mosquitto/site.conf.in" \
    /etc/edgeferry/mosquitto /var/lib/mosquitto > "$tmp"
put "$tmp" "$etc/mosquitto/mosquitto.conf" 0644

# 6. systemd units
for unit in edgeferry-gateway.service edgeferry-ingest.service edgeferry-service@.service edgeferry.target; do
    put "$src/deploy/systemd/$unit" "$units/$unit" 0644
done
put "$src/deploy/systemd/mosquitto.service.d/edgeferry.conf" "$units/mosquitto.service.d/edgeferry.conf" 0644

if [ "$no_systemctl" != 1 ]; then
    systemctl daemon-reload
    to_enable="mosquitto.service edgeferry.target edgeferry-gateway.service"
    for name in $services; do to_enable="$to_enable edgeferry-service@$name.service"; done
    for u in $to_enable; do
        if ! systemctl is-enabled --quiet "$u" 2>/dev/null; then systemctl enable --quiet "$u"; changed=1; fi
    done
    if [ -z "$provisioned" ] && [ ! -f "$etc/mosquitto/passwd" ]; then
        say "not started: provision this node first (edgeferry provision ... --out DIR; $0 --provisioned DIR)"
    elif [ "$changed" = 1 ] || ! systemctl is-active --quiet edgeferry-gateway.service; then
        systemctl restart mosquitto.service
        systemctl restart edgeferry.target
    fi
fi

if [ "$changed" = 0 ]; then say "nothing to change"; else say "done"; fi
