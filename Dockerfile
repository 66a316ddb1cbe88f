# openrouter-proxy: slim, non-root, config mounted from outside.
#   docker build -t openrouter-proxy .
#   docker run -p 8080:8080 -e OPENROUTER_API_KEY -v "$PWD/config.yaml:/etc/orproxy/config.yaml:ro" openrouter-proxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs: the image changes when the code does, not when tests or docs do.
WORKDIR /tmp/build
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && rm -rf /tmp/build

# Relative data paths resolve against the config's folder: data/ledger.sqlite3 of the mounted
# /etc/orproxy/config.yaml is /etc/orproxy/data, a link to the volume's /var/lib/orproxy/data. The
# directory exists and is owned by the user before the volume is mounted, so a named volume inherits it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/orproxy --shell /usr/sbin/nologin orproxy \
    && mkdir -p /var/lib/orproxy/data /etc/orproxy \
    && ln -s /var/lib/orproxy/data /etc/orproxy/data \
    && chown -R orproxy:orproxy /var/lib/orproxy
WORKDIR /var/lib/orproxy
USER orproxy
VOLUME ["/var/lib/orproxy/data"]
EXPOSE 8080

# No curl in slim images: ask /healthz with the standard library.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]

# The config is not baked in: mount it at /etc/orproxy/config.yaml. Upstream keys come from the
# environment variables the config names (e.g. OPENROUTER_API_KEY).
ENTRYPOINT ["orproxy"]
CMD ["serve", "--config", "/etc/orproxy/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
