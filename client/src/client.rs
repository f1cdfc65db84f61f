//! The client handle: making calls.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use teleport_protocol::client::{CallError, CallOptions, StartCallError};
use teleport_protocol::Tree;
use teleport_quic::ToAddress;

use crate::driver::Driver;
use crate::{ClientBuilder, Error, PendingCall};

/// A client of one server. Cheap to clone; every clone shares the
/// connection, which closes when the last clone is dropped (or on
/// [`close`](Client::close)). After losing the server it reconnects for new
/// calls (see [`ClientBuilder::reconnect`]).
#[derive(Clone, Debug)]
pub struct Client {
    handle: Arc<Handle>,
}

/// Dropped when the last `Client` clone is: closes the client. The driver's
/// tasks hold the driver, not this, so they do not keep it alive.
#[derive(Debug)]
struct Handle {
    driver: Arc<Driver>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.driver.close();
    }
}

impl Client {
    /// A builder for a client of the server at `target`, written as people
    /// write addresses: a port (`4433`, `"4433"`, `":4433"`: this machine),
    /// `"host:4433"` (a name, resolved on each connection attempt; every
    /// address it resolves to, IPv4 and IPv6, is tried), `"127.0.0.1:4433"`,
    /// `"[::1]:4433"`, `"quic://host:4433"`, or a `SocketAddr`. A target that
    /// is not an address, or a name that does not resolve, fails the first
    /// connection attempt at once with a message saying why. Choose how to
    /// trust the server ([`pin`](ClientBuilder::pin) or
    /// [`tls`](ClientBuilder::tls)) before connecting.
    pub fn builder(target: impl ToAddress) -> ClientBuilder {
        ClientBuilder::new(target)
    }

    /// A client of a server that dialled in ([`ServerListener`](crate::ServerListener)),
    /// which must present `server_token` in its `Hello` before any call goes
    /// to it. It has one connection: when that ends, its calls fail and it
    /// does not reconnect, whatever [`reconnect`](ClientBuilder::reconnect)
    /// says (the server must dial again, giving a new client). Connect it
    /// ([`ClientBuilder::connect`]) soon: the server's handshake waits for
    /// it only up to its QUIC idle timeout. The builder's `token` is not
    /// sent, and its TLS and transport settings (`pin`, `tls`, `identity`,
    /// `server_name`, `transport`) do not apply: the
    /// [`ServerListener`](crate::ServerListener) holds the certificate and
    /// the transport settings.
    pub fn dialed_in(
        server: crate::DialedServer,
        server_token: impl Into<String>,
    ) -> ClientBuilder {
        server.into_builder(server_token.into())
    }

    pub(crate) fn from_driver(driver: Arc<Driver>) -> Client {
        Client {
            handle: Arc::new(Handle { driver }),
        }
    }

    pub(crate) fn driver(&self) -> &Arc<Driver> {
        &self.handle.driver
    }

    /// Connects if not connected (a client from [`ClientBuilder::build`], or
    /// one that lost its server with reconnecting off), and waits until it
    /// is, or until connecting fails for good or the connect timeout passes.
    pub async fn connect(&self) -> Result<(), Error> {
        self.driver()
            .connect()
            .await
            .map_err(|error| Error::Connect {
                target: self.driver().target().to_owned(),
                error,
            })
    }

    /// Calls the function bound as `method` on `args`, with the default timeout.
    ///
    /// The call is sent at once (or as soon as fewer than `max_in_flight` calls
    /// are in flight and the client is connected); the returned future resolves
    /// to the result. Dropping the future does not stop the call (use
    /// [`PendingCall::cancel`]); if it then fails, the next call returns
    /// [`Error::Unobserved`].
    pub fn call(&self, method: impl Into<String>, args: Tree) -> PendingCall {
        self.call_with_options(method, args, CallOptions::new())
    }

