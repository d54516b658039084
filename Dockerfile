# qmpnet controller image. QEMU runs on the host; mount the directory holding the guests' QMP sockets:
#   docker build -t qmpnet .
#   docker run --rm -v /run/qmpnet:/run/qmpnet qmpnet serve --broker mqtt://broker:1883 --guest-dir /run/qmpnet
# (direct mode works too: docker run --rm -v /run/qmpnet:/run/qmpnet qmpnet nic list --qmp /run/qmpnet/vm1.qmp)
FROM debian:12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY qmpnet /src/qmpnet
RUN python3 -m venv /opt/qmpnet && /opt/qmpnet/bin/pip install --no-cache-dir /src && rm -rf /src
USER root
ENTRYPOINT ["/opt/qmpnet/bin/qmpnet"]
CMD ["serve", "--config", "/etc/qmpnet/serve.toml"]
