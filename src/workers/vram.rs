//! Memory readings for the concurrency controller: NVML for NVIDIA GPUs (library
//! loaded at run time), host memory for CPU runs, and a scripted probe that replays a
//! trace in tests. A missing driver is one log line and a fallback, never a panic.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::concurrency::Reading;

/// Something that reports device memory.
pub trait VramProbe: Send + Sync + 'static {
    /// A fresh reading, or `None` when the source failed this time.
    fn read(&self) -> Option<Reading>;
    /// Short name for logs and `/v1/stats` (`nvml`, `host`, `scripted`).
    fn name(&self) -> &'static str;
    /// Whether readings are of GPU memory (then the X-VRAM-* headers are sent).
    fn is_gpu(&self) -> bool;
    /// Identity of the measured device, keying stored calibrations.
    fn device_id(&self) -> String {
        self.name().to_string()
    }
}

/// GPU memory through NVML.
pub struct NvmlProbe {
    nvml: nvml_wrapper::Nvml,
    index: u32,
}

impl NvmlProbe {
    /// Loads the NVIDIA management library and checks that device `index` answers.
    pub fn new(index: u32) -> Result<Self, String> {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML unavailable ({e})"))?;
        nvml.device_by_index(index)
            .and_then(|d| d.memory_info())
            .map_err(|e| format!("NVML cannot read GPU {index} ({e})"))?;
        Ok(Self { nvml, index })
    }
}

impl VramProbe for NvmlProbe {
    fn read(&self) -> Option<Reading> {
        let m = self
            .nvml
            .device_by_index(self.index)
            .ok()?
            .memory_info()
            .ok()?;
        Some(Reading {
            total: m.total,
            used: m.used,
            free: m.free,
            own: None,
        })
    }

    fn name(&self) -> &'static str {
        "nvml"
    }

    fn device_id(&self) -> String {
        let Ok(d) = self.nvml.device_by_index(self.index) else {
            return format!("nvml:{}", self.index);
        };
        format!(
            "{} {}",
            d.name().unwrap_or_default(),
            d.uuid().unwrap_or_default()
        )
    }

    fn is_gpu(&self) -> bool {
        true
    }
}

/// Host memory from `/proc/meminfo` (MemTotal, MemAvailable), bounding CPU runs.
#[derive(Debug, Default)]
pub struct HostMemoryProbe;

impl VramProbe for HostMemoryProbe {
    fn read(&self) -> Option<Reading> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            line.split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
                .map(|kb| kb * 1024)
        };
        let total = field("MemTotal:")?;
        let free = field("MemAvailable:")?;
        Some(Reading {
            total,
            used: total.saturating_sub(free),
            free,
            own: crate::vision::moondream2::loader::process_rss_bytes(),
        })
    }

    fn name(&self) -> &'static str {
        "host"
    }

    fn is_gpu(&self) -> bool {
        false
    }
}

/// Replays readings given in advance (tests and simulations); repeats the last one.
#[derive(Debug)]
pub struct ScriptedProbe {
    readings: Mutex<VecDeque<Reading>>,
    gpu: bool,
}

impl ScriptedProbe {
    /// A probe that returns `readings` in order, presenting itself as a GPU when `gpu`.
    pub fn new(readings: Vec<Reading>, gpu: bool) -> Self {
        Self {
            readings: Mutex::new(readings.into()),
            gpu,
        }
    }
}

impl VramProbe for ScriptedProbe {
    fn read(&self) -> Option<Reading> {
        let mut q = self.readings.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() > 1 {
            q.pop_front()
        } else {
            q.front().copied()
        }
    }

    fn name(&self) -> &'static str {
        "scripted"
    }

    fn is_gpu(&self) -> bool {
        self.gpu
    }
}

/// NVML when a driver answers, else host memory; logs which one and why.
pub fn detect_probe(gpu_index: u32) -> Box<dyn VramProbe> {
    match NvmlProbe::new(gpu_index) {
        Ok(p) => {
            tracing::info!(gpu = gpu_index, "memory readings from NVML");
            Box::new(p)
        }
        Err(why) => {
            tracing::info!("{why}; bounding concurrency by host memory instead");
            Box::new(HostMemoryProbe)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_nvidia_driver_nvml_falls_back_to_host_memory() {
        // This machine has no NVIDIA driver: the real NVML load fails cleanly.
        if let Err(why) = NvmlProbe::new(0) {
            assert!(why.contains("NVML"), "{why}");
            let probe = detect_probe(0);
            assert_eq!(probe.name(), "host");
            assert!(!probe.is_gpu());
            let r = probe.read().expect("host memory is readable");
            assert!(r.total > 0 && r.used <= r.total && r.free <= r.total);
        } else {
            // On a machine with a GPU the same call must give a GPU reading.
            assert!(detect_probe(0).is_gpu());
        }
    }

    #[test]
    fn a_scripted_probe_replays_its_trace_and_holds_the_last_reading() {
        let r = |used| Reading {
            total: 100,
            used,
            free: 100 - used,
            own: None,
        };
        let p = ScriptedProbe::new(vec![r(10), r(20)], true);
        assert_eq!(p.read().unwrap().used, 10);
        assert_eq!(p.read().unwrap().used, 20);
        assert_eq!(p.read().unwrap().used, 20);
    }
}
