# phonepush container image. See docs/container.md.
#
#   docker build -t phonepush .
#   docker run -d -p 8080:8080 -v ./phonepush.toml:/etc/phonepush/phonepush.toml:ro \
#       -v phonepush-spool:/var/lib/phonepush phonepush
#
# BASE_IMAGE is any Debian-like image with python3 (>= 3.11) and its venv module; both stages use
# it so the venv's interpreter link stays valid. .ci/container-check passes a locally built one.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/phonepush
# Only what the wheel is built from, so edits to tests or docs do not invalidate this layer.
COPY pyproject.toml README.md ./
COPY daemon ./daemon
# pip and setuptools are not needed at run time; leaving them out keeps the image smaller.
RUN /opt/phonepush/bin/pip install '.[postgres]' \
    && /opt/phonepush/bin/pip uninstall -y pip setuptools

FROM ${BASE_IMAGE}
ARG PHONEPUSH_UID=10001
LABEL org.opencontainers.image.title="phonepush" \
      org.opencontainers.image.description="Turn MQTT and webhook events into CGI Execute pushes to Cisco IP desk phones" \
      org.opencontainers.image.licenses="MIT"

# A fixed uid/gid, so a host directory mounted on /var/lib/phonepush can be chowned ahead of time.
RUN groupadd --gid "${PHONEPUSH_UID}" phonepush \
    && useradd --uid "${PHONEPUSH_UID}" --gid phonepush --no-create-home --no-log-init \
        --home-dir /var/lib/phonepush --shell /usr/sbin/nologin phonepush \
    && install -d -o phonepush -g phonepush -m 0700 /var/lib/phonepush \
    && install -d -m 0755 /etc/phonepush

COPY --from=builder /opt/phonepush /opt/phonepush
COPY config/phonepush.toml /etc/phonepush/phonepush.toml

# The daemon refuses a non-loopback listen address unless a webhook token is configured
# (PHONEPUSH_WEBHOOK__TOKEN or a token file): publishing the port is a deliberate act.
ENV PATH=/opt/phonepush/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PHONEPUSH_SERVER__LISTEN=0.0.0.0:8080 \
    PHONEPUSH_SPOOL__PATH=/var/lib/phonepush/spool.db

USER ${PHONEPUSH_UID}:${PHONEPUSH_UID}
WORKDIR /var/lib/phonepush
VOLUME ["/etc/phonepush", "/var/lib/phonepush"]
EXPOSE 8080

# No curl in slim images: the venv's Python asks /healthz on the port the daemon listens on.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('PHONEPUSH_SERVER__LISTEN', ':8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

ENTRYPOINT ["phonepush"]
CMD ["run", "--config", "/etc/phonepush/phonepush.toml"]
