# regcache container image: a small image running as an unprivileged user (uid 10001),
# serving the registry API on port 5000, with the cache in the /var/cache/regcache volume.
#
# Two ways to build it (BuildKit, the default builder since Docker 23; set DOCKER_BUILDKIT=1
# on older versions):
#
#   docker build -t regcache .
#       The whole multi-stage build: compiles regcache in BUILDER_IMAGE (needs network for
#       crates.io and the base images), then copies the binary into the runtime stage.
#
#   cargo build --release --locked
#   docker build --target runtime -t regcache .
#       The runtime stage alone, from a binary built on the host: nothing is compiled or
#       downloaded besides RUNTIME_IMAGE. BINARY is the binary's path inside the build context
#       (default target/release/regcache; .dockerignore lets only that file of target/ in).
#       The stages are ordered so that even the classic builder, which builds every stage up
#       to the target, never touches BUILDER_IMAGE for this target.
#
# Build arguments:
#   BUILDER_IMAGE  Rust toolchain image for the full build (default rust:1-bookworm).
#   RUNTIME_IMAGE  base of the final image (default debian:bookworm-slim). regcache links
#                  against glibc: use a Debian-like image whose glibc is at least the one the
#                  binary was built against (same Debian release), with bash (health check)
#                  and useradd.
#   BINARY         runtime target only: the binary in the build context.
#
# Running it: docker run -p 5000:5000 -v regcache-data:/var/cache/regcache regcache
#   Without arguments regcache serves its embedded default (Docker Hub upstream). Mount a
#   config file and pass `--config /etc/regcache/regcache.toml`, or set REGCACHE_CONFIG.
#   REGCACHE_CACHE_DIR is set to the volume and overrides a config file's `cache_dir`.

ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# Everything of the runtime image but the binary; both targets below finish it.
FROM ${RUNTIME_IMAGE} AS base
RUN groupadd --gid 10001 regcache \
 && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
      --home-dir /nonexistent --shell /usr/sbin/nologin regcache \
 && mkdir -p /etc/regcache /var/cache/regcache \
 && chown regcache:regcache /var/cache/regcache \
 && chmod 0750 /var/cache/regcache
ENV REGCACHE_CACHE_DIR=/var/cache/regcache
VOLUME ["/var/cache/regcache"]
EXPOSE 5000
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
# No curl or wget in the image: bash's /dev/tcp sends the request. The port is the one of
# REGCACHE_LISTEN when set, else regcache's default 5000. Plain HTTP only: with [tls]
# configured, replace this check (docker run --health-cmd ..., or a probe in your orchestrator).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "port=${REGCACHE_LISTEN##*:}; exec 3<>/dev/tcp/127.0.0.1/${port:-5000} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r _ status _ <&3 && [ \"$status\" = 200 ]"]
ENTRYPOINT ["/usr/local/bin/regcache"]

# Runtime image from a host-built binary: docker build --target runtime.
FROM base AS runtime
ARG BINARY=target/release/regcache
COPY ${BINARY} /usr/local/bin/regcache

# The full build compiles here.
FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY config config
RUN cargo build --release --locked --bin regcache

# The default target: the runtime image with the binary compiled above.
FROM base AS image
COPY --from=build /src/target/release/regcache /usr/local/bin/regcache