    /// Calls `method` with `request` converted to a tree by
    /// [`to_tree`](teleport_protocol::to_tree), and converts the reply to
    /// `Resp` by [`from_tree`](teleport_protocol::from_tree): [`Array`
    /// ](teleport_protocol::Array) fields travel without copies.
    ///
    /// The request is converted (and the call started) when the future is
    /// first polled. Fails with [`Error::Request`] (the call is not sent) or
    /// [`Error::Response`] when a conversion fails, naming the method and
    /// where in the value; otherwise as [`call`](Self::call).
    ///
    /// ```no_run
    /// # async fn run(client: teleport_client::Client) -> Result<(), teleport_client::Error> {
    /// #[derive(serde::Serialize)]
    /// struct Add { a: i64, b: i64 }
    /// let sum: i64 = client.call_as("add", &Add { a: 2, b: 40 }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call_as<Req, Resp>(&self, method: &str, request: &Req) -> Result<Resp, Error>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let args = to_request(method, request)?;
        let reply = self.call(method, args).await?;
        from_reply(method, reply)
    }

    /// Like [`call`](Self::call), failing with
    /// [`CallError::DeadlineExceeded`] if no reply arrives within `timeout`
    /// (the server is told the deadline too, and drops the call when it passes).
    pub fn call_with_timeout(
        &self,
        method: impl Into<String>,
        args: Tree,
        timeout: Duration,
    ) -> PendingCall {
        self.call_with_options(method, args, CallOptions::new().timeout(timeout))
    }

    /// Like [`call`](Self::call), as `options` say (timeout, idempotence).
    pub fn call_with_options(
        &self,
        method: impl Into<String>,
        args: Tree,
        options: CallOptions,
    ) -> PendingCall {
        let driver = self.driver().clone();
        match driver.start_call(method.into(), args, options) {
            Ok(id) => PendingCall::started(driver, id),
            Err(StartCallError::Unobserved { method, error }) => {
                PendingCall::failed(driver, Error::Unobserved { method, error })
            }
            Err(StartCallError::Closed { cause }) => {
                let error = Error::of_call(cause, driver.target());
                PendingCall::failed(driver, error)
            }
            Err(other) => PendingCall::failed(
                driver,
                Error::Call(CallError::ProtocolViolation {
                    message: other.to_string(),
                }),
            ),
        }
    }

    /// What this client's calls and connections came to since it was
    /// built: calls started, succeeded, failed and re-sent, calls in flight
    /// and queued, connections, bytes in and out.
    pub fn stats(&self) -> crate::ClientStats {
        self.driver().stats()
    }

    /// Calls in flight now (sent and not yet answered).
    pub fn in_flight(&self) -> usize {
        self.driver().with_machine(|m| m.in_flight())
    }

    /// True while the client has a connection that takes calls; false while it
    /// connects or reconnects, and after it was closed or lost the server for
    /// good.
    pub fn connected(&self) -> bool {
        self.driver().with_machine(|m| m.is_connected())
    }

    /// The server's agent string from its `Hello`, once connected.
    pub fn server_agent(&self) -> Option<String> {
        self.driver()
            .with_machine(|m| m.peer_agent().map(str::to_owned))
    }

    /// The current round-trip time estimate (zero when not connected).
    pub fn rtt(&self) -> Duration {
        self.driver().rtt()
    }

    /// True once the client takes no more calls: it was closed, or it lost the
    /// server with reconnecting disabled (until [`connect`](Self::connect)).
    pub fn is_closed(&self) -> bool {
        self.driver().with_machine(|m| m.is_closed() || m.is_lost())
    }

    /// Closes the client: pending calls fail with [`CallError::Closed`], the
    /// server is told goodbye. Returns at once; await
    /// [`closed`](Self::closed) to know it is done.
    pub fn close(&self) {
        self.driver().close();
    }

    /// Waits until the client takes no more calls (it was closed, by
    /// [`close`](Self::close) or by dropping every clone, and its connection
    /// with it; or it lost its server with reconnecting off), and says why the
    /// last connection ended.
    pub async fn closed(&self) -> String {
        self.driver().closed().await
    }
}

/// A typed call's request as a tree.
pub(crate) fn to_request<Req: Serialize + ?Sized>(
    method: &str,
    request: &Req,
) -> Result<Tree, Error> {
    teleport_protocol::to_tree(request).map_err(|error| Error::Request {
        method: method.to_owned(),
        error,
    })
}

/// A typed call's reply as the type asked for.
pub(crate) fn from_reply<Resp: DeserializeOwned>(method: &str, reply: Tree) -> Result<Resp, Error> {
    teleport_protocol::from_tree(reply).map_err(|error| Error::Response {
        method: method.to_owned(),
        error,
    })
}
