# edgeferry for balena: one image for the gateway, the built-in services and the
# simulator (docker-compose.yml picks the command). Multi-arch official base image.
# The device identity (certificate, key) and the broker passwords come from balena
# device variables or a volume at start (edgeferry-entrypoint.sh); none is in the image.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# a C compiler for the MQTT parse accelerator (edge/_cparse.c), in this stage only: the
# image gets the built module, not the compiler (the base image has the Python headers)
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE* ./
COPY edge ./edge
COPY gateway ./gateway
COPY firmware_sim ./firmware_sim
COPY edgeferry ./edgeferry
# the accelerator is optional for pip (built when it can be); the image must have it
RUN python -m venv /opt/edgeferry && /opt/edgeferry/bin/pip install --no-compile . \
    && /opt/edgeferry/bin/python -c "import edge._cparse"

FROM python:3.11-slim-bookworm
ENV PATH=/opt/edgeferry/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/edgeferry /opt/edgeferry
COPY deploy/services /etc/edgeferry/services
COPY deploy/docker/edgeferry-entrypoint.sh /usr/local/bin/edgeferry-entrypoint
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin edgeferry \
    && mkdir -p /data \
    && chown edgeferry:edgeferry /data \
    && chmod 0700 /data \
    && chmod 0755 /usr/local/bin/edgeferry-entrypoint

# Named volume: the gateway's store (SQLite, WAL) or a service's dedup state.
VOLUME ["/data"]
WORKDIR /data
USER edgeferry
ENTRYPOINT ["/usr/local/bin/edgeferry-entrypoint"]
CMD ["--help"]
