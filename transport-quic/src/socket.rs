//! The endpoint's UDP socket, wrapped so that its release can be awaited.
//!
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
        self.inner().try_send(transmit)
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
