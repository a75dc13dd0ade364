//! Data-parallel communication between the ranks of one training run: the [`Communicator`] trait
//! the training loop talks to, [`SingleProcess`] (world size 1: every operation is a no-op, so a
//! single process runs the same code path), [`TcpComm`] (the CPU backend, and the rendezvous every
//! backend starts from) and, with the `cuda` feature, [`nccl::NcclComm`].
//!
//! # Rendezvous (as torchrun's `env://`)
//!
//! Every rank knows `MASTER_ADDR:MASTER_PORT`, its `RANK` and the `WORLD_SIZE` ([`Rendezvous`]).
//! Rank 0 listens there; every other rank connects (retrying until the deadline, since rank 0 may
//! still be busy upstream) and says who it is, which run (`tag`: the stage id) and where its own ring
//! listener is. Rank 0 checks that every rank came exactly once for the same tag and world size,
//! then sends every rank the table of ring addresses; each rank connects to the next one. The star
//! of rendezvous connections carries the small collectives ([`Communicator::all_gather`],
//! [`Communicator::broadcast`], [`Communicator::barrier`]); the ring carries the gradient buffer.
//!
//! # All-reduce
//!
//! [`Communicator::all_reduce_sum`] over the TCP ring is the bandwidth-optimal ring algorithm
//! (reduce-scatter, then all-gather: each rank sends and receives `2·(W−1)/W` of the buffer). Each
//! chunk is summed once, in ring order, and then copied, so every rank ends with bit-identical
//! values.
//!
//! # Failure
//!
//! Every read and write has a timeout ([`Rendezvous::timeout`], `PIPELINE_DIST_TIMEOUT` seconds,
//! 600 by default as NCCL's watchdog in PyTorch): a dead peer ends the others with an error that
//! names its rank and the operation ([`DistError::Peer`]) instead of a hang. A peer that exits
//! closes its sockets, so its neighbours fail at once; the timeout covers a vanished host.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The default timeout of every collective and of the rendezvous (seconds).
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;

const MAGIC: &[u8; 8] = b"PIPEDIST";
const PROTOCOL: u32 = 1;

/// What can go wrong between ranks. Messages name the peer rank and the operation.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The rendezvous at `MASTER_ADDR:MASTER_PORT` failed (bind, connect deadline, a rank that
    /// came twice or for another run).
    #[error("rendezvous at {addr}: {message}")]
    Rendezvous { addr: String, message: String },
    /// A peer stopped answering or closed its connection during `op`.
    #[error("rank {rank}: {what} during {op}")]
    Peer { rank: usize, op: &'static str, what: String },
    /// A peer sent something this protocol does not expect.
    #[error("rank {rank} sent a malformed message during {op}: {message}")]
    Protocol { rank: usize, op: &'static str, message: String },
    /// The NCCL backend failed.
    #[error("nccl: {0}")]
    Nccl(String),
}

/// The collectives data-parallel training needs. Every rank calls the same operations in the same
/// order with buffers of the same length.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over the ranks, in place; every rank ends with the same values.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Element-wise mean over the ranks, in place.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_sum(buf)?;
        let w = self.world_size() as f32;
        if w > 1.0 {
            buf.iter_mut().for_each(|x| *x /= w);
        }
        Ok(())
    }
    /// Rank 0's `buf` replaces every other rank's.
    fn broadcast(&mut self, buf: &mut Vec<u8>) -> Result<(), DistError>;
    /// Every rank's `mine`, in rank order, on every rank.
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), DistError> {
        self.all_gather(&[]).map(|_| ())
    }
}

/// World size 1: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut Vec<u8>) -> Result<(), DistError> {
        Ok(())
    }
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        Ok(vec![mine.to_vec()])
    }
}

/// Where and how the ranks of a run find each other (torchrun's environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// `MASTER_ADDR`: rank 0's host.
    pub master_addr: String,
    /// `MASTER_PORT`: where rank 0 listens.
    pub master_port: u16,
    /// Deadline of the rendezvous and timeout of every read and write afterwards.
    pub timeout: Duration,
    /// Which collective run this is (the stage id): ranks meeting for another tag are refused.
    pub tag: String,
}

