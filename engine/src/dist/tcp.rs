//! `TcpRing`: the CPU backend — a ring all-reduce (reduce-scatter, then all-gather; Patarasuk & Yuan 2009)
//! over TCP. Rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects, sends its
//! rank and the address of its own ring listener; rank 0 answers with the table; each rank then connects to
//! its successor and accepts its predecessor. Every step sends one chunk to the successor while receiving one
//! from the predecessor (on two threads, so neither side can block the other), moving 2·(W−1)/W of the buffer.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{Communicator, DistEnv};

/// Ring communicator over TCP.
pub struct TcpRing {
    rank: usize,
    world: usize,
    next: TcpStream,
    prev: TcpStream,
    /// Receive buffer, reused across calls.
    scratch: Vec<u8>,
}

fn configure(s: &TcpStream, timeout: Duration) -> Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(())
}

fn write_u64(s: &mut TcpStream, v: u64) -> Result<()> {
    s.write_all(&v.to_le_bytes())?;
    Ok(())
}

fn read_u64(s: &mut TcpStream) -> Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn write_str(s: &mut TcpStream, v: &str) -> Result<()> {
    write_u64(s, v.len() as u64)?;
    s.write_all(v.as_bytes())?;
    Ok(())
}

fn read_str(s: &mut TcpStream) -> Result<String> {
    let n = read_u64(s)? as usize;
    if n > 4096 {
        bail!(
            "rendezvous message too long ({n} bytes): is something else listening on MASTER_PORT?"
        );
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(String::from_utf8(b)?)
}

/// Accept one connection, giving up at `deadline`.
fn accept_until(listener: &TcpListener, deadline: Instant, what: &str) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("timed out waiting for {what}: did every rank start?");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Connect to `addr`, retrying until `deadline` (the listener may not be up yet).
fn connect_until(addr: &str, deadline: Instant) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .collect();
    loop {
        for a in &addrs {
            if let Ok(s) = TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                return Ok(s);
            }
        }
        if Instant::now() > deadline {
            bail!("could not connect to {addr} before the timeout: is rank 0 running?");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const MAGIC: u64 = 0x4249_544c_4c41_4d41; // "BITLLAMA"

impl TcpRing {
    /// Rendezvous and build the ring; fails after `timeout` when a rank does not show up.
    pub fn connect(env: &DistEnv, timeout: Duration) -> Result<Self> {
        let (rank, world) = (env.rank, env.world_size);
        let deadline = Instant::now() + timeout;
        let master = format!("{}:{}", env.master_addr, env.master_port);
        // Every rank listens for its predecessor on an ephemeral port of the interface that reaches the master.
        let bind_host = if env.master_addr == "127.0.0.1" || env.master_addr == "localhost" {
            "127.0.0.1"
        } else {
            "0.0.0.0"
        };
        let ring_listener =
            TcpListener::bind((bind_host, 0)).context("binding the ring listener")?;
        let ring_port = ring_listener.local_addr()?.port();

        let table: Vec<String> = if rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", env.master_port))
                .or_else(|_| TcpListener::bind(master.as_str()))
                .with_context(|| {
                    format!("rank 0 cannot listen on MASTER_PORT {}", env.master_port)
                })?;
            let mut table = vec![String::new(); world];
            table[0] = format!("{}:{ring_port}", env.master_addr);
            let mut peers = Vec::new();
            for _ in 1..world {
                let mut s = accept_until(&listener, deadline, "the other ranks at the rendezvous")?;
                configure(&s, timeout)?;
                if read_u64(&mut s)? != MAGIC {
                    bail!("a stranger connected to MASTER_PORT {}", env.master_port);
                }
                let r = read_u64(&mut s)? as usize;
                let port = read_u64(&mut s)?;
                let ip = s.peer_addr()?.ip();
                if r == 0 || r >= world || !table[r].is_empty() {
                    bail!("rendezvous: unexpected rank {r} (world size {world})");
                }
                table[r] = format!("{ip}:{port}");
                peers.push(s);
            }
            for s in &mut peers {
                for entry in &table {
                    write_str(s, entry)?;
                }
            }
            table
        } else {
            let mut s = connect_until(&master, deadline)?;
            configure(&s, timeout)?;
            write_u64(&mut s, MAGIC)?;
            write_u64(&mut s, rank as u64)?;
            write_u64(&mut s, ring_port as u64)?;
            (0..world)
                .map(|_| read_str(&mut s))
                .collect::<Result<_>>()?
        };

        // Ring: connect to the successor, accept the predecessor (in that order on every rank; the listener
        // queues the connection, so nobody waits on anybody).
        let succ = &table[(rank + 1) % world];
        let mut next = connect_until(succ, deadline)?;
        configure(&next, timeout)?;
        write_u64(&mut next, rank as u64)?;
        let mut prev = accept_until(&ring_listener, deadline, "the previous rank in the ring")?;
        configure(&prev, timeout)?;
        let from = read_u64(&mut prev)? as usize;
        if from != (rank + world - 1) % world {
            bail!(
                "ring: expected rank {} but rank {from} connected",
                (rank + world - 1) % world
            );
        }
        Ok(Self {
            rank,
            world,
            next,
            prev,
            scratch: Vec::new(),
        })
    }

    /// Send `send` to the successor while receiving `recv_len` floats from the predecessor into scratch.
    fn exchange(&mut self, send: &[f32], recv_len: usize) -> Result<()> {
        self.scratch.resize(recv_len * 4, 0);
        let bytes: &[u8] = bytemuck_f32(send);
        let next = &mut self.next;
        let prev = &mut self.prev;
        let scratch = &mut self.scratch;
        std::thread::scope(|sc| -> Result<()> {
            let sender = sc.spawn(move || next.write_all(bytes));
            let received = prev.read_exact(scratch);
            let sent = sender
                .join()
                .map_err(|_| anyhow::anyhow!("sender thread panicked"))?;
            // A socket timeout (ENGINE_DIST_TIMEOUT) reads as EAGAIN: say what it means.
            let explain = |e: std::io::Error, whom: &str| -> anyhow::Error {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    anyhow::anyhow!(
                        "the {whom} rank did not answer within ENGINE_DIST_TIMEOUT: it hangs or is stopped"
                    )
                } else {
                    anyhow::anyhow!("{e}: the {whom} rank died or closed its connection")
                }
            };
            sent.map_err(|e| explain(e, "next"))?;
            received.map_err(|e| explain(e, "previous"))?;
            Ok(())
        })
    }
}

