//! The process's open-file limit: every client connection holds a descriptor, so at start
//! the soft limit is raised to the hard one (as Go's runtime and nginx's
//! `worker_rlimit_nofile` do; systemd's default soft limit of 1024 is meant to be raised by
//! the services that need more), and a limit still short of `limits.max_connections` is
//! said once, naming the key.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept for what is not a client connection: cache files being read or
/// written, upstream and store connections, the log, the listeners.
pub const RESERVED: u64 = 256;

/// The open-file limit before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit found at start (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
}

impl OpenFiles {
    /// Whether `max_connections` connections and [`RESERVED`] other descriptors fit.
    pub fn fits(&self, max_connections: u32) -> bool {
        self.now
            .is_none_or(|n| n >= u64::from(max_connections) + RESERVED)
    }
}

/// The soft limit to set for `current`: the hard limit when it is higher (unlimited stays
/// unlimited). `None` when nothing is to change.
fn raised(current: &Rlimit) -> Option<Rlimit> {
    let higher = match (current.current, current.maximum) {
        (Some(soft), Some(hard)) => hard > soft,
        (Some(_), None) => true,
        (None, _) => false,
    };
    higher.then_some(Rlimit {
        current: current.maximum,
        maximum: current.maximum,
    })
}

/// Raises the soft open-file limit to the hard one; reports both. A refusal leaves the
/// limit as it was (the report says so: `before == now`).
pub fn raise() -> OpenFiles {
    let found = getrlimit(Resource::Nofile);
    let before = found.current;
    let now = match raised(&found) {
        Some(to) if setrlimit(Resource::Nofile, to).is_ok() => to.current,
        _ => before,
    };
    OpenFiles { before, now }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one_never_down() {
        let lim = |current, maximum| Rlimit { current, maximum };
        assert_eq!(
            raised(&lim(Some(1024), Some(524_288))),
            Some(lim(Some(524_288), Some(524_288)))
        );
        assert_eq!(raised(&lim(Some(1024), None)), Some(lim(None, None)));
        assert_eq!(raised(&lim(Some(4096), Some(4096))), None);
        assert_eq!(raised(&lim(None, None)), None);
    }

    #[test]
    fn connections_and_the_reserve_must_fit() {
        let files = |now| OpenFiles { before: now, now };
        assert!(files(Some(4096 + RESERVED)).fits(4096));
        assert!(!files(Some(4096)).fits(4096));
        assert!(files(None).fits(1_000_000));
    }

    #[test]
    fn raising_in_this_process_leaves_soft_equal_to_a_finite_hard_limit() {
        let files = raise();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(files.now, after.current);
        if after.maximum.is_some() {
            assert_eq!(after.current, after.maximum, "{files:?}");
        }
    }
}
