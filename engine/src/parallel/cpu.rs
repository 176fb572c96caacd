//! The CPU communicator: the ranks of a group, each in its own process, exchange f32 buffers over
//! Unix sockets in a star around rank 0. Rank 0 adds the contributions in rank order and sends
//! the sum back, so every rank holds bit-identical activations and runs are deterministic.
//!
//! Wire format of one buffer: `u32` rank count of dims, `u64` per dim, then the f32 values, all
//! native-endian (both ends are processes of one machine).

use super::{BusyClock, Communicator};
use crate::error::{EngineError, Result};
use candle_core::{DType, Tensor};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Rank 0's listening socket, bound before the other ranks are told where it is.
pub struct CpuRendezvous {
    listener: UnixListener,
    path: PathBuf,
}

impl CpuRendezvous {
    /// Binds the rendezvous socket at `path`.
    pub fn bind(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| comm_err(0, "bind", e))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Where the other ranks connect.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for ranks `1..world` to connect and returns rank 0's communicator.
    pub fn accept(self, world: usize, timeout: Duration) -> Result<CpuCommunicator> {
        let deadline = Instant::now() + timeout;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| comm_err(0, "listen", e))?;
        let mut peers: Vec<Option<UnixStream>> = (1..world).map(|_| None).collect();
        let mut joined = 0;
        while joined < world - 1 {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| comm_err(0, "accept", e))?;
                    let mut rank = [0u8; 4];
                    stream
                        .read_exact(&mut rank)
                        .map_err(|e| comm_err(0, "handshake", e))?;
                    let rank = u32::from_ne_bytes(rank) as usize;
                    match peers.get_mut(rank.wrapping_sub(1)) {
                        Some(slot @ None) => {
                            *slot = Some(stream);
                            joined += 1;
                        }
                        _ => {
                            return Err(EngineError::Comm(format!(
                                "rank {rank} joined a group of {world} twice or out of range"
                            )))
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(EngineError::Comm(format!(
                            "only {joined} of {} ranks joined rank 0 within {timeout:?}",
                            world - 1
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(comm_err(0, "accept", e)),
            }
        }
        let _ = std::fs::remove_file(&self.path);
        Ok(CpuCommunicator::new(
            0,
            world,
            peers.into_iter().flatten().collect(),
        ))
    }
}

/// A rank's end of the star; see the module docs.
pub struct CpuCommunicator {
    rank: usize,
    world: usize,
    /// Rank 0: one link per other rank, in rank order. Other ranks: the link to rank 0.
    links: Mutex<Vec<UnixStream>>,
    busy: BusyClock,
}

impl CpuCommunicator {
    fn new(rank: usize, world: usize, links: Vec<UnixStream>) -> Self {
        Self {
            rank,
            world,
            links: Mutex::new(links),
            busy: BusyClock::default(),
        }
    }

    /// Joins rank 0's rendezvous at `path` as `rank` of `world`, retrying until `timeout`.
    pub fn connect(path: &Path, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        if rank == 0 || rank >= world {
            return Err(EngineError::Comm(format!(
                "rank {rank} cannot join a group of {world} as a peer"
            )));
        }
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(comm_err(rank, "connect", e)),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream
            .write_all(&(rank as u32).to_ne_bytes())
            .map_err(|e| comm_err(rank, "handshake", e))?;
        Ok(Self::new(rank, world, vec![stream]))
    }

    /// A group of `world` ranks as threads of this process (tests and benchmarks).
    pub fn local_group(dir: &Path, world: usize) -> Result<Vec<Self>> {
        let path = dir.join("cpu-comm.sock");
        let rendezvous = CpuRendezvous::bind(&path)?;
        let joiners: Vec<_> = (1..world)
            .map(|r| {
                let p = path.clone();
                std::thread::spawn(move || Self::connect(&p, r, world, Duration::from_secs(10)))
            })
            .collect();
        let mut group = vec![rendezvous.accept(world, Duration::from_secs(10))?];
        for j in joiners {
            group.push(
                j.join()
                    .map_err(|_| EngineError::Comm("a joining thread panicked".into()))??,
            );
        }
        Ok(group)
    }

    fn timed<T>(&self, f: impl FnOnce(&mut Vec<UnixStream>) -> Result<T>) -> Result<T> {
        self.busy.time(|| {
            let mut links = self.links.lock().map_err(|_| {
                EngineError::Comm("communicator poisoned by an earlier panic".into())
            })?;
            f(&mut links)
        })
    }
}

impl Communicator for CpuCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let mut data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let dims = x.dims().to_vec();
        let rank = self.rank;
        self.timed(|links| {
            if rank == 0 {
                for (peer, link) in links.iter_mut().enumerate() {
                    let (_, part) = read_frame(link, peer + 1)?;
                    if part.len() != data.len() {
                        return Err(EngineError::Comm(format!(
                            "rank {} sent {} values to an all-reduce of {}",
                            peer + 1,
                            part.len(),
                            data.len()
                        )));
                    }
                    data.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
                }
                for link in links.iter_mut() {
                    write_frame(link, &dims, &data, 0)?;
                }
            } else {
                write_frame(&mut links[0], &dims, &data, rank)?;
                data = read_frame(&mut links[0], 0)?.1;
            }
            Ok(())
        })?;
        Ok(Tensor::from_vec(data, x.shape(), x.device())?.to_dtype(dtype)?)
    }

