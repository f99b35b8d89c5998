# sdserve, CPU build. Multi-stage: compile in the Rust image, run in a slim Debian image as a
# non-root user. The model (a hub id or a mounted diffusers folder) is cached on a volume.
#
#   docker build -t sdserve .
#   docker run -p 8000:8000 -v sdserve-models:/models sdserve
#   docker run -p 8000:8000 -v $PWD/my-model:/model:ro -e MODEL_ID=/model sdserve

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
# Cache mounts keep the registry and target between builds (BuildKit); the binary is copied out
# of the cached target dir so the next stage can see it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sdserve \
 && cp target/release/sdserve /usr/local/bin/sdserve \
 && strip /usr/local/bin/sdserve

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /models --shell /usr/sbin/nologin sdserve \
 && mkdir -p /models \
 && chown sdserve /models
COPY --from=build /usr/local/bin/sdserve /usr/local/bin/sdserve
ENV HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_CACHE_DIR=/models \
    HF_HOME=/models \
    LOG_FORMAT=json \
    DEVICE=cpu
VOLUME ["/models"]
USER sdserve
EXPOSE 8000
# /health is 200 only once the model is loaded (the first start may download it: long start period).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PORT} && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
# SIGTERM drains: the running generation finishes (up to SHUTDOWN_GRACE_SECONDS), queued ones get 503.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sdserve"]
CMD ["serve"]
