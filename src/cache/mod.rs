//! The disk cache: the storage interface and its filesystem backend with its on-disk layout
//! and size budget, blob single flight, the detached download task, readers that follow a
//! growing file, and tag answers.

pub mod budget;
pub mod fill;
pub mod hasher;
pub mod inflight;
pub mod layout;
pub mod reader;
pub mod store;
pub mod tags;
pub mod tail;
