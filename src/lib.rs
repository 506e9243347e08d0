//! captiond: caption whole photo libraries with a local Moondream2 model through a
//! durable SQLite job queue.
//!
//! Data flows one way: HTTP or CLI → [`queue`] → [`workers`] → [`vision`] → queue.
//! The queue never imports vision; vision never imports the queue; the worker's
//! caption handler is the only place they meet.

#![warn(missing_docs)]

pub mod api;
pub mod app;
pub mod blobs;
pub mod config;
pub mod failpoint;
pub mod library;
pub mod queue;
pub mod vision;
pub mod workers;

pub use app::{App, Engine, Settings, StopReason};
