//! The endpoint's UDP socket: its kernel buffers, and a wrapper so that its
//! release can be awaited.
//!
//! **Buffers.** The kernel's default receive buffer (212,992 bytes on Linux)
//! holds about 150 full-size datagrams; a burst of handshakes or a fast
//! sender overflows it and the kernel drops datagrams before quinn sees them.
//! [`enlarge_buffers`] asks for [`SOCKET_BUFFER`] each way, reads back what
//! the kernel granted and warns when it granted less (on Linux the cap is
//! `net.core.rmem_max` / `net.core.wmem_max`; a process with `CAP_NET_ADMIN`
//! may exceed it, which is tried first).
//!
//! **Batches.** quinn hands the socket up to 10 packets at a time, sent
//! with one `sendmsg` (Linux UDP GSO). The kernel refuses a batch of more
//! than 65,507 bytes (EMSGSIZE), and quinn-udp takes EMSGSIZE for a lost MTU
//! probe and drops the batch silently: with packets above 6,550 bytes every
//! full batch was lost. The wrapper splits such a batch into as many
//! `sendmsg` calls as it takes (see `TransportConfig::mtu_upper_bound`).
//!
//! **Release.**
//! quinn closes an endpoint's socket when the last handle to the endpoint and
//! its connections is gone, inside its own driver task, at a moment nobody is
//! told about. A server that shuts down must be able to say "the port is free
//! now" (so it can be bound again at once); this wrapper fires a signal when
//! the socket itself is dropped, which is exactly that moment.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::oneshot;

use crate::config::MAX_GSO_BATCH;

/// Bytes asked for as the receive and the send buffer of every endpoint's
/// socket: 8 MiB, about 5,800 full-size datagrams, 0.8 s at 10 MB/s.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// The kernel buffers of an endpoint's UDP socket, as the kernel reports them.
///
/// Linux reports twice the size it was asked for (the other half pays for its
/// bookkeeping), so on Linux a granted request of 8 MiB reads back as 16 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SocketBuffers {
    /// Bytes asked for, each way.
    pub requested: usize,
    /// The receive buffer (`SO_RCVBUF`) as read back.
    pub recv: usize,
    /// The send buffer (`SO_SNDBUF`) as read back.
    pub send: usize,
}

impl SocketBuffers {
    /// What a buffer that was fully granted reads back as.
    fn granted_reads(requested: usize) -> usize {
        if cfg!(target_os = "linux") {
            requested.saturating_mul(2)
        } else {
            requested
        }
    }

    /// Whether the kernel granted less receive buffer than asked.
    pub fn recv_capped(&self) -> bool {
        self.recv < Self::granted_reads(self.requested)
    }

    /// Whether the kernel granted less send buffer than asked.
    pub fn send_capped(&self) -> bool {
        self.send < Self::granted_reads(self.requested)
    }
}

/// Asks for `requested` bytes of receive and send buffer on `socket`, forcing
/// past the system's cap where the process may, and reports what it got.
/// Never fails: a socket with small buffers still works, only lossier.
pub(crate) fn enlarge_buffers(socket: &std::net::UdpSocket, requested: usize) -> SocketBuffers {
    let raw = socket2::SockRef::from(socket);
    let _ = raw.set_recv_buffer_size(requested);
    let _ = raw.set_send_buffer_size(requested);
    let read = |raw: &socket2::SockRef<'_>| SocketBuffers {
        requested,
        recv: raw.recv_buffer_size().unwrap_or(0),
        send: raw.send_buffer_size().unwrap_or(0),
    };
    let mut buffers = read(&raw);
    #[cfg(target_os = "linux")]
    if buffers.recv_capped() || buffers.send_capped() {
        // Needs CAP_NET_ADMIN; EPERM otherwise, which leaves the capped size.
        if buffers.recv_capped() {
            let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(socket, requested);
        }
        if buffers.send_capped() {
            let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(socket, requested);
        }
        buffers = read(&raw);
    }
    if buffers.recv_capped() || buffers.send_capped() {
        tracing::warn!(
            requested,
            recv = buffers.recv,
            send = buffers.send,
            "the kernel capped the UDP socket buffers; datagrams may be dropped under bursts \
             (on Linux raise net.core.rmem_max and net.core.wmem_max)"
        );
    }
    buffers
}

/// An [`AsyncUdpSocket`] that reports its own drop.
pub(crate) struct ObservedSocket {
    // Dropped before `released`: the receiver hears of the drop only once
    // the socket is closed.
    inner: Option<Arc<dyn AsyncUdpSocket>>,
    released: Option<oneshot::Sender<()>>,
}

impl ObservedSocket {
    /// Wraps `inner`; the receiver completes when the socket is closed.
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>) -> (Arc<ObservedSocket>, Released) {
        let (released, receiver) = oneshot::channel();
        let socket = ObservedSocket {
            inner: Some(inner),
            released: Some(released),
        };
        (Arc::new(socket), Released(receiver))
    }

    fn inner(&self) -> &Arc<dyn AsyncUdpSocket> {
        self.inner.as_ref().expect("present until dropped")
    }
}

impl Drop for ObservedSocket {
    fn drop(&mut self) {
        drop(self.inner.take());
        drop(self.released.take());
    }
}

impl fmt::Debug for ObservedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedSocket")
            .field("inner", &self.inner)
            .finish()
    }
}

/// Completes when the socket of an endpoint has been closed.
#[derive(Debug)]
pub(crate) struct Released(oneshot::Receiver<()>);

impl Released {
    pub(crate) async fn wait(self) {
        let _ = self.0.await;
    }
}

/// A poller that keeps the wrapper (and so the signal) alive while it lives.
struct ObservedPoller {
    inner: Pin<Box<dyn UdpPoller>>,
    _socket: Arc<ObservedSocket>,
}

impl fmt::Debug for ObservedPoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedPoller").finish_non_exhaustive()
    }
}

impl UdpPoller for ObservedPoller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_writable(cx)
    }
}

impl AsyncUdpSocket for ObservedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        let inner = self.inner().clone().create_io_poller();
        Box::pin(ObservedPoller {
            inner,
            _socket: self,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size.filter(|&s| s > 0) else {
            return self.inner().try_send(transmit);
        };
        if transmit.contents.len() <= MAX_GSO_BATCH {
            return self.inner().try_send(transmit);
        }
        // Too big for one sendmsg: as many whole packets per call as fit.
        let per_call = (MAX_GSO_BATCH / segment).max(1) * segment;
        for (i, chunk) in transmit.contents.chunks(per_call).enumerate() {
            let part = Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: chunk,
                segment_size: (chunk.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            };
            match self.inner().try_send(&part) {
                Ok(()) => {}
                // Nothing sent yet: quinn retries the whole transmit.
                Err(e) if i == 0 => return Err(e),
                // Part sent: the rest counts as lost and is sent again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner().poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner().max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner().max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner().may_fragment()
    }
}
