//! The adaptive concurrency controller: a pure state machine that turns memory
//! readings, out-of-memory events and backlog into a target number of concurrent
//! generations. No clocks, no I/O: time comes in with each call, so traces replay
//! exactly in tests.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

/// Thresholds and timings; every one is a setting.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerConfig {
    /// Fewest concurrent generations.
    pub min: usize,
    /// Most concurrent generations (settings, or calibration).
    pub max: usize,
    /// Used share at or above which the target halves at once (raw reading).
    pub high_watermark: f64,
    /// Smoothed used share from which the target shrinks by a quarter.
    pub elevated_watermark: f64,
    /// Smoothed used share below which a window counts as calm.
    pub calm_watermark: f64,
    /// Consecutive calm windows before growing by one.
    pub calm_windows: u32,
    /// Least time between two quarter shrinks.
    pub shrink_interval: Duration,
    /// Least time between two increases.
    pub grow_cooldown: Duration,
    /// First freeze of increases after an OOM or a high reading; doubles on repeats.
    pub freeze: Duration,
    /// Longest freeze.
    pub max_freeze: Duration,
    /// Weight of a new reading in the exponential moving average (0..1].
    pub smoothing: f64,
    /// Relative throughput gain a step up must bring to keep growing.
    pub min_gain: f64,
    /// First pause of claiming after repeated OOMs at the minimum; doubles on repeats.
    pub block: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            min: 1,
            max: 8,
            high_watermark: 0.95,
            elevated_watermark: 0.90,
            calm_watermark: 0.80,
            calm_windows: 3,
            shrink_interval: Duration::from_secs(5),
            grow_cooldown: Duration::from_secs(10),
            freeze: Duration::from_secs(30),
            max_freeze: Duration::from_secs(600),
            smoothing: 0.3,
            min_gain: 0.05,
            block: Duration::from_secs(10),
        }
    }
}

/// One memory reading, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reading {
    /// Total memory of the device.
    pub total: u64,
    /// Memory in use by everyone.
    pub used: u64,
    /// Memory free.
    pub free: u64,
    /// captiond's own share, when known.
    pub own: Option<u64>,
}

impl Reading {
    /// Used share of the total, 0..1.
    pub fn used_share(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.used as f64 / self.total as f64
        }
    }
}

/// A change of target and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Controller time of the decision, seconds.
    pub at_seconds: f64,
    /// Target before.
    pub from: usize,
    /// Target after.
    pub to: usize,
    /// Ceiling after.
    pub ceiling: usize,
    /// Why.
    pub reason: String,
}

/// Controller state for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Free to grow.
    Normal,
    /// Increases frozen after pressure or an OOM.
    Frozen,
    /// Out of memory even at the minimum: claiming paused until memory frees.
    VramBlocked,
}

/// The controller.
#[derive(Debug, Clone)]
pub struct Controller {
    cfg: ControllerConfig,
    target: usize,
    ceiling: usize,
    smoothed: Option<f64>,
    calm: u32,
    last_shrink: Option<Duration>,
    last_grow: Option<Duration>,
    frozen_until: Duration,
    freeze: Duration,
    last_pressure: Option<Duration>,
    throughput: Vec<Option<f64>>,
    history: VecDeque<Decision>,
    ooms_at_min: u32,
    blocked_until: Option<Duration>,
    block: Duration,
}

const HISTORY: usize = 64;

impl Controller {
    /// Starts at `initial` (clamped to the bounds).
    pub fn new(cfg: ControllerConfig, initial: usize) -> Self {
        let max = cfg.max.max(cfg.min.max(1));
        let min = cfg.min.max(1);
        Self {
            target: initial.clamp(min, max),
            ceiling: max,
            smoothed: None,
            calm: 0,
            last_shrink: None,
            last_grow: None,
            frozen_until: Duration::ZERO,
            freeze: cfg.freeze,
            last_pressure: None,
            throughput: vec![None; max + 1],
            history: VecDeque::new(),
            ooms_at_min: 0,
            blocked_until: None,
            block: cfg.block,
            cfg: ControllerConfig { min, max, ..cfg },
        }
    }

    /// Current target.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Current ceiling (at most `max`; lowered by failures and plateaus).
    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// Smoothed used share, once a reading arrived.
    pub fn smoothed(&self) -> Option<f64> {
        self.smoothed
    }

