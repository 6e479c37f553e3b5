# The device's local broker for balena (docker-compose.yml, service "mosquitto").
# Multi-arch official image (amd64, arm64, arm/v7, ...). The config is built in; the
# password file and ACL are rendered at start from the device variables that
# `edgeferry provision` prints (EDGEFERRY_BROKER_PASSWD_B64, EDGEFERRY_BROKER_ACL_B64):
# no credential is ever part of the image.
FROM eclipse-mosquitto:2

COPY deploy/mosquitto/edge.conf deploy/mosquitto/site.conf.in deploy/mosquitto/render-conf.sh /etc/edgeferry/
COPY deploy/docker/mosquitto-entrypoint.sh /usr/local/bin/edgeferry-mosquitto
RUN sh /etc/edgeferry/render-conf.sh /etc/edgeferry/edge.conf /etc/edgeferry/site.conf.in \
        /mosquitto/run /mosquitto/data 1883 > /mosquitto/config/mosquitto.conf \
    && mkdir -p /mosquitto/run /mosquitto/data \
    && chown mosquitto:mosquitto /mosquitto/run /mosquitto/data \
    && chmod 0700 /mosquitto/run \
    && chmod 0755 /usr/local/bin/edgeferry-mosquitto

# Named volume for the broker's persistence (sessions and queued messages).
VOLUME ["/mosquitto/data"]
EXPOSE 1883
USER mosquitto
ENTRYPOINT ["/usr/local/bin/edgeferry-mosquitto"]
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
