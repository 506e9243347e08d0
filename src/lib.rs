//! captiond: caption whole photo libraries with a local Moondream2 model through a
//! durable SQLite job queue.

pub mod blobs;
pub mod queue;
pub mod vision;
pub mod workers;
