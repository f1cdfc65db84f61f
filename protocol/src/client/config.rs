//! The settings of a client's state machine.

use alloc::string::String;
use core::fmt;
use core::time::Duration;

use crate::Backoff;

/// The agent string sent in the client's `Hello` by default.
pub const DEFAULT_AGENT: &str = concat!("teleport-rs/", env!("CARGO_PKG_VERSION"), " client");

/// Settings of a [`ClientProtocol`](super::ClientProtocol).
///
/// Start from [`ClientConfig::default()`] and change the fields you need.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Calls in flight at once (sent and not yet answered), across
    /// reconnections; later calls wait their turn in the order they were made.
    /// Default 16; 0 is treated as 1; `usize::MAX` is unbounded.
    pub max_in_flight: usize,
    /// While calls are in flight and nothing has been heard from the server
    /// for this long, send a ping (at most one per interval). `None` sends no
    /// pings. Default 1 s; anything under 1 ms is treated as 1 ms.
    pub ping_interval: Option<Duration>,
    /// While calls are in flight, a server silent for longer than this is
    /// declared dead: its connection is closed and its calls fail with
    /// [`CallError::NotAlive`](super::CallError::NotAlive) (or are sent again,
    /// if idempotent). `None` never declares it dead (deadlines still apply).
    /// Default 5 s: a live server answers pings even while its functions run
    /// for minutes.
    pub max_age: Option<Duration>,
    /// The timeout of calls started without one. Default `None` (no deadline).
    pub default_timeout: Option<Duration>,
    /// Names this client in its `Hello`. Default [`DEFAULT_AGENT`].
    pub agent: String,
    /// The shared token the server expects, if any. Never printed by `Debug`.
    pub token: Option<String>,
    /// The token the server must send in its `Hello`, for a server that
    /// dialled this client (which anyone can do, so its certificate proves
    /// nothing): a server whose `Hello` lacks it is refused before any call
    /// goes to it. Compared in constant time. Default `None` (the
    /// certificate is the server's proof). Never printed by `Debug`.
    pub server_token: Option<String>,
    /// Whether, and how fast, a lost connection is replaced. `None`: not at
    /// all; calls after a loss fail with its cause until the application
    /// connects again. Default [`Backoff::default()`].
    pub reconnect: Option<Backoff>,
    /// Whether calls in flight when a connection is lost are sent again on
    /// the next one, as if every method were idempotent. Per call, the
    /// caller's choice wins. Default false: calls are at-most-once.
    pub resend_lost_calls: bool,
    /// How long a `connect()` keeps trying before it gives up, and how long a
    /// call made while there is no connection (and that has no timeout of its
    /// own) waits for one. Default 10 s.
    pub connect_timeout: Duration,
    /// How long the first connection attempt may take before it is abandoned
    /// and a new one started; each failed attempt doubles it, up to
    /// `connect_timeout`. Short first attempts reach a server that starts
    /// just after the client without waiting for QUIC's first retransmission
    /// (about a second). Default 250 ms.
    pub first_attempt_timeout: Duration,
    /// Whether the failure of a call nobody awaits (its future was dropped) is
    /// reported by the next call started. Default true.
    pub raise_unobserved: bool,
    /// After the server's `Goodbye`, how long replies it sent before it may
    /// still arrive on their streams before the calls still in flight fail.
    /// Default 2 s.
    pub goodbye_wait: Duration,
    /// After this client's own `Goodbye`, how long it waits for the server to
    /// acknowledge it before closing the connection anyway. Default 1 s.
    pub close_wait: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_in_flight: 16,
            ping_interval: Some(Duration::from_secs(1)),
            max_age: Some(Duration::from_secs(5)),
            default_timeout: None,
            agent: String::from(DEFAULT_AGENT),
            token: None,
            server_token: None,
            reconnect: Some(Backoff::default()),
            resend_lost_calls: false,
            connect_timeout: Duration::from_secs(10),
            first_attempt_timeout: Duration::from_millis(250),
            raise_unobserved: true,
            goodbye_wait: Duration::from_secs(2),
            close_wait: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("max_in_flight", &self.max_in_flight)
            .field("ping_interval", &self.ping_interval)
            .field("max_age", &self.max_age)
            .field("default_timeout", &self.default_timeout)
            .field("agent", &self.agent)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "server_token",
                &self.server_token.as_ref().map(|_| "<redacted>"),
            )
            .field("reconnect", &self.reconnect)
            .field("resend_lost_calls", &self.resend_lost_calls)
            .field("connect_timeout", &self.connect_timeout)
            .field("first_attempt_timeout", &self.first_attempt_timeout)
            .field("raise_unobserved", &self.raise_unobserved)
            .field("goodbye_wait", &self.goodbye_wait)
            .field("close_wait", &self.close_wait)
            .finish()
    }
}
