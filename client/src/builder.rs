//! Settings of a client: the [`ClientBuilder`].

use std::time::Duration;

use teleport_protocol::client::ClientConfig;
use teleport_protocol::{Backoff, Limits};
use teleport_quic::{AddressError, ClientTls, Fingerprint, Identity, ToAddress, TransportConfig};

use crate::dialed::DialedIn;
use crate::driver::{Driver, Settings};
use crate::{Client, Error};

/// Settings of a client. Start from [`Client::builder`].
#[derive(Debug)]
pub struct ClientBuilder {
    settings: Settings,
    config: ClientConfig,
}

impl ClientBuilder {
    pub(crate) fn new(target: impl ToAddress) -> ClientBuilder {
        let address = target.to_address();
        ClientBuilder {
            settings: Settings {
                target: match &address {
                    Ok(address) => address.to_string(),
                    Err(AddressError::Invalid { input, .. }) => input.clone(),
                    Err(e) => e.to_string(),
                },
                address,
                server_name: None,
                tls: None,
                identity: None,
                transport: TransportConfig::default(),
                limits: Limits::default(),
                dialed_in: None,
            },
            config: ClientConfig::default(),
        }
    }

    /// The builder of [`Client::dialed_in`].
    pub(crate) fn dialed_in(
        remote_addr: std::net::SocketAddr,
        dialed_in: DialedIn,
        server_token: String,
    ) -> ClientBuilder {
        let mut builder = ClientBuilder::new(remote_addr);
        builder.settings.dialed_in = Some(dialed_in);
        builder.config.server_token = Some(server_token);
        // Nothing can dial the server back: once its connection is gone, it
        // must dial again.
        builder.config.reconnect = None;
        builder
    }

    /// Trust only the server whose certificate has this SHA-256 fingerprint
    /// (what a server with a self-signed certificate prints).
    pub fn pin(mut self, fingerprint: Fingerprint) -> Self {
        self.settings.tls = Some(ClientTls::pinned(fingerprint));
        self
    }

