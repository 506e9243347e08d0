//! Warm-up calibration of the adaptive controller: runs 1, 2, 4, … concurrent
//! generations on a worst-case image, measures the peak memory each adds, and stops
//! when the next step would not fit the free memory minus a reserve, or at the maximum.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::vram::VramProbe;
use crate::queue::{Calibration, now_ms};
use crate::vision::{CaptionLength, Captioner, RunControl, Skill, SkillError, SkillSettings};

/// Bounds of a calibration.
#[derive(Debug, Clone, Copy)]
pub struct CalibrationLimits {
    /// Most concurrent generations to try (the settings' maximum).
    pub max: usize,
    /// Memory to keep free for everything else.
    pub reserve_bytes: u64,
}

/// A 1024 × 768 PNG: the largest crop count (12 tiles + global) at the real geometry.
fn worst_case_image() -> Vec<u8> {
    let img = image::RgbImage::from_fn(1024, 768, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    let _ = img.write_to(&mut out, image::ImageFormat::Png);
    out.into_inner()
}

/// Runs `k` generations at once and returns the peak memory in use meanwhile, or
/// `None` when one of them ran out of memory.
fn round(captioner: &dyn Captioner, probe: &dyn VramProbe, image: &[u8], k: usize) -> Option<u64> {
    let done = AtomicBool::new(false);
    let settings = SkillSettings {
        max_tokens: 4,
        ..SkillSettings::default()
    };
    let skill = Skill::Caption {
        length: CaptionLength::Short,
    };
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = probe.read().map(|r| r.used).unwrap_or(0);
            while !done.load(Ordering::SeqCst) {
                if let Some(r) = probe.read() {
                    peak = peak.max(r.used);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        let runs: Vec<_> = (0..k)
            .map(|_| s.spawn(|| captioner.run(image, &skill, &settings, &RunControl::default())))
            .collect();
        let oom = runs
            .into_iter()
            .any(|h| matches!(h.join(), Ok(Err(SkillError::OutOfMemory(_)))));
        done.store(true, Ordering::SeqCst);
        let peak = sampler.join().unwrap_or(0);
        (!oom).then_some(peak)
    })
}

/// Measures how many generations fit. Blocking: call it off the async runtime, before
/// workers start claiming.
pub fn warm_up(
    captioner: &dyn Captioner,
    probe: &dyn VramProbe,
    limits: CalibrationLimits,
) -> Option<Calibration> {
    let base = probe.read()?;
    let image = worst_case_image();
    let headroom = base
        .total
        .saturating_sub(base.used)
        .saturating_sub(limits.reserve_bytes);
    let max = limits.max.max(1);
    let mut per_generation = 0u64;
    let mut k = 1;
    let fits = loop {
        let Some(peak) = round(captioner, probe, &image, k) else {
            tracing::warn!(
                concurrency = k,
                "calibration ran out of memory; keeping the last level that fit"
            );
            break (k / 2).max(1);
        };
        per_generation = per_generation.max(peak.saturating_sub(base.used) / k as u64);
        let fits = headroom
            .checked_div(per_generation)
            .map_or(max, |n| (n as usize).clamp(1, max));
        tracing::info!(
            concurrency = k,
            peak_mib = peak >> 20,
            per_generation_mib = per_generation >> 20,
            fits,
            "calibration round"
        );
        if k >= max || k * 2 > fits {
            break fits;
        }
        k *= 2;
    };
    Some(Calibration {
        device: probe.device_id(),
        model: captioner.model_id(),
        max_concurrency: fits,
        per_generation_bytes: per_generation,
        baseline_used_bytes: base.used,
        total_bytes: base.total,
        measured_at: now_ms(),
    })
}
