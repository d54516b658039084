# qmpnet controller image. QEMU runs on the host; mount the directory holding the guests' QMP sockets:
#   docker build -t qmpnet .
#   docker run --rm -v /run/qmpnet:/run/qmpnet qmpnet serve --broker mqtt://broker:1883 --guest-dir /run/qmpnet
# (direct mode works too: docker run --rm -v /run/qmpnet:/run/qmpnet qmpnet nic list --qmp /run/qmpnet/vm1.qmp)
# With podman or buildah, and on machines without a registry, build with scripts/image (README: "Container image").
ARG BASE=debian:12-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY qmpnet /src/qmpnet
# pip reads an index configuration and a CA bundle only if the build is given them as secrets (scripts/image passes
# the host's): they are mounted for this step only and end up in no layer. Without them pip uses PyPI.
RUN --mount=type=secret,id=pip-conf --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi \
 && python3 -m venv /opt/qmpnet \
 && /opt/qmpnet/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && rm -rf /src
USER root
ENTRYPOINT ["/opt/qmpnet/bin/qmpnet"]
CMD ["serve", "--config", "/etc/qmpnet/serve.toml"]
