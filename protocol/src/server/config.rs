//! The settings of a server connection's state machine.

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::sync::Arc;
use core::fmt;
use core::time::Duration;

use super::Capacity;

/// The agent string sent in the server's `Hello` by default.
pub const DEFAULT_AGENT: &str = concat!("teleport-rs/", env!("CARGO_PKG_VERSION"), " server");

/// Settings of a [`ServerProtocol`](super::ServerProtocol).
///
/// Start from [`ServerConfig::default()`] and change the fields you need.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Calls of one connection admitted at once (handed to the application and
    /// not yet answered); calls beyond are refused with an `OverLimit` error.
    /// Default 64; 0 is treated as 1.
    pub max_in_flight: usize,
    /// Calls admitted at once across every connection that shares this
    /// counter; calls beyond are refused with an `Overloaded` error. `None`:
    /// no server-wide bound.
    pub capacity: Option<Arc<Capacity>>,
    /// The names of the bound functions: a call of any other is refused with
    /// an `UnknownMethod` error before it reaches the application. `None`
    /// admits every name (the application then answers unknown ones itself).
    pub methods: Option<Arc<BTreeSet<String>>>,
    /// The shared token clients must send in their `Hello`, compared in
    /// constant time (only its length is not hidden). `None` accepts any
    /// client (use mutual TLS or a trusted network). Never printed by `Debug`.
    pub token: Option<String>,
    /// The token this server sends in its own `Hello`, proving itself to a
    /// client that cannot tell it from anyone else by its certificate: a
    /// server that dialled its client (a pool's worker), which anyone can
    /// do. Sent only once the client's `Hello` is accepted, over a
    /// connection whose certificate the server checked. Default `None`.
    /// Never printed by `Debug`.
    pub present_token: Option<String>,
    /// Names this server in its `Hello`. Default [`DEFAULT_AGENT`].
    pub agent: String,
    /// How long a new connection may take, from the moment the state machine
    /// is made (make it when the first packet arrives, so the TLS handshake
    /// counts), to deliver an acceptable `Hello`. Default 10 s.
    pub hello_timeout: Duration,
    /// How long a call stream may go without delivering a byte before its call
    /// is complete; then the call is refused, so a client that stops sending
    /// holds neither memory nor the calls behind it. `None`: no bound.
    /// Default 30 s.
    pub call_progress_timeout: Option<Duration>,
    /// After its `Goodbye`, how long the server lets the client read the
    /// replies before it and close the connection itself; then the server
    /// closes it. Default 2 s.
    pub close_timeout: Duration,
    /// A connection with no call open or arriving and no message from the
    /// client for this long is closed with a normal `Goodbye` (clients
    /// reconnect when they next call). `None`: never. Default 10 minutes.
    pub idle_timeout: Option<Duration>,
    /// While the server holds something for the client (a call arriving,
    /// running or being replied to), how long the client may give no sign of
    /// life (no message, no byte of a call, no progress of a reply being
    /// written) before it is presumed dead: its calls are stopped and the
    /// connection is closed with code 4 (peer timeout), so a killed client's
    /// work and reply memory are freed in seconds. Clients ping every second
    /// while they wait (their default `ping_interval`), so a live client
    /// never comes near it; a client with pings off, or pinging less often
    /// than this, must keep its calls shorter, or the server must set it
    /// `None` (never). A connection holding nothing is left to
    /// [`idle_timeout`](Self::idle_timeout). Default 10 s.
    pub peer_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 64,
            capacity: None,
            methods: None,
            token: None,
            present_token: None,
            agent: String::from(DEFAULT_AGENT),
            hello_timeout: Duration::from_secs(10),
            call_progress_timeout: Some(Duration::from_secs(30)),
            close_timeout: Duration::from_secs(2),
            idle_timeout: Some(Duration::from_secs(600)),
            peer_timeout: Some(Duration::from_secs(10)),
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("max_in_flight", &self.max_in_flight)
            .field("capacity", &self.capacity)
            .field("methods", &self.methods.as_ref().map(|m| m.len()))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "present_token",
                &self.present_token.as_ref().map(|_| "<redacted>"),
            )
            .field("agent", &self.agent)
            .field("hello_timeout", &self.hello_timeout)
            .field("call_progress_timeout", &self.call_progress_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("peer_timeout", &self.peer_timeout)
            .finish()
    }
}