/// View f32s as bytes (little-endian hosts; every supported target is).
fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is scaled accordingly.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn chunk_range(len: usize, world: usize, i: usize) -> std::ops::Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

impl Communicator for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let (w, r) = (self.world, self.rank);
        let n = buf.len();
        // Reduce-scatter: after W−1 steps rank r holds the full sum of chunk (r+1) mod W.
        for step in 0..w - 1 {
            let send_i = (r + w - step) % w;
            let recv_i = (r + w - step - 1) % w;
            let (s, rr) = (chunk_range(n, w, send_i), chunk_range(n, w, recv_i));
            let send: Vec<f32> = buf[s].to_vec();
            self.exchange(&send, rr.len())?;
            for (dst, src) in buf[rr].iter_mut().zip(self.scratch.chunks_exact(4)) {
                *dst += f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
            }
        }
        // All-gather: pass the finished chunks around the ring.
        for step in 0..w - 1 {
            let send_i = (r + 1 + w - step) % w;
            let recv_i = (r + w - step) % w;
            let (s, rr) = (chunk_range(n, w, send_i), chunk_range(n, w, recv_i));
            let send: Vec<f32> = buf[s].to_vec();
            self.exchange(&send, rr.len())?;
            for (dst, src) in buf[rr].iter_mut().zip(self.scratch.chunks_exact(4)) {
                *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
            }
        }
        Ok(())
    }

    fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        configure(&self.next, timeout)?;
        configure(&self.prev, timeout)
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        crate::dist::pick_free_port().unwrap()
    }

    /// Runs `f(rank, ring)` on `world` local ranks (one thread each) joined in a ring; their results.
    fn on_ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(usize, TcpRing) -> T + Send + Copy + 'static,
    ) -> Vec<T> {
        let port = free_port();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                std::thread::spawn(move || {
                    let env = DistEnv {
                        rank,
                        world_size: world,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    f(
                        rank,
                        TcpRing::connect(&env, Duration::from_secs(20)).unwrap(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// The NCCL id's way to the other ranks (tested here without NCCL): every byte value, rank 0's bytes
    /// on every rank.
    #[test]
    fn rank0_bytes_reach_every_rank_exactly() {
        let id: [u8; 256] = std::array::from_fn(|i| (255 - i) as u8);
        let got = on_ranks(3, move |rank, mut c| {
            crate::dist::broadcast_bytes(&mut c, (rank == 0).then_some(id)).unwrap()
        });
        assert!(got.iter().all(|g| *g == id));
    }

    #[test]
    fn ring_all_reduce_sums_for_several_world_sizes() {
        for world in [2usize, 3, 4] {
            on_ranks(world, move |rank, mut c| {
                // Lengths that do not divide by the world size, and an empty buffer.
                for len in [0usize, 1, 7, 1000] {
                    let mut buf: Vec<f32> = (0..len).map(|i| (i * (rank + 1)) as f32).collect();
                    c.all_reduce_sum(&mut buf).unwrap();
                    let factor: usize = (1..=world).sum();
                    for (i, v) in buf.iter().enumerate() {
                        assert_eq!(
                            *v,
                            (i * factor) as f32,
                            "world {world} rank {rank} len {len}"
                        );
                    }
                }
            });
        }
    }

    #[test]
    fn a_dead_peer_fails_the_collective_quickly() {
        let port = free_port();
        let peer = std::thread::spawn(move || {
            let env = DistEnv {
                rank: 1,
                world_size: 2,
                local_rank: 1,
                master_addr: "127.0.0.1".into(),
                master_port: port,
            };
            let c = TcpRing::connect(&env, Duration::from_secs(20)).unwrap();
            drop(c); // dies before the collective
        });
        let env = DistEnv {
            rank: 0,
            world_size: 2,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let mut c = TcpRing::connect(&env, Duration::from_secs(20)).unwrap();
        peer.join().unwrap();
        let t0 = Instant::now();
        let mut buf = vec![1f32; 1 << 16];
        assert!(c.all_reduce_sum(&mut buf).is_err());
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
