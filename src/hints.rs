//! Hints for the configuration mistakes a first mirror of a registry that is not Docker Hub
//! runs into: a registry containerd names with `?ns=` that no upstream lists, and a
//! one-component name (`alpine`) asked of an upstream without Docker Hub's `library/` rule.
//! Each hint goes into the 404's detail; the `ns=` one is also logged, once per registry.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::error::{Error, Kind, UpstreamError};
use crate::reference::Repository;

/// Most registries remembered as already warned about: a client could send any `ns=`.
const MAX_WARNED: usize = 256;

/// Registries already warned about. Held only to look up and insert, never across an
/// `.await`.
static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The 404 detail for `?ns=<ns>` that no upstream mirrors.
pub fn unknown_namespace(ns: &str) -> String {
    let hub = crate::config::DOCKER_HUB_HOSTS.contains(&ns);
    let or_hub = if hub {
        " (or docker_hub = true, which adds Docker Hub's names)"
    } else {
        ""
    };
    format!(
        "ns={ns}: no upstream mirrors this registry; add \"{ns}\" to registry_hosts of the \
         [[upstream]] that does{or_hub}, or add an [[upstream]] for it"
    )
}

/// Whether `ns` is met for the first time (and fewer than [`MAX_WARNED`] were before).
fn first_time(ns: &str) -> bool {
    let mut warned = crate::flight::lock(&WARNED);
    let set = warned.get_or_insert_with(HashSet::new);
    set.len() < MAX_WARNED && set.insert(ns.to_owned())
}

/// Logs the `ns=` hint at warning level the first time a registry is met.
pub fn warn_unknown_namespace(ns: &str) {
    if first_time(ns) {
        tracing::warn!(
            ns,
            hint = %unknown_namespace(ns),
            "containerd asked for a registry no upstream mirrors"
        );
    }
}

/// A manifest 404 for a one-component name from an upstream without Docker Hub naming
/// gets a detail suggesting `docker_hub = true`; any other error is returned as it is.
pub fn one_component_name(
    e: Error,
    upstream: &str,
    repository: &Repository,
    docker_hub: bool,
) -> Error {
    let missed = matches!(
        e,
        Error::Upstream(Kind::Manifest, UpstreamError::Status(404)) | Error::ManifestUnknown
    );
    if !missed || docker_hub || repository.as_str().contains('/') {
        return e;
    }
    let hint = format!(
        "upstream {upstream} has no {repository}; if it keeps Docker Hub's names \
         (library/{repository}), set docker_hub = true on it so one-component names are \
         looked up under library/"
    );
    Error::Hinted(Box::new(e), hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_key_to_set() {
        let h = unknown_namespace("ghcr.io");
        assert!(h.contains("add \"ghcr.io\" to registry_hosts"), "{h}");
        assert!(!h.contains("docker_hub"), "{h}");
        assert!(unknown_namespace("docker.io").contains("docker_hub = true"));

        let alpine: Repository = "alpine".parse().unwrap();
        let miss = || Error::Upstream(Kind::Manifest, UpstreamError::Status(404));
        let e = one_component_name(miss(), "mine", &alpine, false);
        assert!(
            matches!(&e, Error::Hinted(_, h) if h.contains("docker_hub = true")),
            "{e:?}"
        );
        assert_eq!(e.status(), 404);
        for (name, hub) in [("alpine", true), ("team/app", false)] {
            let r: Repository = name.parse().unwrap();
            assert!(matches!(
                one_component_name(miss(), "mine", &r, hub),
                Error::Upstream(..)
            ));
        }
        let other = Error::Upstream(Kind::Manifest, UpstreamError::Status(500));
        assert!(matches!(
            one_component_name(other, "mine", &alpine, false),
            Error::Upstream(..)
        ));
    }

    #[test]
    fn each_registry_is_warned_about_once() {
        assert!(first_time("once.hints.test"));
        assert!(!first_time("once.hints.test"));
        assert!(first_time("other.hints.test"));
    }
}
