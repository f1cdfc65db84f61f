//! Bare quinn, for benchmarks only: the yardstick Teleport is measured against.
//!
//! The design promises speeds relative to "bare quinn on the same machine, in
//! the same run, with the same TLS and transport settings". This module is that
//! reference: no messages, no request ids, no state machines, just one
//! bidirectional stream per request. The client writes a one-byte mode and the
//! payload and finishes its side; the server reads everything, then either
//! writes the same bytes back ([`ReferenceMode::Echo`]) or answers with the
//! byte count as eight little-endian bytes ([`ReferenceMode::Sink`]), or
//! sends as many bytes as the request asks for ([`ReferenceMode::Source`], from
//! a [`KeptPayload`]).
//!
//! It lives here because this is the only crate that knows quinn. Nothing in
//! Teleport's call path uses it; do not build applications on it (it has no
//! limits on what a peer may send).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use crate::endpoint::bind;
use crate::{quinn_client_config, quinn_server_config};
use crate::{ClientTls, ServerTls, TransportConfig, TransportError};

/// What the reference server does with a request's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferenceMode {
    /// Send the bytes back.
    Echo,
    /// Reply with the number of bytes received (8 bytes, little endian).
    Sink,
    /// The request is a byte count (8 bytes, little endian): reply with that
    /// many zero bytes (freshly allocated, as a server producing data would).
    Source,
}

impl ReferenceMode {
    fn to_byte(self) -> u8 {
        match self {
            ReferenceMode::Echo => 0,
            ReferenceMode::Sink => 1,
            ReferenceMode::Source => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<ReferenceMode> {
        match byte {
            0 => Some(ReferenceMode::Echo),
            1 => Some(ReferenceMode::Sink),
            2 => Some(ReferenceMode::Source),
            _ => None,
        }
    }
}

/// A bare-quinn echo/sink server on one UDP socket. Benchmarks only.
#[derive(Debug)]
pub struct ReferenceServer {
    endpoint: quinn::Endpoint,
    accept: JoinHandle<()>,
}

impl ReferenceServer {
    /// Binds `addr` (port 0 picks a free port) with the same TLS and transport
    /// settings a Teleport [`Listener`](crate::Listener) would use, and starts
    /// answering. Must be called inside a tokio runtime.
    pub fn start(
        addr: SocketAddr,
        tls: &ServerTls,
        transport: &TransportConfig,
    ) -> Result<ReferenceServer, TransportError> {
        // Bound to a loopback address, every peer is on this host: the
        // packet size a Listener would pick for each of them.
        let transport = &transport.for_peer(addr.ip());
        let endpoint = bind(addr, Some(quinn_server_config(tls, transport)?), transport)?;
        let accept = tokio::spawn(accept_loop(endpoint.clone()));
        Ok(ReferenceServer { endpoint, accept })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|error| TransportError::Bind {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                error,
            })
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.accept.abort();
        self.endpoint.close(0u32.into(), b"benchmark over");
    }
}

impl Drop for ReferenceServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// What a benchmark's source sends: `len` bytes of [`KeptPayload::BYTE`],
/// written once and kept for the next request of the same size, as a server
/// sends what it has (fresh memory would measure the allocator's page faults,
/// never-written memory the kernel's shared zero page). A request of another
/// size replaces it; one of 0 bytes lets it go. Shared by every source of
/// `teleport bench`, so all its stacks send alike.
#[derive(Debug, Default)]
pub struct KeptPayload(Mutex<Bytes>);

impl KeptPayload {
    /// The byte every payload is made of.
    pub const BYTE: u8 = 0x5a;

    /// `len` bytes: the kept ones if they are that many, else new ones, kept.
    pub fn get(&self, len: usize) -> Bytes {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() != len {
            // The old payload goes before the new one is made.
            *kept = Bytes::new();
            *kept = Bytes::from(vec![Self::BYTE; len]);
        }
        kept.clone()
    }
}

async fn accept_loop(endpoint: quinn::Endpoint) {
    let kept = Arc::new(KeptPayload::default());
    while let Some(incoming) = endpoint.accept().await {
        let kept = kept.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(answer(send, recv, kept.clone()));
            }
        });
    }
}