    /// Whether increases are frozen at `now`.
    pub fn phase(&self, now: Duration) -> Phase {
        if self.blocked_until.is_some() {
            Phase::VramBlocked
        } else if now < self.frozen_until {
            Phase::Frozen
        } else {
            Phase::Normal
        }
    }

    /// Whether claiming must pause: repeated OOMs at the minimum, until the backoff has
    /// passed and memory has freed (smoothed use below the elevated watermark).
    pub fn is_blocked(&self) -> bool {
        self.blocked_until.is_some()
    }

    fn record(&mut self, now: Duration, reason: String) {
        tracing::warn!(%reason, "concurrency controller");
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Decision {
            at_seconds: now.as_secs_f64(),
            from: self.target,
            to: self.target,
            ceiling: self.ceiling,
            reason,
        });
    }

    /// Recent decisions, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Decision> {
        self.history.iter()
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    fn decide(&mut self, now: Duration, to: usize, reason: String) {
        let to = to.clamp(self.cfg.min, self.ceiling.max(self.cfg.min));
        if to == self.target {
            return;
        }
        tracing::info!(from = self.target, to, ceiling = self.ceiling, reason = %reason, "concurrency target changed");
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Decision {
            at_seconds: now.as_secs_f64(),
            from: self.target,
            to,
            ceiling: self.ceiling,
            reason,
        });
        self.target = to;
    }

    /// Halves, caps the ceiling below the failing level and freezes increases; the
    /// freeze doubles when pressure repeats before the previous one ended long ago.
    fn back_off(&mut self, now: Duration, why: &str) {
        let failed_at = self.target;
        let repeated = self
            .last_pressure
            .is_some_and(|t| now.saturating_sub(t) < self.freeze * 2);
        self.freeze = if repeated {
            (self.freeze * 2).min(self.cfg.max_freeze)
        } else {
            self.cfg.freeze
        };
        self.last_pressure = Some(now);
        self.frozen_until = now + self.freeze;
        self.ceiling = failed_at.saturating_sub(1).max(self.cfg.min);
        self.calm = 0;
        let reason = format!(
            "{why}: halve, ceiling {} (below the failing level {failed_at}), freeze {:.0} s",
            self.ceiling,
            self.freeze.as_secs_f64()
        );
        self.decide(now, (failed_at / 2).max(self.cfg.min), reason);
        self.last_shrink = Some(now);
    }

    /// An out-of-memory error happened at `now`. Repeated at the minimum, it blocks
    /// claiming for a backoff that doubles on each repeat.
    pub fn on_oom(&mut self, now: Duration) -> usize {
        if self.target == self.cfg.min {
            self.ooms_at_min += 1;
            if self.ooms_at_min >= 2 {
                let pause = self.block;
                self.block = (self.block * 2).min(self.cfg.max_freeze);
                self.blocked_until = Some(now + pause);
                self.record(now, format!("out of memory again at concurrency {}: vram_blocked, claiming paused for {:.0} s and until memory frees", self.cfg.min, pause.as_secs_f64()));
            }
        } else {
            self.ooms_at_min = 0;
        }
        self.back_off(now, "out of memory");
        self.target
    }

    /// Records throughput (jobs/s) observed at the current target.
    pub fn on_throughput(&mut self, jobs_per_second: f64) {
        if let Some(slot) = self.throughput.get_mut(self.target) {
            *slot = Some(jobs_per_second);
        }
    }

    /// A memory reading at `now` with `backlog` runnable jobs waiting.
    pub fn on_reading(&mut self, now: Duration, reading: &Reading, backlog: usize) -> usize {
        let raw = reading.used_share();
        let smoothed = match self.smoothed {
            None => raw,
            Some(s) => s + self.cfg.smoothing * (raw - s),
        };
        self.smoothed = Some(smoothed);
        if let Some(until) = self.blocked_until
            && now >= until
            && smoothed.max(raw) < self.cfg.elevated_watermark
        {
            self.blocked_until = None;
            self.ooms_at_min = 0;
            self.record(
                now,
                format!(
                    "memory freed ({:.0}% used): vram_blocked lifted, claiming resumes",
                    smoothed * 100.0
                ),
            );
        }
        if raw >= self.cfg.high_watermark {
            self.back_off(
                now,
                &format!(
                    "memory {:.0}% ≥ high watermark {:.0}%",
                    raw * 100.0,
                    self.cfg.high_watermark * 100.0
                ),
            );
            return self.target;
        }
        if smoothed >= self.cfg.elevated_watermark {
            self.calm = 0;
            let due = self
                .last_shrink
                .is_none_or(|t| now.saturating_sub(t) >= self.cfg.shrink_interval);
            if due && self.target > self.cfg.min {
                self.last_shrink = Some(now);
                let step = (self.target / 4).max(1);
                let reason = format!(
                    "memory {:.0}% (smoothed) ≥ elevated watermark {:.0}%: shrink by a quarter",
                    smoothed * 100.0,
                    self.cfg.elevated_watermark * 100.0
                );
                self.decide(now, self.target - step, reason);
            }
            return self.target;
        }
        if smoothed >= self.cfg.calm_watermark {
            self.calm = 0;
            return self.target;
        }
        self.calm += 1;
        self.maybe_grow(now, smoothed, backlog);
        self.target
    }

    fn maybe_grow(&mut self, now: Duration, smoothed: f64, backlog: usize) {
        if self.calm < self.cfg.calm_windows || backlog < self.target || now < self.frozen_until {
            return;
        }
        if self
            .last_grow
            .is_some_and(|t| now.saturating_sub(t) < self.cfg.grow_cooldown)
        {
            return;
        }
        // Relax an old failure ceiling after a long calm, one step at a time.
        if self.target >= self.ceiling
            && self.ceiling < self.cfg.max
            && self.calm >= self.cfg.calm_windows * 4
        {
            self.ceiling += 1;
            self.calm = self.cfg.calm_windows;
        }
        if self.target >= self.ceiling {
            return;
        }
        let here = self.throughput.get(self.target).copied().flatten();
        let below = self
            .target
            .checked_sub(1)
            .and_then(|t| self.throughput.get(t).copied().flatten());
        if let (Some(here), Some(below)) = (here, below)
            && here < below * (1.0 + self.cfg.min_gain)
        {
            self.ceiling = self.target;
            let reason = format!(
                "throughput plateau ({here:.2} jobs/s at {} vs {below:.2} at {}): stop growing",
                self.target,
                self.target - 1
            );
            tracing::info!(%reason, "concurrency ceiling set");
            return;
        }
        self.last_grow = Some(now);
        let calm_windows = self.calm;
        self.calm = 0;
        let reason = format!(
            "calm ({:.0}% < {:.0}%) for {} windows with backlog {backlog}: +1",
            smoothed * 100.0,
            self.cfg.calm_watermark * 100.0,
            calm_windows
        );
        self.decide(now, self.target + 1, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn reading(share: f64) -> Reading {
        let total = 80 * GIB;
        let used = (total as f64 * share) as u64;
        Reading {
            total,
            used,
            free: total - used,
            own: None,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn cfg() -> ControllerConfig {
        ControllerConfig {
            max: 8,
            ..ControllerConfig::default()
        }
    }

    #[test]
    fn rising_foreign_usage_scales_down_within_one_decision() {
        let mut c = Controller::new(cfg(), 8);
        for t in 0..5 {
            c.on_reading(secs(t), &reading(0.70), 100);
        }
        assert_eq!(c.target(), 8);
        // Another program grabs memory: one reading above the high watermark acts at once.
        assert_eq!(c.on_reading(secs(5), &reading(0.97), 100), 4);
        assert!(
            c.history()
                .last()
                .unwrap()
                .reason
                .contains("high watermark")
        );
    }

    #[test]
    fn an_oom_burst_halves_caps_and_freezes_with_a_doubling_cool_down() {
        let mut c = Controller::new(cfg(), 8);
        assert_eq!(c.on_oom(secs(0)), 4);
        assert_eq!(c.ceiling(), 7);
        assert_eq!(c.on_oom(secs(1)), 2);
        assert_eq!(c.ceiling(), 3);
        assert_eq!(c.on_oom(secs(2)), 1);
        assert_eq!(c.on_oom(secs(3)), 1, "never below min");
        assert_eq!(
            c.phase(secs(100)),
            Phase::Frozen,
            "repeats doubled the freeze: 30→60→120→240 s"
        );
        // Calm readings with a backlog do not grow while frozen.
        for t in 4..200 {
            c.on_reading(secs(t), &reading(0.5), 100);
        }
        assert_eq!(c.target(), 1);
    }

    #[test]
    fn a_calm_backlog_scales_up_one_step_at_a_time_after_the_cool_down() {
        let mut c = Controller::new(cfg(), 1);
        let mut changes = Vec::new();
        for t in 0..60 {
            let before = c.target();
            c.on_reading(secs(t), &reading(0.40), 100);
            if c.target() != before {
                changes.push((t, before, c.target()));
            }
        }
        assert!(!changes.is_empty());
        for (i, (t, from, to)) in changes.iter().enumerate() {
            assert_eq!(to - from, 1, "one step at a time");
            if i > 0 {
                assert!(
                    t - changes[i - 1].0 >= 10,
                    "cool-down between steps: {changes:?}"
                );
            }
        }
        assert_eq!(changes[0].0, 2, "after three calm windows");
    }

    #[test]
    fn no_growth_without_a_backlog() {
        let mut c = Controller::new(cfg(), 2);
        for t in 0..100 {
            c.on_reading(secs(t), &reading(0.3), 1);
        }
        assert_eq!(c.target(), 2);
    }

    #[test]
    fn a_noisy_trace_around_85_percent_changes_the_target_a_bounded_number_of_times() {
        let mut c = Controller::new(cfg(), 4);
        let mut x: u64 = 12345;
        let mut changes = 0;
        for t in 0..3600 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let jitter = ((x >> 33) as f64 / (1u64 << 31) as f64) * 0.06 - 0.03;
            let before = c.target();
            c.on_reading(secs(t), &reading(0.85 + jitter), 100);
            changes += usize::from(c.target() != before);
        }
        assert!(changes <= 2, "{changes} changes in an hour of ±3% noise");
    }

    #[test]
    fn the_target_never_leaves_its_bounds() {
        let mut c = Controller::new(
            ControllerConfig {
                min: 2,
                max: 5,
                ..cfg()
            },
            9,
        );
        assert_eq!(c.target(), 5);
        let mut x: u64 = 7;
        for t in 0..5000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let share = (x >> 40) as f64 / (1u64 << 24) as f64;
            if x.is_multiple_of(97) {
                c.on_oom(secs(t));
            } else {
                c.on_reading(secs(t), &reading(share), (x % 10) as usize);
            }
            assert!(
                (2..=5).contains(&c.target()),
                "target {} at {t}",
                c.target()
            );
        }
    }

    #[test]
    fn elevated_pressure_shrinks_by_a_quarter_at_most_every_interval() {
        let mut c = Controller::new(cfg(), 8);
        c.on_reading(secs(0), &reading(0.92), 100);
        assert_eq!(c.target(), 6);
        c.on_reading(secs(1), &reading(0.92), 100);
        assert_eq!(c.target(), 6, "not again within the interval");
        c.on_reading(secs(5), &reading(0.92), 100);
        assert_eq!(c.target(), 5);
    }

    #[test]
    fn repeated_ooms_at_one_block_claiming_until_memory_frees() {
        let mut c = Controller::new(
            ControllerConfig {
                block: secs(10),
                ..cfg()
            },
            1,
        );
        c.on_oom(secs(0));
        assert!(!c.is_blocked(), "one OOM at 1 halves (no-op) and freezes");
        c.on_oom(secs(1));
        assert!(c.is_blocked());
        assert_eq!(c.phase(secs(2)), Phase::VramBlocked);
        c.on_reading(secs(5), &reading(0.3), 10);
        assert!(c.is_blocked(), "backoff not over");
        for t in 11..20 {
            c.on_reading(secs(t), &reading(0.97), 10);
        }
        assert!(c.is_blocked(), "memory still full");
        for t in 20..40 {
            c.on_reading(secs(t), &reading(0.3), 10);
        }
        assert!(!c.is_blocked(), "memory freed");
        c.on_oom(secs(41));
        c.on_oom(secs(42));
        assert!(c.is_blocked());
        assert!(
            c.history().last().unwrap().reason.contains("20 s"),
            "the block doubled"
        );
    }

    #[test]
    fn growth_stops_when_throughput_stops_improving() {
        let mut c = Controller::new(
            ControllerConfig {
                grow_cooldown: secs(0),
                ..cfg()
            },
            1,
        );
        let mut t = 0;
        let mut step = |c: &mut Controller, rate: f64| {
            c.on_throughput(rate);
            for _ in 0..3 {
                c.on_reading(secs(t), &reading(0.3), 100);
                t += 1;
            }
        };
        step(&mut c, 1.0);
        assert_eq!(c.target(), 2);
        step(&mut c, 1.8);
        assert_eq!(c.target(), 3);
        step(&mut c, 1.82);
        assert_eq!(c.target(), 3, "3 workers are no faster than 2");
        assert_eq!(c.ceiling(), 3);
    }
}
