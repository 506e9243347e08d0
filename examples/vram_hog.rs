//! Takes GPU memory in steps and gives it back, to put the adaptive controller under
//! foreign memory pressure (used by `scripts/gpu-pressure`; needs `--features cuda`).
//!
//! Usage: vram_hog STEP_MIB STEPS HOLD_SECS

use std::time::Duration;

use candle_core::{DType, Device, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let [step_mib, steps, hold] = args[..] else {
        anyhow::bail!("usage: vram_hog STEP_MIB STEPS HOLD_SECS");
    };
    let device = Device::new_cuda(0)?;
    let mut held = Vec::new();
    for i in 1..=steps {
        held.push(Tensor::zeros(
            ((step_mib as usize) << 18,),
            DType::F32,
            &device,
        )?);
        device.synchronize()?;
        println!("vram_hog: holding {} MiB", i * step_mib);
        std::thread::sleep(Duration::from_secs(hold));
    }
    while held.pop().is_some() {
        device.synchronize()?;
        println!("vram_hog: holding {} MiB", held.len() as u64 * step_mib);
        std::thread::sleep(Duration::from_secs(hold));
    }
    Ok(())
}
