# aigw as an egress proxy in a container: `aigw proxy`, one worker per CPU the container may use.
#   docker build -t aigw .
#   docker run -d --name aigw -p 127.0.0.1:8080:8080 --stop-timeout 30 \
#     -v aigw-state:/var/lib/aigw -v /etc/aigw/mitm.yaml:/etc/aigw/mitm.yaml:ro \
#     --env-file /etc/aigw/env aigw
# The store and the CA (with its private key) are on the volume /var/lib/aigw, owned by the
# container's aigw user; the logs go to stderr (`docker logs`). Extra flags go after the image
# name, e.g. `... aigw --workers 4 --set proxyauth=@/etc/aigw/htpasswd --set
# aigw_metrics=0.0.0.0:9464` (publish that port to the monitoring network only).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/aigw aigw \
    && install -d -o aigw -g aigw -m 0700 /var/lib/aigw

WORKDIR /opt/aigw
COPY pyproject.toml constraints.txt README.md ./
COPY addon addon
COPY store store
RUN pip install -c constraints.txt . && rm -rf /opt/aigw/build
COPY mitm.yaml /etc/aigw/mitm.yaml

USER aigw
WORKDIR /var/lib/aigw
VOLUME ["/var/lib/aigw"]
EXPOSE 8080
STOPSIGNAL SIGTERM
# 0.0.0.0 inside the container: publish the port only where clients may reach it (see the
# README's "Running it for a company": proxyauth and the firewall decide who may use it).
ENTRYPOINT ["aigw", "--config", "/etc/aigw/mitm.yaml", "--store", "/var/lib/aigw/store", \
            "proxy", "--listen-host", "0.0.0.0", "--listen-port", "8080", \
            "--set", "confdir=/var/lib/aigw/ca"]
