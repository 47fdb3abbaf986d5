//! The incremental digest hasher, kept at this path for the cache's callers; it lives with the
//! digest grammar in [`crate::reference`], which needs it to compute digests.

pub use crate::reference::Hasher;