/// The TCP backend (see the module docs).
pub struct TcpComm {
    rank: usize,
    world: usize,
    /// Rank 0: a stream to every other rank (index = rank; its own slot is `None`). Others: the
    /// stream to rank 0 at index 0.
    star: Vec<Option<TcpStream>>,
    /// Ring: to rank `rank + 1`, from rank `rank - 1` (mod world).
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
}

fn peer_err(rank: usize, op: &'static str, e: &std::io::Error) -> DistError {
    let what = match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            "did not answer within the timeout (PIPELINE_DIST_TIMEOUT); it may have died or hung".to_string()
        }
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => "closed its connection (the process exited or crashed)".to_string(),
        _ => format!("connection error: {e}"),
    };
    DistError::Peer { rank, op, what }
}

fn configure(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)?;
    s.flush()
}

/// Frames above this are refused (a corrupt length would otherwise allocate without bound).
const MAX_FRAME: u64 = 1 << 40;

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// `[u64 count][frame]...`
fn pack(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = (parts.len() as u64).to_le_bytes().to_vec();
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn unpack(bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let s = bytes.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(s)
    };
    let mut at = 0;
    let count = u64::from_le_bytes(take(&mut at, 8)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let len = u64::from_le_bytes(take(&mut at, 8)?.try_into().ok()?) as usize;
        out.push(take(&mut at, len)?.to_vec());
    }
    (at == bytes.len()).then_some(out)
}

/// The hello a rank sends rank 0: magic, protocol, rank, world size, ring port, tag.
fn hello(rank: usize, world: usize, ring_port: u16, tag: &str) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&PROTOCOL.to_le_bytes());
    h.extend_from_slice(&(rank as u32).to_le_bytes());
    h.extend_from_slice(&(world as u32).to_le_bytes());
    h.extend_from_slice(&ring_port.to_le_bytes());
    h.extend_from_slice(tag.as_bytes());
    h
}

struct Hello {
    rank: usize,
    world: usize,
    ring_port: u16,
    tag: String,
}

