//! The UDP relay: real sockets on loopback, a [`Link`] per direction.
//!
//! ```text
//!  client A ──┐                 ┌── flow socket A ──┐
//!             ├── relay.addr() ─┤                   ├── upstream
//!  client B ──┘   (up link)     └── flow socket B ──┘
//!                 ◄──────────── (down link) ◄────────
//! ```
//!
//! Clients send to [`Relay::addr`]. Each client address gets a socket of its
//! own towards the upstream, so the upstream sees one peer per client, as
//! without the relay. All clients share the two links: two transfers through
//! one relay compete for one bottleneck and one queue, which is how the
//! benchmarks measure what one congestion controller costs another.
//!
//! Tasks: one reads the client-facing socket and one per flow reads from the
//! upstream (tokio tasks); one thread per direction delivers datagrams when
//! their time comes, from a timer heap. The delivery threads sleep with the
//! operating system's high-resolution timers rather than tokio's
//! millisecond wheel: a bottleneck that released datagrams in 1 ms bursts
//! would compress acknowledgements and fool rate-measuring congestion
//! controllers (BBR) into sending faster than the link.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, JoinHandle};

use crate::link::{Link, LinkConfig, LinkStats, Verdict};

/// Receive and send buffers asked for on the relay's sockets, so that the
/// relay itself does not drop bursts (the kernel may grant less).
const SOCKET_BUFFER: usize = 4 << 20;

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// What both directions of a relay did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Client to upstream.
    pub up: LinkStats,
    /// Upstream to client.
    pub down: LinkStats,
    /// Client addresses seen.
    pub flows: usize,
}

/// A fault-injecting UDP relay in front of one upstream address. Stops when
/// dropped.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    up: Mutex<Link>,
    down: Mutex<Link>,
    flows: Mutex<Vec<AbortHandle>>,
    /// Tells the delivery threads to end.
    stop: AtomicBool,
}

impl Shared {
    fn link(&self, direction: Direction) -> std::sync::MutexGuard<'_, Link> {
        let link = match direction {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        };
        link.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Up,
    Down,
}

impl Relay {
    /// Starts a relay towards `upstream` on a free loopback port of the same
    /// address family, with `up` applied to datagrams from clients and `down`
    /// to datagrams back to them. The two directions draw their random
    /// decisions from generators seeded from `seed`. Must be called inside a
    /// tokio runtime.
    pub fn start(
        upstream: SocketAddr,
        up: LinkConfig,
        down: LinkConfig,
        seed: u64,
    ) -> io::Result<Relay> {
        let (client_socket, client_send) = bind_loopback(upstream)?;
        let addr = client_socket.local_addr()?;
        let shared = Arc::new(Shared {
            up: Mutex::new(Link::new(up, seed)),
            // Another stream of numbers for the other direction.
            down: Mutex::new(Link::new(down, seed ^ 0x9e37_79b9_7f4a_7c15)),
            flows: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let (up_tx, up_rx) = mpsc::channel();
        let (down_tx, down_rx) = mpsc::channel();
        for (name, queue, direction) in [
            ("netsim-up", up_rx, Direction::Up),
            ("netsim-down", down_rx, Direction::Down),
        ] {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || deliver(queue, &shared, direction))?;
        }
        let tasks = vec![tokio::spawn(from_clients(
            Arc::new(client_socket),
            Arc::new(client_send),
            upstream,
            shared.clone(),
            up_tx,
            down_tx,
        ))];
        Ok(Relay {
            addr,
            shared,
            tasks,
        })
    }

    /// The address clients send to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the relay did so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            up: self.shared.link(Direction::Up).stats(),
            down: self.shared.link(Direction::Down).stats(),
            flows: self
                .shared
                .flows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
        }
    }

    /// Changes the conditions of both directions from now on (datagrams
    /// already in flight keep their delivery time). `set(LinkConfig::cut(),
    /// LinkConfig::cut())` makes the peer look dead.
    pub fn set(&self, up: LinkConfig, down: LinkConfig) {
        self.shared.link(Direction::Up).set(up);
        self.shared.link(Direction::Down).set(down);
    }

    /// Changes the conditions of the client-to-upstream direction only.
    pub fn set_up(&self, up: LinkConfig) {
        self.shared.link(Direction::Up).set(up);
    }

    /// Changes the conditions of the upstream-to-client direction only.
    pub fn set_down(&self, down: LinkConfig) {
        self.shared.link(Direction::Down).set(down);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, AtomicOrdering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
        let flows = self.shared.flows.lock().unwrap_or_else(|p| p.into_inner());
        for flow in flows.iter() {
            flow.abort();
        }
    }
}

