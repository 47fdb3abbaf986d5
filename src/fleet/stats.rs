//! The fleet's figures: object-store requests by operation, store and peer bytes, lease
//! outcomes and the store's health, kept in atomics that the metrics exposition and the
//! status page read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// An object-store request, as counted in `regcache_fleet_store_requests_total{op}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A GET (whole or ranged).
    Get,
    /// A HEAD.
    Head,
    /// An unconditional PUT.
    Put,
    /// A create-only PUT (`If-None-Match: *`).
    PutCreate,
    /// A compare-and-swap PUT (`If-Match`).
    PutUpdate,
    /// A DELETE.
    Delete,
    /// One request of a multipart upload (create, part, complete or abort).
    Multipart,
    /// A LIST.
    List,
}

impl Op {
    /// Every operation, in label order.
    pub const ALL: [Op; 8] = [
        Op::Get,
        Op::Head,
        Op::Put,
        Op::PutCreate,
        Op::PutUpdate,
        Op::Delete,
        Op::Multipart,
        Op::List,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Head => "head",
            Op::Put => "put",
            Op::PutCreate => "put_create",
            Op::PutUpdate => "put_update",
            Op::Delete => "delete",
            Op::Multipart => "multipart",
            Op::List => "list",
        }
    }
}

/// How a replica came to a download's lease, as counted in
/// `regcache_fleet_leases_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseResult {
    /// Created the lease: this replica fetches from the upstream.
    Won,
    /// Found another replica's lease: this replica streams from it.
    Followed,
    /// Swapped a stale lease: this replica took the download over.
    TakenOver,
    /// A renewal was refused: another replica took the download over.
    RenewalRefused,
}

impl LeaseResult {
    /// Every result, in label order.
    pub const ALL: [LeaseResult; 4] = [
        LeaseResult::Won,
        LeaseResult::Followed,
        LeaseResult::TakenOver,
        LeaseResult::RenewalRefused,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LeaseResult::Won => "won",
            LeaseResult::Followed => "followed",
            LeaseResult::TakenOver => "taken_over",
            LeaseResult::RenewalRefused => "renewal_refused",
        }
    }
}

/// The counters of one replica's fleet work. Relaxed atomics: each is an independent count.
#[derive(Debug, Default)]
pub struct FleetStats {
    requests: [AtomicU64; 8],
    store_read: AtomicU64,
    store_written: AtomicU64,
    peer_served: AtomicU64,
    peer_received: AtomicU64,
    leases: [AtomicU64; 4],
    store_up: AtomicBool,
    // Whether `store_up` has been set once: the first state is a transition too.
    known: AtomicBool,
    degraded: AtomicU64,
}

impl FleetStats {
    /// Counts one store request.
    pub fn request(&self, op: Op) {
        self.requests[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Store requests made with `op`.
    pub fn requests(&self, op: Op) -> u64 {
        self.requests[op as usize].load(Ordering::Relaxed)
    }

    /// Store requests of every operation.
    pub fn requests_total(&self) -> u64 {
        Op::ALL.iter().map(|o| self.requests(*o)).sum()
    }

    /// Counts bytes read from the store.
    pub fn store_read(&self, n: u64) {
        self.store_read.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes written to the store.
    pub fn store_written(&self, n: u64) {
        self.store_written.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes read from and written to the store.
    pub fn store_bytes(&self) -> (u64, u64) {
        (
            self.store_read.load(Ordering::Relaxed),
            self.store_written.load(Ordering::Relaxed),
        )
    }

    /// Counts blob bytes sent to another replica.
    pub fn peer_served(&self, n: u64) {
        self.peer_served.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts blob bytes received from another replica.
    pub fn peer_received(&self, n: u64) {
        self.peer_received.fetch_add(n, Ordering::Relaxed);
    }

    /// Blob bytes sent to and received from other replicas.
    pub fn peer_bytes(&self) -> (u64, u64) {
        (
            self.peer_served.load(Ordering::Relaxed),
            self.peer_received.load(Ordering::Relaxed),
        )
    }

    /// Counts a lease outcome.
    pub fn lease(&self, r: LeaseResult) {
        self.leases[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Lease outcomes of kind `r`.
    pub fn leases(&self, r: LeaseResult) -> u64 {
        self.leases[r as usize].load(Ordering::Relaxed)
    }

    /// Whether the store answered the last request made to it.
    pub fn store_up(&self) -> bool {
        self.store_up.load(Ordering::Relaxed)
    }

    /// Times the fleet went into degraded mode (store unreachable).
    pub fn degraded_transitions(&self) -> u64 {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Records the store's reachability; true when it changed (or was first set). Going
    /// down counts a transition into degraded mode.
    pub(super) fn set_store_up(&self, up: bool) -> bool {
        let first = !self.known.swap(true, Ordering::Relaxed);
        let was = self.store_up.swap(up, Ordering::Relaxed);
        let changed = first || was != up;
        if changed && !up {
            self.degraded.fetch_add(1, Ordering::Relaxed);
        }
        changed
    }
}
