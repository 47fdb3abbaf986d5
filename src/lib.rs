//! regcache: a pull-through caching proxy for container registries that fetches each digest
//! from upstream once and streams it to every client that asks while it downloads.
//!
//! # Layout
//! - [`access`]: client authentication (htpasswd/bcrypt, static bearer tokens, regcache-issued
//!   scoped tokens), pull/push permissions per upstream and repository pattern
//!   (`access::policy`), scope parsing and token signing (`access::token`) and the
//!   failed-login limit per client address (`access::limit`).
//! - [`access_log`]: one `regcache::access_log` event per request, written when its body ends,
//!   and the batched writer that puts the serving log on stdout.
//! - [`app`]: application state and `App::handle`, the request pipeline.
//! - [`server`]: accept loop, optional rustls (certificate reload), connection limits and
//!   timeouts, graceful shutdown; `server::fast`, the plain-HTTP/1.1 loop for bodiless
//!   requests (cached blobs go out with `sendfile(2)`), and `server::http1`, the HTTP/1
//!   request smuggling checks hyper does not make.
//! - [`limits`]: per-client limits (uncached blob downloads per client address).
//! - [`cli`], [`config`], [`units`]: command line, configuration file (its `[auth]` part in
//!   `config::auth`), human units.
//! - [`router`], [`reference`], [`rewrite`], [`media`], [`range`]: pure parsing of paths,
//!   names, upstream routing, `Accept` and `Range` headers.
//! - [`routes`]: one function per registry route (`routes::manifests`, `routes::blobs`,
//!   `routes::tags`), push through the proxy (`routes::push`), and `/metrics`, `/healthz`,
//!   `/readyz` and the status page (`routes::admin`).
//! - [`error`]: typed errors and the one mapping to OCI JSON responses.
//! - [`hints`]: what a 404 and the log say about a registry no upstream mirrors (`ns=`) and a
//!   one-component name on an upstream without Docker Hub naming.
//! - [`metrics`]: Prometheus metrics with bounded labels and their exposition.
//! - [`status`]: the status page's HTML and the bounded count of the most pulled repositories;
//!   [`charts`]: its inline-SVG charts of the last hour.
//! - [`body`]: the response body type.
//! - [`flight`]: request coalescing for small values (tokens, manifests).
//! - [`upstream`]: HTTP client (timeouts, retries, redirects), authentication, ECR
//!   credentials (`upstream::ecr`), push requests (`upstream::push`), each upstream's
//!   figures and health (`upstream::stats`), why an exchange got no answer
//!   (`upstream::cause`) and the probes that bring an unwell upstream's health back
//!   (`upstream::probe`).
//! - [`healthcheck`]: `regcache healthcheck`, a `GET /healthz` to the configured listener.
//! - [`history`]: the last hour of traffic in fixed per-10-s samples, for the status page's
//!   charts.
//! - [`inspect`]: `regcache ls` / `regcache stats`, read from the cache folder alone.
//! - [`cache`]: storage interface and filesystem backend, the disk budget (LRU eviction),
//!   blob single flight, download task, readers of growing files (falling back to the
//!   upstream when the disk cannot take a blob), tag answers, tag records left without a
//!   manifest (`cache::dangling`) and the advisory locks between a server and the commands
//!   (`cache::lock`).
//! - [`airgap`]: air-gapped farms: `prefetch` (warm a cache through the serving code),
//!   `export` (cached images to an OCI layout, directory or tar), `import` (a layout into a
//!   cache, every digest verified).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod access_log;
pub mod airgap;
pub mod app;
pub mod body;
pub mod cache;
pub mod charts;
pub mod cli;
pub mod config;
pub mod error;
pub mod fleet;
pub mod flight;
pub mod healthcheck;
pub mod hints;
pub mod history;
pub mod inspect;
pub mod limits;
pub mod media;
pub mod metrics;
pub mod range;
pub mod reference;
pub mod rewrite;
pub mod router;
pub mod routes;
pub mod server;
pub mod status;
pub mod units;
pub mod upstream;