/// Binds a UDP socket on the loopback address of `like`'s family; returns it
/// for receiving in tokio and a clone for sending from a delivery thread.
fn bind_loopback(like: SocketAddr) -> io::Result<(UdpSocket, StdUdpSocket)> {
    let local: SocketAddr = if like.is_ipv4() {
        (Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (Ipv6Addr::LOCALHOST, 0).into()
    };
    let socket = StdUdpSocket::bind(local)?;
    let raw = socket2::SockRef::from(&socket);
    // Best effort: a smaller buffer only makes the relay lossier under bursts.
    let _ = raw.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = raw.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    let send = socket.try_clone()?;
    Ok((UdpSocket::from_std(socket)?, send))
}

/// A datagram waiting for its delivery time.
#[derive(Debug)]
struct Pending {
    at: Instant,
    /// Arrival order, so that datagrams due at the same instant keep it.
    seq: u64,
    socket: Arc<StdUdpSocket>,
    to: SocketAddr,
    data: Arc<[u8]>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    /// Reversed: the heap's top is the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Runs one datagram through `direction`'s link and queues what survives.
fn admit(
    shared: &Shared,
    direction: Direction,
    queue: &mpsc::Sender<Pending>,
    seq: &mut u64,
    socket: &Arc<StdUdpSocket>,
    to: SocketAddr,
    data: &[u8],
) {
    let verdict = shared.link(direction).decide(Instant::now(), data.len());
    let Verdict::Deliver { at, duplicate } = verdict else {
        return;
    };
    let data: Arc<[u8]> = data.into();
    for at in std::iter::once(at).chain(duplicate) {
        *seq += 1;
        let _ = queue.send(Pending {
            at,
            seq: *seq,
            socket: socket.clone(),
            to,
            data: data.clone(),
        });
    }
}

/// Reads datagrams from clients, making a flow for each new client.
async fn from_clients(
    socket: Arc<UdpSocket>,
    socket_send: Arc<StdUdpSocket>,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    up: mpsc::Sender<Pending>,
    down: mpsc::Sender<Pending>,
) {
    let mut flows: HashMap<SocketAddr, Arc<StdUdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut seq = 0u64;
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            // ICMP errors reported on the socket (a client that went away)
            // are no reason to stop.
            Err(_) => continue,
        };
        let flow = match flows.get(&client) {
            Some(flow) => flow.clone(),
            None => {
                let Ok((flow, flow_send)) = bind_loopback(upstream) else {
                    continue;
                };
                let flow_send = Arc::new(flow_send);
                let task = tokio::spawn(from_upstream(
                    flow,
                    upstream,
                    socket_send.clone(),
                    client,
                    shared.clone(),
                    down.clone(),
                ));
                shared
                    .flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(task.abort_handle());
                flows.insert(client, flow_send.clone());
                flow_send
            }
        };
        admit(
            &shared,
            Direction::Up,
            &up,
            &mut seq,
            &flow,
            upstream,
            &buf[..len],
        );
    }
}

/// Reads the upstream's datagrams for one client.
async fn from_upstream(
    flow: UdpSocket,
    upstream: SocketAddr,
    client_socket: Arc<StdUdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
    down: mpsc::Sender<Pending>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // Sequence numbers only order datagrams due at the same instant; per
    // flow is enough for that.
    let mut seq = 0u64;
    loop {
        let (len, from) = match flow.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(_) => continue,
        };
        if from != upstream {
            continue;
        }
        admit(
            &shared,
            Direction::Down,
            &down,
            &mut seq,
            &client_socket,
            client,
            &buf[..len],
        );
    }
}

/// The longest a delivery thread sleeps before looking at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// Sends datagrams of one direction when they are due, until the relay is
/// dropped.
fn deliver(queue: mpsc::Receiver<Pending>, shared: &Shared, direction: Direction) {
    let mut heap: BinaryHeap<Pending> = BinaryHeap::new();
    let mut open = true;
    while !shared.stop.load(AtomicOrdering::Relaxed) {
        let now = Instant::now();
        while heap.peek().is_some_and(|p| p.at <= now) {
            let Some(p) = heap.pop() else { break };
            if send(&p).is_err() {
                shared.link(direction).count_send_error();
            }
        }
        let wait = heap
            .peek()
            .map_or(POLL, |p| p.at.saturating_duration_since(now))
            .min(POLL);
        if !open {
            std::thread::sleep(wait);
            continue;
        }
        match queue.recv_timeout(wait) {
            Ok(p) => {
                heap.push(p);
                heap.extend(queue.try_iter());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
        }
    }
}

/// Sends one datagram on a non-blocking socket, waiting briefly while the
/// socket's send buffer is full.
fn send(p: &Pending) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match p.socket.send_to(&p.data, p.to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => return Err(e),
        }
    }
}
