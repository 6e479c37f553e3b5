#!/bin/sh
# Render a device's local broker config: edge.conf's tuning (its development listener,
# anonymous access and persistence path dropped) followed by site.conf.in with the paths
# filled in. Used by deploy/install.sh and deploy/docker/mosquitto.Dockerfile.
#
# usage: render-conf.sh EDGE_CONF SITE_CONF_IN CONF_DIR DATA_DIR [PORT [BIND]] > mosquitto.conf
#   CONF_DIR holds passwd and acl; DATA_DIR is the persistence directory.
#   BIND empty (the default) listens on every interface.
set -eu
if [ "$#" -lt 4 ]; then
    echo "usage: $0 EDGE_CONF SITE_CONF_IN CONF_DIR DATA_DIR [PORT [BIND]]" >&2
    exit 2
fi
edge_conf=$1 site_in=$2 conf_dir=$3 data_dir=$4 port=${5:-1883} bind=${6:-}
echo "# Rendered by deploy/mosquitto/render-conf.sh from edge.conf and site.conf.in: edit those."
sed -E 's/^(listener|allow_anonymous|per_listener_settings|persistence_location)([[:space:]])/# (device: see below) \1\2/' \
    "$edge_conf"
echo
sed -e "s#@CONF_DIR@#${conf_dir}#g" -e "s#@DATA_DIR@#${data_dir}#g" \
    -e "s#@PORT@#${port}#g" -e "s#@BIND@#${bind}#g" -e 's/[[:space:]]*$//' "$site_in"
