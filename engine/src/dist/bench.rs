//! `engine bench-allreduce`: all-reduce bandwidth of the CPU backend between `world` local processes.
//! Without `RANK` in the environment the command starts the ranks itself (this same binary) and prints
//! rank 0's JSON line.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{tcp::TcpRing, timeout, Communicator, DistEnv};

/// Measure `iters` all-reduces of each size in `floats`; returns one JSON object per size (rank 0).
pub fn bench_allreduce(
    world: usize,
    floats: &[usize],
    iters: usize,
) -> Result<Vec<serde_json::Value>> {
    if std::env::var_os("RANK").is_none() {
        return launch(world, floats, iters);
    }
    let env = DistEnv::from_env()?;
    let mut comm = TcpRing::connect(&env, timeout())?;
    let mut out = Vec::new();
    for &n in floats {
        let mut buf = vec![1f32; n];
        comm.all_reduce_sum(&mut buf)?; // warm-up
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            buf.iter_mut().for_each(|x| *x = 1.0);
            let t0 = Instant::now();
            comm.all_reduce_sum(&mut buf)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        if buf.iter().any(|x| *x != env.world_size as f32) {
            bail!("all-reduce returned a wrong sum");
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        out.push(serde_json::json!({
            "world_size": env.world_size,
            "floats": n,
            "bytes": n * 4,
            "median_ms": median * 1e3,
            "min_ms": times[0] * 1e3,
            // Bus bandwidth as NCCL reports it: 2(W−1)/W · bytes / time.
            "bus_gb_per_s": 2.0 * (env.world_size as f64 - 1.0) / env.world_size as f64 * (n * 4) as f64 / median / 1e9,
        }));
    }
    Ok(if env.rank == 0 { out } else { Vec::new() })
}

fn launch(world: usize, floats: &[usize], iters: usize) -> Result<Vec<serde_json::Value>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe()?;
    let sizes: Vec<String> = floats.iter().map(|f| f.to_string()).collect();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "bench-allreduce",
                    "--world",
                    &world.to_string(),
                    "--iters",
                    &iters.to_string(),
                    "--floats",
                    &sizes.join(","),
                ])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a rank")
        })
        .collect::<Result<_>>()?;
    let mut lines = Vec::new();
    for (rank, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("rank {rank} failed ({})", out.status);
        }
        if rank == 0 {
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                lines.push(serde_json::from_str(l)?);
            }
        }
    }
    Ok(lines)
}
