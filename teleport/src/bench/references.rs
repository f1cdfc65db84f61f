//! The stacks a user would pick instead of Teleport, as references measured in
//! the same run: TLS 1.3 over TCP (rustls over tokio's `TcpStream`, with the
//! same certificate) and plain TCP. Bare quinn is `teleport::quic::reference`.
//!
//! One request at a time per connection (k calls in flight take k
//! connections): `[mode: u8][length: u64 LE][payload]`, answered with
//! `[length: u64 LE][bytes]`. Echo sends the payload back; sink answers with
//! the byte count; source reads a byte count and sends that many bytes from a
//! [`KeptPayload`] (as bare quinn's source and Teleport's `source` do).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use teleport::quic::reference::KeptPayload;
use teleport::{ClientTls, Fingerprint, Identity, ServerTls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub(crate) const ECHO: u8 = 0;
pub(crate) const SINK: u8 = 1;
pub(crate) const SOURCE: u8 = 2;

/// A byte stream: plain TCP or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A TLS 1.3 server configuration with `identity`, as Teleport's server has.
pub(crate) fn server_tls(identity: &Identity) -> anyhow::Result<rustls::ServerConfig> {
    Ok(ServerTls::new(identity.clone()).rustls_config()?)
}

/// A TLS 1.3 client configuration that trusts exactly the certificate with
/// `fingerprint`: Teleport's own pinning verifier.
pub(crate) fn client_tls(fingerprint: Fingerprint) -> anyhow::Result<rustls::ClientConfig> {
    Ok(ClientTls::pinned(fingerprint).rustls_config()?)
}

/// An echo/sink/source server over TCP, with TLS or without.
#[derive(Debug)]
pub(crate) struct TcpServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpServer {
    pub(crate) async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<TcpServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = tls.map(TlsAcceptor::from);
        let kept = Arc::new(KeptPayload::default());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let kept = kept.clone();
                tokio::spawn(async move {
                    let _ = match acceptor {
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(stream) => answer(stream, &kept).await,
                            Err(e) => Err(e),
                        },
                        None => answer(stream, &kept).await,
                    };
                });
            }
        });
        Ok(TcpServer { addr, task })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers requests on one connection until the peer closes it.
async fn answer<S: Io>(mut stream: S, kept: &KeptPayload) -> io::Result<()> {
    loop {
        let mut header = [0u8; 9];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u64::from_le_bytes(header[1..].try_into().expect("8 bytes"));
        match header[0] {
            ECHO => {
                let data = read_exactly(&mut stream, len).await?;
                write_message(&mut stream, &data).await?;
            }
            SINK => {
                let mut left = len;
                let mut buffer = vec![0u8; 1 << 20];
                while left > 0 {
                    let want = buffer
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = stream.read(&mut buffer[..want]).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    left -= n as u64;
                }
                write_message(&mut stream, &len.to_le_bytes()).await?;
            }
            SOURCE => {
                let count = read_exactly(&mut stream, len).await?;
                let count: [u8; 8] = count[..]
                    .try_into()
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
                let len = usize::try_from(u64::from_le_bytes(count))
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
                let data = kept.get(len);
                write_message(&mut stream, &data).await?;
            }
            _ => return Err(io::ErrorKind::InvalidData.into()),
        }
    }
}

/// Reads exactly `len` bytes into fresh memory (not zeroed first).
async fn read_exactly<S: Io + ?Sized>(stream: &mut S, len: u64) -> io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    (&mut *stream).take(len).read_to_end(&mut data).await?;
    if data.len() as u64 != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(data)
}

async fn write_message<S: Io + ?Sized>(stream: &mut S, data: &[u8]) -> io::Result<()> {
    write_framed(stream, None, data).await
}

async fn write_framed<S: Io + ?Sized>(
    stream: &mut S,
    mode: Option<u8>,
    data: &[u8],
) -> io::Result<()> {
    let mut header = Vec::with_capacity(9 + data.len().min(64 << 10));
    header.extend(mode);
    header.extend_from_slice(&(data.len() as u64).to_le_bytes());
    if data.len() <= 64 << 10 {
        // Small messages in one write, as a user would buffer them.
        header.extend_from_slice(data);
        stream.write_all(&header).await?;
    } else {
        stream.write_all(&header).await?;
        stream.write_all(data).await?;
    }
    stream.flush().await
}

/// Opens one connection, with TLS if `tls` is given.
pub(crate) async fn connect(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(match tls {
        Some(config) => Box::new(
            TlsConnector::from(config)
                .connect(ServerName::try_from("localhost")?, tcp)
                .await?,
        ),
        None => Box::new(tcp),
    })
}

/// One request on `stream`; returns the reply's bytes.
pub(crate) async fn request(
    stream: &mut Box<dyn Io>,
    mode: u8,
    payload: &[u8],
) -> io::Result<Vec<u8>> {
    write_framed(&mut **stream, Some(mode), payload).await?;
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).await?;
    read_exactly(&mut **stream, u64::from_le_bytes(len)).await
}