fn parse_hello(b: &[u8]) -> Result<Hello, String> {
    if b.len() < 22 || &b[..8] != MAGIC {
        return Err("not a pipeline rank (bad magic)".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(8) != PROTOCOL {
        return Err(format!(
            "protocol {} (this build speaks {PROTOCOL}): run the same pipeline binary on every rank",
            u32_at(8)
        ));
    }
    Ok(Hello {
        rank: u32_at(12) as usize,
        world: u32_at(16) as usize,
        ring_port: u16::from_le_bytes([b[20], b[21]]),
        tag: String::from_utf8_lossy(&b[22..]).into_owned(),
    })
}

fn resolve(addr: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    (addr, port).to_socket_addrs().map(|a| a.collect()).map_err(|e| format!("cannot resolve MASTER_ADDR `{addr}`: {e}"))
}

/// Connect to `addrs`, retrying until `deadline` (the listener may not be up yet).
fn connect_retry(addrs: &[SocketAddr], deadline: Instant) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    loop {
        for a in addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
                Ok(s) => return Ok(s),
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("could not connect before the deadline ({last})"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Accept one connection, giving up at `deadline`.
fn accept_until(l: &TcpListener, deadline: Instant) -> std::io::Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok((s, a));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(ErrorKind::TimedOut, "no connection before the deadline"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

impl TcpComm {
    /// Meet the other ranks (see the module docs). World size 1 needs no network at all.
    pub fn connect(rv: &Rendezvous) -> Result<TcpComm, DistError> {
        let addr = format!("{}:{}", rv.master_addr, rv.master_port);
        let fail = |message: String| DistError::Rendezvous { addr: addr.clone(), message };
        let (rank, world) = (rv.rank, rv.world_size);
        if world == 0 || rank >= world {
            return Err(fail(format!("RANK {rank} is not below WORLD_SIZE {world}")));
        }
        if world == 1 {
            return Ok(TcpComm { rank, world, star: vec![None], next: None, prev: None });
        }
        let deadline = Instant::now() + rv.timeout;
        // Every rank's ring listener, on every interface, at a port the OS picks.
        let ring =
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| fail(format!("binding a ring listener: {e}")))?;
        let ring_port = ring.local_addr().map_err(|e| fail(e.to_string()))?.port();
        let mut star: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let table: Vec<SocketAddr>;
        if rank == 0 {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, rv.master_port))
                .map_err(|e| fail(format!("rank 0 cannot listen on port {}: {e}", rv.master_port)))?;
            let mut ring_addrs: Vec<Option<SocketAddr>> = vec![None; world];
            let mut local_ip: Option<IpAddr> = None;
            for _ in 1..world {
                let (mut s, peer) = accept_until(&l, deadline).map_err(|e| {
                    let missing: Vec<String> =
                        (1..world).filter(|&r| star[r].is_none()).map(|r| r.to_string()).collect();
                    fail(format!("{e}: ranks {} never connected", missing.join(", ")))
                })?;
                configure(&s, rv.timeout).map_err(|e| fail(e.to_string()))?;
                let h = read_frame(&mut s)
                    .map_err(|e| fail(format!("reading a hello from {peer}: {e}")))
                    .and_then(|b| parse_hello(&b).map_err(|m| fail(format!("{peer}: {m}"))))?;
                if h.world != world {
                    return Err(fail(format!("rank {} says WORLD_SIZE={}, rank 0 has {world}", h.rank, h.world)));
                }
                if h.tag != rv.tag {
                    return Err(fail(format!(
                        "rank {} joined for `{}` while rank 0 runs `{}`: the ranks disagree about the run",
                        h.rank, h.tag, rv.tag
                    )));
                }
                if h.rank == 0 || h.rank >= world || star[h.rank].is_some() {
                    return Err(fail(format!("rank {} came twice or is out of range (WORLD_SIZE {world})", h.rank)));
                }
                local_ip.get_or_insert(s.local_addr().map_err(|e| fail(e.to_string()))?.ip());
                ring_addrs[h.rank] = Some(SocketAddr::new(peer.ip(), h.ring_port));
                star[h.rank] = Some(s);
            }
            ring_addrs[0] = Some(SocketAddr::new(local_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)), ring_port));
            table = ring_addrs.into_iter().map(|a| a.expect("every rank registered")).collect();
            let encoded = pack(&table.iter().map(|a| a.to_string().into_bytes()).collect::<Vec<_>>());
            for (r, s) in star.iter_mut().enumerate().skip(1) {
                let s = s.as_mut().expect("connected");
                write_frame(s, &encoded).map_err(|e| peer_err(r, "rendezvous", &e))?;
            }
        } else {
            let addrs = resolve(&rv.master_addr, rv.master_port).map_err(fail)?;
            let mut s = connect_retry(&addrs, deadline).map_err(|m| fail(format!("rank {rank}: {m}")))?;
            configure(&s, rv.timeout).map_err(|e| fail(e.to_string()))?;
            write_frame(&mut s, &hello(rank, world, ring_port, &rv.tag)).map_err(|e| peer_err(0, "rendezvous", &e))?;
            let bytes = read_frame(&mut s).map_err(|e| peer_err(0, "rendezvous", &e))?;
            let parts = unpack(&bytes).filter(|p| p.len() == world).ok_or_else(|| DistError::Protocol {
                rank: 0,
                op: "rendezvous",
                message: "bad address table".into(),
            })?;
            table = parts
                .iter()
                .map(|p| String::from_utf8_lossy(p).parse::<SocketAddr>())
                .collect::<Result<_, _>>()
                .map_err(|e| DistError::Protocol { rank: 0, op: "rendezvous", message: e.to_string() })?;
            star[0] = Some(s);
        }
        // The ring: connect to the next rank (its listener is up: it was bound before the hello),
        // then accept the previous one.
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let mut next =
            connect_retry(&[table[next_rank]], deadline).map_err(|m| fail(format!("ring to rank {next_rank}: {m}")))?;
        configure(&next, rv.timeout).map_err(|e| fail(e.to_string()))?;
        next.write_all(&(rank as u32).to_le_bytes()).map_err(|e| peer_err(next_rank, "ring setup", &e))?;
        let (mut prev, _) =
            accept_until(&ring, deadline).map_err(|e| fail(format!("rank {prev_rank} never joined the ring: {e}")))?;
        configure(&prev, rv.timeout).map_err(|e| fail(e.to_string()))?;
        let mut who = [0u8; 4];
        prev.read_exact(&mut who).map_err(|e| peer_err(prev_rank, "ring setup", &e))?;
        if u32::from_le_bytes(who) as usize != prev_rank {
            return Err(DistError::Protocol {
                rank: u32::from_le_bytes(who) as usize,
                op: "ring setup",
                message: format!("expected rank {prev_rank}"),
            });
        }
        let mut comm = TcpComm { rank, world, star, next: Some(next), prev: Some(prev) };
        comm.barrier()?;
        Ok(comm)
    }

    fn star_mut(&mut self, r: usize) -> &mut TcpStream {
        self.star[r].as_mut().expect("a star connection to every peer")
    }

    /// Send `out` to the next rank while receiving `inp.len()` bytes from the previous one (both at
    /// once, so two ranks sending large chunks to each other cannot deadlock on full buffers).
    fn exchange(&mut self, out: &[u8], inp: &mut [u8], op: &'static str) -> Result<(), DistError> {
        let (next_rank, prev_rank) = ((self.rank + 1) % self.world, (self.rank + self.world - 1) % self.world);
        let next = self.next.as_mut().expect("ring");
        let prev = self.prev.as_mut().expect("ring");
        std::thread::scope(|sc| {
            let sender = sc.spawn(move || next.write_all(out).and_then(|_| next.flush()));
            let got = prev.read_exact(inp).map_err(|e| peer_err(prev_rank, op, &e));
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sender panicked")))
                .map_err(|e| peer_err(next_rank, op, &e));
            got.and(sent)
        })
    }
}

