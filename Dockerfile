# teltonika-ingest container image.
#
#   docker build -t teltonika-ingest .
#   docker run --read-only -p 5027:5027 -p 9090:9090 \
#       -e REDIS_URL=redis://redis:6379/0 -e TELTONIKA_INSTANCE_ID=ingest-1 teltonika-ingest
#
# Needs an external Redis (REDIS_URL): the image has no redis-server for the embedded one.
# The same image runs the processor (external Redis and PostgreSQL; metrics on 9092):
#   docker run --read-only -e REDIS_URL=redis://redis:6379/0 \
#       -e DATABASE_URL=postgresql://teltonika:pw@db/teltonika -e PROCESSOR_METRICS=tcp:9092 \
#       -e PROCESSOR_CONSUMER=processor-1 teltonika-ingest twistd -n --pidfile= teltonika-processor
# (compose.yaml puts both together, with Redis and PostgreSQL.)
# Stop with `docker stop -t 40` (or stop_grace_period / terminationGracePeriodSeconds above
# --shutdown-timeout, 30 s): docker's default 10 s cuts the graceful shutdown short.

# BASE: the image every stage starts from; the default is the usual public one. Where no
# registry is reachable, an image made from Debian packages does (make image-test:
# debootstrap --variant=minbase --include=python3,python3-venv,passwd bookworm DIR, then
# tar -C DIR -c . | docker import - NAME; --build-arg BASE=NAME).
# INSTALL: "source" builds from the sources (gcc from the base's package mirror); "wheelhouse"
# installs the project and its dependencies from ./wheelhouse (pip wheel on the host: the
# compiled hot path is in the project's wheel), without any network in the build.
ARG BASE=python:3.11-slim
ARG INSTALL=source

# hadolint ignore=DL3006
FROM ${BASE} AS install-source
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# gcc builds the compiled hot path (teltonika_ingest/codec/_fastavl.c); only this stage has it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY teltonika_ingest ./teltonika_ingest
COPY twisted ./twisted
# A normal (non-editable) install: the plugin lands in site-packages/twisted/plugins.
RUN python3 -m venv /opt/teltonika-ingest/venv \
    && /opt/teltonika-ingest/venv/bin/pip install --no-cache-dir .

# hadolint ignore=DL3006
FROM ${BASE} AS install-wheelhouse
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY wheelhouse /wheelhouse
RUN python3 -m venv /opt/teltonika-ingest/venv \
    && /opt/teltonika-ingest/venv/bin/pip install --no-cache-dir --no-index \
        --find-links /wheelhouse teltonika-ingest

# hadolint ignore=DL3006
FROM install-${INSTALL} AS build
# Fails the build if the C extension is missing (it is optional for pip).
RUN /opt/teltonika-ingest/venv/bin/python -P -c \
        "from teltonika_ingest.codec.accel import compiled_path_status as s; assert s() == 'on', s()"

# hadolint ignore=DL3006
FROM ${BASE}
COPY --from=build /opt/teltonika-ingest/venv /opt/teltonika-ingest/venv
ENV PATH=/opt/teltonika-ingest/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TELTONIKA_METRICS=tcp:9090 \
    TELTONIKA_DATA_DIR=/var/lib/teltonika-ingest
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Build Twisted's plugin cache (dropin.cache) now, as root: a read-only, non-root container
# would otherwise try, and fail noisily, to write it at every start.
RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && plugins="$(twistd --help)" \
    && grep -q teltonika-ingest <<<"$plugins" && grep -q teltonika-processor <<<"$plugins" \
    && useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /var/lib/teltonika-ingest --shell /usr/sbin/nologin teltonika \
    && install -d -o teltonika -g teltonika -m 0750 /var/lib/teltonika-ingest
WORKDIR /var/lib/teltonika-ingest
USER 10001:10001
EXPOSE 5027 9090
# /readyz on the port TELTONIKA_METRICS names (moving the port moves the check)
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "teltonika_ingest.cli.healthcheck"]
STOPSIGNAL SIGTERM
CMD ["twistd", "-n", "--pidfile=", "teltonika-ingest"]
