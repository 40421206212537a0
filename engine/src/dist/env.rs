//! Rank and world size from the environment: torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`, or, inside an `srun` step, Slurm's `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`
//! (the master address then comes from `MASTER_ADDR`, which the job script sets to the first node). The
//! job-wide `SLURM_NTASKS` is not used: a batch script or `salloc` shell has it too, and an engine started
//! there by hand is one process, not a rank of an N-task step.

use anyhow::{bail, Context, Result};

/// Where this process sits in a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// A single-process run.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
        }
    }

    /// Read the variables through `get` (the process environment in [`Self::from_env`]).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |names: &[&str]| -> Result<Option<usize>> {
            for n in names {
                if let Some(v) = get(n) {
                    return v
                        .trim()
                        .parse()
                        .map(Some)
                        .with_context(|| format!("{n}={v:?} is not a number"));
                }
            }
            Ok(None)
        };
        let (world_size, rank, local_rank) = if let Some(w) = num(&["WORLD_SIZE"])? {
            let rank = match num(&["RANK"])? {
                Some(r) => r,
                None if w > 1 => bail!(
                    "WORLD_SIZE={w} is set but RANK is not: give every process its RANK (0..{w})"
                ),
                None => 0,
            };
            (w, rank, num(&["LOCAL_RANK"])?.unwrap_or(0))
        } else if let Some(w) = num(&["SLURM_STEP_NUM_TASKS"])? {
            let rank = num(&["SLURM_PROCID"])?.unwrap_or(0);
            (w, rank, num(&["SLURM_LOCALID"])?.unwrap_or(0))
        } else {
            (1, 0, 0)
        };
        if world_size == 0 {
            bail!("WORLD_SIZE must be at least 1");
        }
        if rank >= world_size {
            bail!("RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match get("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse()
                .with_context(|| format!("MASTER_PORT={p:?} is not a port"))?,
            None if world_size > 1 => bail!(
                "WORLD_SIZE={world_size} needs MASTER_PORT (and MASTER_ADDR) for the rendezvous"
            ),
            None => 29500,
        };
        Ok(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        })
    }

    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_and_single() {
        assert_eq!(env(&[]).unwrap(), DistEnv::single());
        let t = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!(
            (t.rank, t.world_size, t.master_addr.as_str(), t.master_port),
            (1, 2, "h", 1234)
        );
        let s = env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_PORT", "9"),
        ])
        .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank), (3, 4, 1));
        // A batch script or salloc shell (no srun step): one process, whatever the job's task count.
        let batch = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "0"),
        ])
        .unwrap();
        assert_eq!(batch, DistEnv::single());
        // torchrun's variables win over Slurm's.
        let t = env(&[
            ("WORLD_SIZE", "1"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_PROCID", "2"),
        ])
        .unwrap();
        assert_eq!(t, DistEnv::single());
        assert!(env(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])
            .unwrap_err()
            .to_string()
            .contains("RANK"));
        assert!(env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).is_err());
        assert!(env(&[("WORLD_SIZE", "2"), ("RANK", "0")])
            .unwrap_err()
            .to_string()
            .contains("MASTER_PORT"));
    }
}