    /// Trust servers as `tls` says (CA roots, pins, ...).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.settings.tls = Some(tls);
        self
    }

    /// Trust any server. The connection is encrypted but not authenticated:
    /// anyone on the path can impersonate the server. Tests only.
    pub fn insecure_skip_verification(mut self) -> Self {
        self.settings.tls = Some(ClientTls::insecure_skip_verification());
        self
    }

    /// Present this certificate to servers that require one (mutual TLS).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.settings.identity = Some(identity);
        self
    }

    /// The name the server's certificate must carry when trusting CA roots.
    /// Default: the host of the target (`"example.com"` for
    /// `"example.com:4433"`, the IP address for an address, `localhost` for a
    /// bare port).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.settings.server_name = Some(name.into());
        self
    }

    /// Whether the error of a call whose [`PendingCall`](crate::PendingCall)
    /// was dropped without being awaited is returned by the next call made, as
    /// [`Error::Unobserved`], so failures are not lost. Default true.
    pub fn raise_unobserved_errors(mut self, raise: bool) -> Self {
        self.config.raise_unobserved = raise;
        self
    }

    /// The agent string this client sends in its `Hello` (the server's
    /// functions see it in their `Context`, and its logs name it). Default:
    /// `teleport-rs/<version> client`.
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.config.agent = agent.into();
        self
    }

    /// The shared token the server requires. Not sent to a server that
    /// dialled in ([`Client::dialed_in`]): before it proves itself it may be
    /// anyone, and a server that dialled this side checked its certificate.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.config.token = Some(token.into());
        self
    }

    /// Calls in flight at once; more wait their turn in the order they were
    /// made. Default 16; `usize::MAX` for no bound. The limit holds across
    /// reconnections.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.config.max_in_flight = max_in_flight.max(1);
        self
    }

    /// No bound on the calls in flight (the same as `max_in_flight(usize::MAX)`):
    /// every call is sent at once. The server's own limit still applies: calls
    /// beyond the streams it allows wait for one, in order.
    pub fn unbounded_in_flight(self) -> Self {
        self.max_in_flight(usize::MAX)
    }

    /// The timeout of calls made without one. Default none.
    pub fn default_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.default_timeout = timeout;
        self
    }

    /// Ping a server silent this long while calls are in flight. Default
    /// 1 s; `None` never pings.
    pub fn ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.config.ping_interval = interval;
        self
    }

    /// Declare a server silent this long while calls are in flight dead and
    /// fail its calls. Default 5 s; `None` never declares it dead (deadlines
    /// still apply). Keep it well above `ping_interval` and the round trip: a
    /// live server answers pings even while its functions run long.
    pub fn max_age(mut self, max_age: Option<Duration>) -> Self {
        self.config.max_age = max_age;
        self
    }

    /// QUIC windows and timers.
    pub fn transport(mut self, transport: TransportConfig) -> Self {
        self.settings.transport = transport;
        self
    }

    /// Bounds on every reply received.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.settings.limits = limits;
        self
    }

    /// How long [`connect`](Self::connect) keeps trying, and how long a call
    /// made while the client is not connected (and that has no timeout of
    /// its own) waits for a connection. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Whether the client opens a new connection after losing one (the server
    /// restarted, the network failed, the server fell silent past `max_age`).
    /// Default true. Calls made while it reconnects wait for the new
    /// connection (see [`connect_timeout`](Self::connect_timeout)). With
    /// `false`, every call after the loss fails with the error the
    /// connection ended with, until [`Client::connect`] succeeds.
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.config.reconnect = reconnect.then(|| self.config.reconnect.unwrap_or_default());
        self
    }

    /// The wait between connection attempts: `initial` after a loss, doubling
    /// after each failed attempt up to `max`. Default 50 ms up to 5 s. Implies
    /// [`reconnect(true)`](Self::reconnect).
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.config.reconnect = Some(Backoff {
            initial,
            max: max.max(initial),
        });
        self
    }

    /// Whether calls in flight when the connection is lost are sent again on
    /// the next connection, as if every method of the server were idempotent.
    /// Default false: calls are at-most-once, and a lost connection fails the
    /// calls in flight on it with a connection error (they may or may not
    /// have run). Choose per call with
    /// [`CallOptions::idempotent`](crate::CallOptions::idempotent). A re-sent
    /// call keeps its original deadline.
    pub fn resend_lost_calls(mut self, resend: bool) -> Self {
        self.config.resend_lost_calls = resend;
        self
    }

    /// A client that is not connected yet: it connects on
    /// [`Client::connect`] or its first call. Must be called inside a tokio
    /// runtime.
    pub fn build(mut self) -> Client {
        if self.settings.dialed_in.is_some() {
            // See `token`: no secret goes to an unproven peer.
            self.config.token = None;
            // Nothing can dial the server back (whatever `reconnect` said).
            self.config.reconnect = None;
            // The server's handshake is under way already; cutting it short
            // leaves no attempt to make instead.
            self.config.first_attempt_timeout = self.config.connect_timeout;
        }
        Client::from_driver(Driver::new(self.settings, self.config))
    }

    /// Connects, completes the TLS handshake and the `Hello` exchange, trying
    /// again within the connect timeout while the server does not answer (it
    /// may be starting), and fails at once if that cannot work (a wrong pin or
    /// token, a name that does not resolve). Must be called inside a tokio
    /// runtime. To wait for a server that is not up yet without failing, use
    /// [`connect_lazy`](Self::connect_lazy).
    pub async fn connect(self) -> Result<Client, Error> {
        let client = self.build();
        client.connect().await?;
        Ok(client)
    }

    /// Returns a client at once and connects in the background, retrying
    /// (with the reconnect backoff) until the server answers: for a server
    /// that may not be up yet. Calls made meanwhile wait for the connection up
    /// to their timeout (or the connect timeout), then fail with
    /// [`CallError::NotConnected`](crate::CallError::NotConnected), which
    /// carries the last attempt's error (a wrong pin or token shows there).
    /// Must be called inside a tokio runtime.
    pub fn connect_lazy(self) -> Client {
        let client = self.build();
        client.driver().connect_in_background();
        client
    }
}
