//! Crash-test failpoints: with `CAPTIOND_FAILPOINT=<name>` the process kills itself
//! with SIGKILL right after the named state transition commits, so the reliability
//! suite can show that a restart recovers from a crash at every kind of write.
//! Names: claim, heartbeat, complete, fail, retry, cancel. Unset in normal use.

use std::sync::OnceLock;

/// The transitions a failpoint can follow.
pub const NAMES: &[&str] = &["claim", "heartbeat", "complete", "fail", "retry", "cancel"];

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("CAPTIOND_FAILPOINT")
                .ok()
                .filter(|v| NAMES.contains(&v.as_str()))
        })
        .as_deref()
}

/// Called right after the commit of transition `name`: dies when it is armed.
pub fn hit(name: &str) {
    if armed() == Some(name) {
        eprintln!("failpoint {name}: killing the process (SIGKILL) after the commit");
        // SAFETY: sends a signal to this very process; nothing is shared or freed.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
