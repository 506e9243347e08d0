//! Runs the adaptive controller against the live service: reads the memory probe
//! every second, feeds readings, out-of-memory counts, backlog and throughput to the
//! [`Controller`], and sets the pool's target. Keeps a recent series for `/v1/stats`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::WorkerPool;
use super::concurrency::{Controller, ControllerConfig, Decision, Phase, Reading};
use super::vram::VramProbe;
use crate::queue::{Calibration, Store};

/// Readings kept for the stats series.
const SERIES: usize = 120;
/// Ticks between throughput samples.
const THROUGHPUT_TICKS: u32 = 10;

struct State {
    controller: Controller,
    series: VecDeque<(f64, Reading)>,
    last: Option<Reading>,
}

/// Handle to the running governor.
#[derive(Clone)]
pub struct Governor {
    state: Arc<Mutex<State>>,
    probe_name: &'static str,
    gpu: bool,
    started: Instant,
    calibration: Option<Calibration>,
}

/// What `/v1/stats` shows of the controller.
#[derive(Debug, Clone, Serialize)]
pub struct GovernorSnapshot {
    /// Probe in use (`nvml`, `host`, `scripted`).
    pub probe: &'static str,
    /// Whether it measures GPU memory.
    pub gpu: bool,
    /// `normal` or `frozen`.
    pub phase: Phase,
    /// Current target.
    pub target: usize,
    /// Current ceiling.
    pub ceiling: usize,
    /// Smoothed used share (0..1).
    pub smoothed_used: Option<f64>,
    /// Latest reading.
    pub last: Option<Reading>,
    /// Recent decisions with reasons, oldest first.
    pub decisions: Vec<Decision>,
    /// Recent readings: seconds since start and MiB used/total.
    pub series: Vec<SeriesPoint>,
    /// The warm-up calibration in force, if any.
    pub calibration: Option<Calibration>,
}

/// One point of the memory series.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SeriesPoint {
    /// Seconds since start.
    pub t: f64,
    /// MiB in use.
    pub used_mib: u64,
    /// MiB in total.
    pub total_mib: u64,
}

fn mib(b: u64) -> u64 {
    b / (1 << 20)
}

impl Governor {
    /// Starts the control loop; it stops when the pool's process ends.
    pub fn spawn(
        pool: WorkerPool,
        store: Store,
        probe: Box<dyn VramProbe>,
        cfg: ControllerConfig,
        calibration: Option<Calibration>,
        interval: Duration,
    ) -> Governor {
        let initial = pool.stats().target;
        let governor = Governor {
            state: Arc::new(Mutex::new(State {
                controller: Controller::new(cfg, initial),
                series: VecDeque::with_capacity(SERIES),
                last: None,
            })),
            probe_name: probe.name(),
            gpu: probe.is_gpu(),
            started: Instant::now(),
            calibration,
        };
        let g = governor.clone();
        tokio::spawn(async move { g.run(pool, store, probe, interval).await });
        governor
    }

    async fn run(
        self,
        pool: WorkerPool,
        store: Store,
        probe: Box<dyn VramProbe>,
        interval: Duration,
    ) {
        let mut seen_oom = pool.stats().out_of_memory;
        let mut window_start = (Instant::now(), pool.stats().completed);
        let mut ticks = 0u32;
        loop {
            tokio::time::sleep(interval).await;
            let stats = pool.stats();
            let reading = probe.read();
            let backlog = if stats.busy > 0 {
                store.due_count().await.unwrap_or(0).max(0) as usize
            } else {
                0
            };
            ticks += 1;
            let now = self.started.elapsed();
            let (target, blocked) = {
                let mut st = self.lock();
                // One controller event per OOM (a burst of many counts as a few).
                for _ in 0..stats.out_of_memory.saturating_sub(seen_oom).min(3) {
                    st.controller.on_oom(now);
                }
                seen_oom = stats.out_of_memory;
                if ticks.is_multiple_of(THROUGHPUT_TICKS) {
                    let secs = window_start.0.elapsed().as_secs_f64();
                    let done = stats.completed.saturating_sub(window_start.1);
                    if stats.busy > 0 || done > 0 {
                        st.controller.on_throughput(done as f64 / secs.max(0.001));
                    }
                    window_start = (Instant::now(), stats.completed);
                }
                if let Some(r) = reading {
                    st.controller.on_reading(now, &r, backlog);
                    if st.series.len() == SERIES {
                        st.series.pop_front();
                    }
                    st.series.push_back((now.as_secs_f64(), r));
                    st.last = Some(r);
                }
                (st.controller.target(), st.controller.is_blocked())
            };
            if target != stats.target {
                pool.set_target(target);
            }
            if blocked != stats.vram_blocked {
                pool.set_vram_blocked(blocked);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `(used MiB, total MiB)` of the latest GPU reading, for the X-VRAM-* headers.
    pub fn vram_mib(&self) -> Option<(u64, u64)> {
        if !self.gpu {
            return None;
        }
        self.lock().last.map(|r| (mib(r.used), mib(r.total)))
    }

    /// The controller's state for `/v1/stats`.
    pub fn snapshot(&self) -> GovernorSnapshot {
        let st = self.lock();
        GovernorSnapshot {
            probe: self.probe_name,
            gpu: self.gpu,
            phase: st.controller.phase(self.started.elapsed()),
            target: st.controller.target(),
            ceiling: st.controller.ceiling(),
            smoothed_used: st.controller.smoothed(),
            last: st.last,
            decisions: st.controller.history().cloned().collect(),
            series: st
                .series
                .iter()
                .map(|(t, r)| SeriesPoint {
                    t: *t,
                    used_mib: mib(r.used),
                    total_mib: mib(r.total),
                })
                .collect(),
            calibration: self.calibration.clone(),
        }
    }
}