    fn gather_to_root(&self, x: &Tensor, dim: usize) -> Result<Option<Tensor>> {
        let data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let rank = self.rank;
        let parts = self.timed(|links| {
            if rank != 0 {
                write_frame(&mut links[0], x.dims(), &data, rank)?;
                return Ok(None);
            }
            let mut parts = Vec::with_capacity(links.len());
            for (peer, link) in links.iter_mut().enumerate() {
                parts.push(read_frame(link, peer + 1)?);
            }
            Ok(Some(parts))
        })?;
        let Some(parts) = parts else {
            return Ok(None);
        };
        let mut tensors = vec![x.to_dtype(DType::F32)?];
        for (dims, values) in parts {
            tensors.push(Tensor::from_vec(values, dims, x.device())?);
        }
        Ok(Some(Tensor::cat(&tensors, dim)?.to_dtype(x.dtype())?))
    }

    fn busy_time(&self) -> Duration {
        self.busy.total()
    }
}

fn comm_err(rank: usize, what: &str, e: std::io::Error) -> EngineError {
    EngineError::Comm(format!("rank {rank}: {what}: {e}"))
}

fn write_frame(link: &mut UnixStream, dims: &[usize], data: &[f32], rank: usize) -> Result<()> {
    let mut buf = Vec::with_capacity(4 + 8 * dims.len() + 4 * data.len());
    buf.extend_from_slice(&(dims.len() as u32).to_ne_bytes());
    for &d in dims {
        buf.extend_from_slice(&(d as u64).to_ne_bytes());
    }
    buf.extend_from_slice(bytemuck::cast_slice(data));
    link.write_all(&buf)
        .map_err(|e| comm_err(rank, "send to a peer", e))
}

/// Reads one buffer sent by rank `from`.
fn read_frame(link: &mut UnixStream, from: usize) -> Result<(Vec<usize>, Vec<f32>)> {
    let lost = |e: std::io::Error| comm_err(from, "receive (peer gone?)", e);
    let mut n = [0u8; 4];
    link.read_exact(&mut n).map_err(lost)?;
    let ndims = u32::from_ne_bytes(n) as usize;
    if ndims > 8 {
        return Err(EngineError::Comm(format!(
            "rank {from} sent a {ndims}-dimensional buffer"
        )));
    }
    let mut dims = Vec::with_capacity(ndims);
    for _ in 0..ndims {
        let mut d = [0u8; 8];
        link.read_exact(&mut d).map_err(lost)?;
        dims.push(u64::from_ne_bytes(d) as usize);
    }
    let len: usize = dims.iter().product();
    let mut data = vec![0f32; len];
    link.read_exact(bytemuck::cast_slice_mut(&mut data))
        .map_err(lost)?;
    Ok((dims, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run_group<T: Send + 'static>(
        world: usize,
        f: impl Fn(CpuCommunicator) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let dir = tempfile::tempdir().unwrap();
        let group = CpuCommunicator::local_group(dir.path(), world).unwrap();
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| std::thread::spawn(move || f(c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_over_every_rank() {
        for world in [2, 3, 4] {
            let out = run_group(world, |c| {
                let r = c.rank() as f32;
                let x = Tensor::new(&[[r, 1.0], [2.0 * r, -r]], &Device::Cpu).unwrap();
                let y = c.all_reduce_sum(&x).unwrap();
                let z = c.all_reduce_sum(&y).unwrap();
                (y.to_vec2::<f32>().unwrap(), z.to_vec2::<f32>().unwrap())
            });
            let s: f32 = (0..world).map(|r| r as f32).sum();
            let w = world as f32;
            for (y, z) in out {
                assert_eq!(y, vec![vec![s, w], vec![2.0 * s, -s]]);
                assert_eq!(z, vec![vec![s * w, w * w], vec![2.0 * s * w, -s * w]]);
            }
        }
    }

    #[test]
    fn gather_concatenates_on_rank_zero_only() {
        let out = run_group(3, |c| {
            let r = c.rank() as f32;
            let x = Tensor::new(&[[r, r + 0.5], [10.0 + r, 11.0]], &Device::Cpu).unwrap();
            c.gather_to_root(&x, 1)
                .unwrap()
                .map(|t| t.to_vec2::<f32>().unwrap())
        });
        assert_eq!(
            out[0],
            Some(vec![
                vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5],
                vec![10.0, 11.0, 11.0, 11.0, 12.0, 11.0]
            ])
        );
        assert!(out[1].is_none() && out[2].is_none());
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let mut group = CpuCommunicator::local_group(dir.path(), 2).unwrap();
        drop(group.pop());
        let x = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let err = group[0].all_reduce_sum(&x).unwrap_err();
        assert!(err.is_fatal(), "{err}");
        assert!(err.to_string().contains("rank 1"), "{err}");
    }
}
