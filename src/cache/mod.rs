//! The disk cache: the storage interface and its filesystem backend with its on-disk layout
//! and size budget, blob single flight, the detached download task, readers that follow a
//! growing file, tag answers, the removal of tag records whose manifest is gone, and the
//! advisory locks that keep commands from disturbing a server using the same folder.

pub mod budget;
pub mod dangling;
pub mod fill;
pub mod hasher;
pub mod inflight;
pub mod layout;
pub mod lock;
pub mod reader;
pub mod source;
pub mod store;
pub mod tags;
pub mod tail;
