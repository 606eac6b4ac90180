# geopera-gateway: runs `geopera-gateway serve` as a non-root user.
#   docker build -t geopera-gateway .
#   docker run -p 8080:8080 -e GEOPERA_API_KEY=gpra_... \
#     -e GEOPERA_BASE_URL=https://api.geopera.com \
#     -v "$PWD/config/gateway.toml:/etc/geopera-gateway/gateway.toml:ro" \
#     -v geopera-cache:/var/cache/geopera-gateway geopera-gateway [--workers 2 ...]
# Where it listens comes from GEOPERA_HOST and GEOPERA_PORT (0.0.0.0:8080), so arguments
# after the image name (serve options) keep it; -e GEOPERA_PORT=9000 moves it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    GEOPERA_CONFIG=/etc/geopera-gateway/gateway.toml \
    GEOPERA_CACHE_DIR=/var/cache/geopera-gateway/tiles \
    GEOPERA_HOST=0.0.0.0 \
    GEOPERA_PORT=8080

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/geopera-gateway /var/cache/geopera-gateway \
 && cp gateway/defaults/gateway.toml /etc/geopera-gateway/gateway.toml \
 && chown -R gateway /var/cache/geopera-gateway \
 && rm -rf /src

USER gateway
WORKDIR /var/cache/geopera-gateway
VOLUME ["/var/cache/geopera-gateway"]
EXPOSE 8080
ENTRYPOINT ["geopera-gateway", "serve"]
