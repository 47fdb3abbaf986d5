# Multi-stage build: compile in the official Rust image, run on a slim Debian base as an
# unprivileged user. The cache lives in the /var/lib/regcache volume.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY config config
RUN cargo build --release --locked --bin regcache

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/regcache --create-home regcache
COPY --from=build /src/target/release/regcache /usr/local/bin/regcache
COPY config/regcache.toml /etc/regcache/regcache.toml
ENV REGCACHE_CACHE_DIR=/var/lib/regcache
USER regcache
VOLUME ["/var/lib/regcache"]
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/regcache"]
CMD ["--config", "/etc/regcache/regcache.toml"]
