//! The durable queue: jobs and their state machine, the SQLite store, retry policy
//! and the wake-up signal. Knows nothing of images or models.

pub mod job;
pub mod retry;
pub mod store;

use std::sync::Arc;

use tokio::sync::{Notify, broadcast};
use uuid::Uuid;

pub use job::{ImageSource, Job, JobErrorInfo, JobResult, JobState, NewJob, TaskKind, now_ms};
pub use retry::RetryPolicy;
pub use store::{
    BatchSummary, Calibration, CancelOutcome, Durability, Finish, FinishOp, FinishOutcome,
    Heartbeat, LibraryFile, ListQuery, ResultSettings, RetryOutcome, StateCounts, Store,
    StoreError, StoreOptions,
};

/// Wakes the dispatcher right after a commit that makes work claimable (insert,
/// retry, resume, freed capacity), so pickup has no polling delay.
#[derive(Debug, Clone, Default)]
pub struct Wakeup(Arc<Notify>);

impl Wakeup {
    /// Signals that there may be work; a signal sent while nobody waits is kept.
    pub fn wake(&self) {
        self.0.notify_one();
    }

    /// Waits for the next signal.
    pub async fn wait(&self) {
        self.0.notified().await;
    }
}

/// Announces jobs that reached a terminal state (or were cancelled), so long-polls
/// and waiting requests answer at once.
#[derive(Debug, Clone)]
pub struct JobEvents(broadcast::Sender<Uuid>);

impl Default for JobEvents {
    fn default() -> Self {
        Self(broadcast::channel(1024).0)
    }
}

impl JobEvents {
    /// Announces that job `id` changed state.
    pub fn publish(&self, id: Uuid) {
        let _ = self.0.send(id);
    }

    /// Receives later announcements.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.0.subscribe()
    }
}