/// Reads a whole request, then answers it. Errors end the stream quietly:
/// the client sees them as its own failure.
async fn answer(mut send: quinn::SendStream, mut recv: quinn::RecvStream, kept: Arc<KeptPayload>) {
    let mut mode = None;
    let mut received = 0u64;
    // Chunks are kept as quinn hands them over, so an echo copies nothing.
    let mut chunks: Vec<Bytes> = Vec::new();
    loop {
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                let mut bytes = chunk.bytes;
                if mode.is_none() && !bytes.is_empty() {
                    mode = ReferenceMode::from_byte(bytes[0]);
                    if mode.is_none() {
                        let _ = recv.stop(1u32.into());
                        return;
                    }
                    bytes = bytes.slice(1..);
                }
                received += bytes.len() as u64;
                if matches!(mode, Some(ReferenceMode::Echo | ReferenceMode::Source)) {
                    chunks.push(bytes);
                }
            }
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let written = match mode {
        Some(ReferenceMode::Echo) => send.write_all_chunks(&mut chunks).await.is_ok(),
        Some(ReferenceMode::Sink) => send.write_all(&received.to_le_bytes()).await.is_ok(),
        Some(ReferenceMode::Source) => {
            let mut count = [0u8; 8];
            let mut at = 0;
            for chunk in &chunks {
                for &byte in chunk.iter() {
                    if at < 8 {
                        count[at] = byte;
                        at += 1;
                    }
                }
            }
            let len = usize::try_from(u64::from_le_bytes(count)).unwrap_or(0);
            send.write_chunk(kept.get(len)).await.is_ok()
        }
        None => false,
    };
    if written {
        let _ = send.finish();
    }
}

/// A bare-quinn client of a [`ReferenceServer`]: one connection, one stream
/// per request. Benchmarks only.
#[derive(Debug)]
pub struct ReferenceClient {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

impl ReferenceClient {
    /// Connects with the same TLS and transport settings a Teleport
    /// [`Connector`](crate::Connector) would use.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        tls: &ClientTls,
        transport: &TransportConfig,
    ) -> Result<ReferenceClient, TransportError> {
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let transport = &transport.for_peer(addr.ip());
        let endpoint = bind(local, None, transport)?;
        let connecting = endpoint
            .connect_with(quinn_client_config(tls, transport)?, addr, server_name)
            .map_err(|e| TransportError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let connection = connecting.await?;
        Ok(ReferenceClient {
            endpoint,
            connection,
        })
    }

    /// Sends `payload` on a new stream and returns the whole reply, copied
    /// into one contiguous buffer (as an application would need it).
    pub async fn request(
        &self,
        mode: ReferenceMode,
        payload: Bytes,
    ) -> Result<Bytes, TransportError> {
        let (mut send, mut recv) = self.connection.open_bi().await?;
        let expected = match mode {
            ReferenceMode::Echo => payload.len(),
            ReferenceMode::Sink => 8,
            ReferenceMode::Source => payload
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, |b| usize::try_from(u64::from_le_bytes(b)).unwrap_or(0)),
        };
        let mut chunks = [Bytes::copy_from_slice(&[mode.to_byte()]), payload];
        // Write and read at once, as Teleport's client does, so neither side's
        // flow-control window can stall the other.
        let write = async {
            send.write_all_chunks(&mut chunks).await?;
            // Finishing fails only if the stream is already gone, which the
            // read below reports.
            let _ = send.finish();
            Ok::<(), TransportError>(())
        };
        let read = async {
            let mut reply = BytesMut::with_capacity(expected);
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                reply.extend_from_slice(&chunk.bytes);
            }
            Ok::<Bytes, TransportError>(reply.freeze())
        };
        let (written, reply) = tokio::join!(write, read);
        written?;
        reply
    }

    /// quinn's statistics of the connection: packets sent and lost, the
    /// path's current MTU.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.connection.stats()
    }

    /// Closes the connection and waits briefly for the server to hear it.
    pub async fn close(&self) {
        self.connection.close(0u32.into(), b"benchmark over");
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            self.endpoint.wait_idle(),
        )
        .await;
    }
}
