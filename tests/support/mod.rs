//! Owns the shared end-to-end test support for real peers: include it from `tests/<name>.rs` with `mod support;`.
//!
//! Everything here runs on this machine only: every peer listens on an OS-chosen loopback
//! port, keeps its state in a temporary directory and is stopped by PID when its guard drops.
//!
//! - [`registry`]: a real `docker-registry serve` (distribution 2.8) with no auth, htpasswd or
//!   token auth, plus access-log counters.
//! - [`token`]: an in-process Docker-Hub-style token server issuing RS256 JWTs.
//! - [`debian`]: a debootstrapped Debian root file system of the host's release, cached as
//!   a tar, to `docker import` as the base of image builds.
//! - [`image`]: OCI image layouts generated on disk (a runnable busybox image, extra layers,
//!   multi-arch indexes) and `skopeo` push / pull / inspect helpers.
//! - [`proxy`]: regcache itself in-process, a token-auth "Docker Hub" upstream and a
//!   request-recording TCP tap.
//! - [`moto`]: the AWS side of the ECR tests: hermetic AWS environment, a `moto` server (ECR
//!   and STS APIs), relays for endpoint variables, an AWS error server, log capture.
//! - [`peers`]: `dockerd` and `containerd` guards, `hosts.toml` writer, free / dead ports and
//!   the [`peers::Skip`] mechanism for peers that cannot start here.
//! - [`fleet`]: the fleet harness: SeaweedFS and moto S3 stores, counting and gating relays,
//!   nginx round-robin and real `regcache` replicas with `[fleet]`.
//!
//! Not every test binary uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod debian;
pub mod fleet;
pub mod image;
pub mod moto;
pub mod peers;
pub mod proxy;
pub mod registry;
pub mod token;
