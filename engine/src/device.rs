//! The `device` key: `cpu`, `cuda:N`, or `cuda` (GPU `LOCAL_RANK`), for training and generation alike.

use anyhow::{bail, Result};
use candle_core::Device;

/// The device named by `device = "cpu" | "cuda:N"`.
pub fn device_from_name(name: &str) -> Result<Device> {
    device_for_rank(name, 0)
}

/// As [`device_from_name`]; plain `"cuda"` is GPU `local_rank` (one rank per GPU of a node, as under
/// `srun` with all the node's GPUs visible to every task).
pub fn device_for_rank(name: &str, local_rank: usize) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if name == "cuda" {
        Some(local_rank)
    } else {
        name.strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
    };
    let Some(ordinal) = ordinal else {
        bail!(
            "device = {name:?} is not known: use \"cpu\", \"cuda\" (GPU LOCAL_RANK) or \"cuda:N\""
        );
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("device = {name:?} needs an engine built with `--features cuda`: this build is CPU-only, use device = \"cpu\"");
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// Bytes of memory the kernel says can be allocated without swapping (`MemAvailable`); `None` off Linux.
pub fn host_memory_available() -> Option<u64> {
    meminfo_kib("MemAvailable:").map(|k| k * 1024)
}

/// Bytes of RAM in all (`MemTotal`).
pub fn host_memory_total() -> Option<u64> {
    meminfo_kib("MemTotal:").map(|k| k * 1024)
}

fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A memory size in GiB, readable below one too (`512 MiB`).
pub fn gib_text(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib < 1.0 {
        format!("{:.0} MiB", gib * 1024.0)
    } else {
        format!("{gib:.1} GiB")
    }
}

/// Refuse a CPU run whose estimated training memory is more than the machine has free: it would otherwise
/// abort (out of memory) seconds or minutes in, with no message.
pub fn check_host_memory(estimate: u64) -> Result<()> {
    if let Some(free) = host_memory_available() {
        if estimate > free {
            bail!(
                "this model needs about {} to train (weights, gradients, AdamW moments and activations at this batch and context) but the machine has {} available: lower dim, n_layers, batch_size (or raise grad_accum) or context_len",
                gib_text(estimate),
                gib_text(free)
            );
        }
    }
    Ok(())
}
