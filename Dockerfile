# regcache container image: the regcache binary and the few shared libraries it loads on an
# otherwise empty image (no shell, no package manager, no curl), running as the unprivileged
# user 10001, serving the registry API on port 5000, with the cache in the
# /var/cache/regcache volume.
#
# Built from a binary compiled first (on the host, or in a Rust container: see the README):
#
#   cargo build --release --locked
#   docker build -t regcache .
#
# Works with the classic builder (Debian's docker.io, no buildx) and with BuildKit. Nothing
# is compiled or downloaded: RUNTIME_IMAGE only lends its dynamic loader and C libraries,
# and must already be in the daemon or be pullable. Offline, load it first:
# `docker load -i debian-bookworm-slim.tar` (saved elsewhere with `docker save`), or make one
# with debootstrap and `docker import` (see the README).
#
# Build arguments:
#   RUNTIME_IMAGE  a Debian-like image whose glibc is at least the one the binary was built
#                  against (the same Debian release or newer; default debian:bookworm-slim),
#                  with ldd and chroot (any Debian image has them).
#   BINARY         the binary in the build context (default target/release/regcache;
#                  .dockerignore lets only that file of target/ in).
#
# Running it: docker run -p 5000:5000 -v regcache-data:/var/cache/regcache regcache
#   Without a configuration regcache serves its embedded default (Docker Hub upstream).
#   Mount a config file and name it with REGCACHE_CONFIG (read by the server and by the
#   health check alike). REGCACHE_CACHE_DIR is set to the volume and overrides a config
#   file's `cache_dir`.

ARG RUNTIME_IMAGE=debian:bookworm-slim

# The image's files, gathered in /rootfs: the binary, every shared library ldd says it
# loads (the loader, libc, libm, libgcc_s), and a passwd entry for the user. A chroot run
# of `regcache --version` proves the set is complete before anything is copied out.
FROM ${RUNTIME_IMAGE} AS rootfs
ARG BINARY=target/release/regcache
COPY ${BINARY} /rootfs/usr/local/bin/regcache
RUN set -eu; \
    libs=$(ldd /rootfs/usr/local/bin/regcache | grep -o '/[^ ]*'); \
    for lib in $libs; do cp --parents --dereference "$lib" /rootfs/; done; \
    mkdir -p /rootfs/etc/regcache /cache/regcache; \
    printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nregcache:x:10001:10001::/nonexistent:/usr/sbin/nologin\n' > /rootfs/etc/passwd; \
    printf 'root:x:0:\nregcache:x:10001:\n' > /rootfs/etc/group; \
    chmod 0750 /cache/regcache; \
    chroot /rootfs /usr/local/bin/regcache --version

# The runtime image: only what was gathered above.
FROM scratch AS runtime
COPY --from=rootfs /rootfs/ /
# The cache directory, owned by the user (a new named volume takes over its owner).
COPY --from=rootfs --chown=10001:10001 /cache/ /var/cache/
ENV REGCACHE_CACHE_DIR=/var/cache/regcache
VOLUME ["/var/cache/regcache"]
EXPOSE 5000
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
# `regcache healthcheck` reads the same configuration as the server (REGCACHE_CONFIG,
# REGCACHE_LISTEN) and asks GET /healthz on admin_listen when set, else on listen (over TLS
# when [tls] is set).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/regcache", "healthcheck", "--timeout", "4s"]
ENTRYPOINT ["/usr/local/bin/regcache"]