fn chunk_bounds(n: usize, world: usize, k: usize) -> (usize, usize) {
    (k * n / world, (k + 1) * n / world)
}

fn to_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        let (w, r, n) = (self.world, self.rank, buf.len());
        if w == 1 || n == 0 {
            return Ok(());
        }
        let mut inp = Vec::new();
        // Reduce-scatter: after W−1 steps rank r holds the full sum of chunk (r + 1) mod W.
        for s in 0..w - 1 {
            let (slo, shi) = chunk_bounds(n, w, (r + w - s) % w);
            let (rlo, rhi) = chunk_bounds(n, w, (r + 2 * w - s - 1) % w);
            let out = to_bytes(&buf[slo..shi]);
            inp.resize((rhi - rlo) * 4, 0);
            self.exchange(&out, &mut inp, "all_reduce (reduce-scatter)")?;
            for (x, b) in buf[rlo..rhi].iter_mut().zip(inp.chunks_exact(4)) {
                *x += f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        // All-gather: pass the reduced chunks around the ring.
        for s in 0..w - 1 {
            let (slo, shi) = chunk_bounds(n, w, (r + 1 + w - s) % w);
            let (rlo, rhi) = chunk_bounds(n, w, (r + w - s) % w);
            let out = to_bytes(&buf[slo..shi]);
            inp.resize((rhi - rlo) * 4, 0);
            self.exchange(&out, &mut inp, "all_reduce (all-gather)")?;
            for (x, b) in buf[rlo..rhi].iter_mut().zip(inp.chunks_exact(4)) {
                *x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>) -> Result<(), DistError> {
        if self.world == 1 {
            return Ok(());
        }
        if self.rank == 0 {
            for r in 1..self.world {
                write_frame(self.star_mut(r), buf).map_err(|e| peer_err(r, "broadcast", &e))?;
            }
        } else {
            *buf = read_frame(self.star_mut(0)).map_err(|e| peer_err(0, "broadcast", &e))?;
        }
        Ok(())
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        if self.world == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        if self.rank == 0 {
            let mut parts = vec![mine.to_vec()];
            for r in 1..self.world {
                parts.push(read_frame(self.star_mut(r)).map_err(|e| peer_err(r, "all_gather", &e))?);
            }
            let packed = pack(&parts);
            for r in 1..self.world {
                write_frame(self.star_mut(r), &packed).map_err(|e| peer_err(r, "all_gather", &e))?;
            }
            Ok(parts)
        } else {
            write_frame(self.star_mut(0), mine).map_err(|e| peer_err(0, "all_gather", &e))?;
            let bytes = read_frame(self.star_mut(0)).map_err(|e| peer_err(0, "all_gather", &e))?;
            unpack(&bytes).filter(|p| p.len() == self.world).ok_or_else(|| DistError::Protocol {
                rank: 0,
                op: "all_gather",
                message: "bad frame".into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn free_port() -> u16 {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
    }

    fn rv(rank: usize, world: usize, port: u16, timeout: Duration) -> Rendezvous {
        Rendezvous {
            rank,
            world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout,
            tag: "t".into(),
        }
    }

    /// Run `f` on `world` ranks (threads), each with its own TCP communicator.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(&mut TcpComm) -> T + Sync) -> Vec<T> {
        let port = free_port();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let f = &f;
                    s.spawn(move || f(&mut TcpComm::connect(&rv(r, world, port, Duration::from_secs(20))).unwrap()))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn ring_all_reduce_sums_on_every_rank_for_any_length() {
        for world in [2, 3, 4] {
            // Lengths below, at and above the world size (empty chunks included).
            let out = on_ranks(world, |c| {
                let mut res = Vec::new();
                for n in [0usize, 1, 3, 7, 1000] {
                    let mut b: Vec<f32> = (0..n).map(|i| (i * (c.rank() + 1)) as f32).collect();
                    c.all_reduce_sum(&mut b).unwrap();
                    res.push(b);
                }
                res
            });
            let factor: usize = (1..=world).sum();
            for (n, i) in [0usize, 1, 3, 7, 1000].iter().zip(0..) {
                let want: Vec<f32> = (0..*n).map(|k| (k * factor) as f32).collect();
                for rank_out in &out {
                    assert_eq!(rank_out[i], want, "world {world}, n {n}");
                }
            }
        }
    }

    #[test]
    fn gather_broadcast_barrier_and_mean() {
        let out = on_ranks(3, |c| {
            let g = c.all_gather(format!("r{}", c.rank()).as_bytes()).unwrap();
            let mut b = if c.rank() == 0 { b"root".to_vec() } else { Vec::new() };
            c.broadcast(&mut b).unwrap();
            c.barrier().unwrap();
            let mut m = vec![c.rank() as f32 * 3.0];
            c.all_reduce_mean(&mut m).unwrap();
            (g, b, m)
        });
        for (g, b, m) in out {
            assert_eq!(g, vec![b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
            assert_eq!(b, b"root");
            assert_eq!(m, vec![3.0]);
        }
    }

    #[test]
    fn a_dead_peer_is_an_error_naming_its_rank_not_a_hang() {
        let port = free_port();
        let t0 = Instant::now();
        let errs = std::thread::scope(|s| {
            let survivors: Vec<_> = [0usize, 2]
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut c = TcpComm::connect(&rv(r, 3, port, Duration::from_secs(2))).unwrap();
                        let mut b = vec![1.0f32; 64];
                        c.all_reduce_sum(&mut b).unwrap();
                        // Rank 1 is gone now: the next collective fails instead of waiting forever.
                        c.all_reduce_sum(&mut b).unwrap_err().to_string()
                    })
                })
                .collect();
            s.spawn(move || {
                let mut c = TcpComm::connect(&rv(1, 3, port, Duration::from_secs(2))).unwrap();
                c.all_reduce_sum(&mut [1.0f32; 64]).unwrap();
                drop(c); // dies
            });
            survivors.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        assert!(t0.elapsed() < Duration::from_secs(15), "took {:?}", t0.elapsed());
        assert!(errs.iter().all(|e| e.contains("rank ")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("rank 1")), "{errs:?}");
    }

    #[test]
    fn rendezvous_refuses_a_rank_of_another_run_and_times_out_on_a_missing_one() {
        let port = free_port();
        let (a, b) = std::thread::scope(|s| {
            let a =
                s.spawn(move || TcpComm::connect(&rv(0, 2, port, Duration::from_secs(5))).err().unwrap().to_string());
            let b = s.spawn(move || {
                let mut r = rv(1, 2, port, Duration::from_secs(5));
                r.tag = "other".into();
                TcpComm::connect(&r).err().map(|e| e.to_string())
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(a.contains("rank 1 joined for `other` while rank 0 runs `t`"), "{a}");
        assert!(b.is_some_and(|e| e.contains("rank 0")));

        let t0 = Instant::now();
        let e = TcpComm::connect(&rv(0, 2, free_port(), Duration::from_millis(300))).err().unwrap().to_string();
        assert!(e.contains("ranks 1 never connected"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}

/// The NCCL backend (CUDA builds): gradients are summed by `ncclAllReduce` on the rank's GPU; the
/// unique id travels over the TCP rendezvous, which also carries the small collectives and checks,
/// before every all-reduce, that every rank is still there (NCCL itself would wait forever on a
/// dead peer).
#[cfg(feature = "cuda")]
pub mod nccl {
    use std::sync::Arc;

    use cudarc::driver::CudaDevice;
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};

    use super::{Communicator, DistError, Rendezvous, TcpComm};

    /// NCCL on GPU `ordinal` plus the TCP star of the rendezvous.
    pub struct NcclComm {
        tcp: TcpComm,
        comm: Comm,
        dev: Arc<CudaDevice>,
    }

    // The communicator is used by one thread at a time (the training loop that owns it).
    unsafe impl Send for NcclComm {}

    fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> DistError {
        DistError::Nccl(format!("{what}: {:?}", e.0))
    }

    fn cuda_err(what: &str, e: cudarc::driver::DriverError) -> DistError {
        DistError::Nccl(format!("{what}: {e}"))
    }

    impl NcclComm {
        /// Meet over TCP, exchange rank 0's NCCL unique id, initialise the NCCL communicator.
        pub fn connect(rv: &Rendezvous, ordinal: usize) -> Result<NcclComm, DistError> {
            let mut tcp = TcpComm::connect(rv)?;
            let dev = CudaDevice::new(ordinal).map_err(|e| cuda_err(&format!("opening GPU {ordinal}"), e))?;
            let mut bytes = if rv.rank == 0 {
                let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
                id.internal().iter().map(|&c| c as u8).collect()
            } else {
                Vec::new()
            };
            tcp.broadcast(&mut bytes)?;
            let mut internal = [0 as ::core::ffi::c_char; 128];
            if bytes.len() != internal.len() {
                return Err(DistError::Protocol {
                    rank: 0,
                    op: "nccl id",
                    message: format!("{} bytes, expected 128", bytes.len()),
                });
            }
            for (d, s) in internal.iter_mut().zip(&bytes) {
                *d = *s as ::core::ffi::c_char;
            }
            let comm = Comm::from_rank(dev.clone(), rv.rank, rv.world_size, Id::uninit(internal))
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            Ok(NcclComm { tcp, comm, dev })
        }
    }

    impl Communicator for NcclComm {
        fn rank(&self) -> usize {
            self.tcp.rank()
        }
        fn world_size(&self) -> usize {
            self.tcp.world_size()
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
            if self.world_size() == 1 || buf.is_empty() {
                return Ok(());
            }
            // A dead rank shows here, with the TCP timeout, instead of as a hang inside NCCL.
            self.tcp.barrier()?;
            let send = self.dev.htod_copy(buf.to_vec()).map_err(|e| cuda_err("copying gradients to the GPU", e))?;
            let mut recv = self.dev.alloc_zeros::<f32>(buf.len()).map_err(|e| cuda_err("allocating", e))?;
            self.comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).map_err(|e| nccl_err("ncclAllReduce", e))?;
            self.dev.dtoh_sync_copy_into(&recv, buf).map_err(|e| cuda_err("copying gradients back", e))
        }
        fn broadcast(&mut self, buf: &mut Vec<u8>) -> Result<(), DistError> {
            self.tcp.broadcast(buf)
        }
        fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
            self.tcp.all_gather(mine)
        }
    }
}
