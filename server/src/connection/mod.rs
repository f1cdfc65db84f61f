//! One client connection, from its first packet to its close: the driver of
//! its [`ServerProtocol`](teleport_protocol::server::ServerProtocol).
//!
//! The driver decides nothing: the handshake runs until it completes or the
//! machine's Hello deadline closes the connection; the client's first stream
//! is the control stream; every further stream is a call, reported to the
//! machine in the order it was accepted and served by [`call`]: its first
//! step in the accept loop, the rest (if it has to wait) in a task of its
//! own; the timer task calls `handle_timeout` when the machine asks.

mod call;
mod state;

use std::future::IntoFuture;
use std::sync::Arc;

use teleport_protocol::server::ServerConfig;
use teleport_quic::driver::{read_control, spawn_control_writer};
use teleport_quic::{Connection, Incoming};
use tracing::Instrument;

use crate::shared::{ConnectionSlot, ServerShared};

pub(crate) use state::Conn;

/// How a connection begins.
pub(crate) enum Start {
    /// A client's attempt reached the listener: the handshake is to come.
    Incoming(Box<Incoming>),
    /// The server dialled a client that listens for servers: the handshake
    /// is done, and the client's `Hello` comes as from any other (see
    /// [`Server::dial`](crate::Server::dial)).
    Dialed(Connection),
}

impl Start {
    fn remote_addr(&self) -> std::net::SocketAddr {
        match self {
            Start::Incoming(incoming) => incoming.remote_addr(),
            Start::Dialed(connection) => connection.remote_addr(),
        }
    }
}

/// Serves one connection in a task of its own, so a handshake that stalls
/// delays no other client. `config` is the machine's.
pub(crate) fn spawn(
    start: Start,
    slot: ConnectionSlot,
    shared: Arc<ServerShared>,
    config: ServerConfig,
) {
    let id = shared.next_connection_id();
    let peer = start.remote_addr();
    let span = tracing::info_span!("connection", id, %peer);
    tokio::spawn(
        async move {
            let conn = Arc::new(Conn::new(
                id,
                peer,
                shared.clone(),
                slot.authentication(),
                config,
            ));
            // Both held until the task ends, however it ends.
            let _live = shared.register(&conn);
            let _slot = slot;
            // A connection made while the server drains drains too.
            if let Some(deadline) = shared.shutdown_deadline() {
                conn.begin_shutdown(deadline);
            }
            let timer = tokio::spawn({
                let conn = conn.clone();
                async move {
                    let clock = conn.shared.clock;
                    conn.timer
                        .run(
                            &clock,
                            conn.state(),
                            |state| state.machine.poll_timeout(),
                            |state, now| conn.handle_timeout(state, now),
                        )
                        .await
                }
            });
            drive(&conn, start).await;
            conn.timer.stop();
            let _ = timer.await;
            tracing::debug!("connection finished");
        }
        .instrument(span),
    );
}

/// The TLS handshake of a client's attempt, or `None` if it failed or the
/// connection ended meanwhile.
async fn handshake(conn: &Arc<Conn>, incoming: Incoming) -> Option<Connection> {
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            tracing::info!(error = %e, "a connection attempt could not be accepted");
            return None;
        }
    };
    // The machine's Hello deadline covers the handshake: when it closes the
    // connection, the handshake is abandoned.
    tokio::select! {
        done = connecting.into_future() => match done {
            Ok(connection) => Some(connection),
            Err(e) => {
                tracing::info!(error = %e, "a handshake failed");
                conn.connection_lost();
                None
            }
        },
        _ = conn.wait_ended() => None,
    }
}

/// The connection's life: handshake, control stream, call streams.
async fn drive(conn: &Arc<Conn>, start: Start) {
    let connection = match start {
        Start::Incoming(incoming) => match handshake(conn, *incoming).await {
            Some(connection) => connection,
            None => return,
        },
        Start::Dialed(connection) => connection,
    };
    // Data sections are charged to the connection's share of the server's
    // receive memory as their bytes arrive.
    let budgets = &conn.shared.budgets;
    let connection = connection.with_memory_budget(
        budgets
            .memory
            .child("connection", budgets.connection_memory),
    );
    if !conn.handshake_done(connection.clone()) {
        return;
    }
    // The control stream is the first the client opens.
    let control = tokio::select! {
        accepted = connection.accept_stream() => accepted,
        _ = conn.wait_ended() => return,
    };
    let (send, recv) = match control {
        Ok(streams) => streams,
        Err(e) => {
            tracing::debug!(error = %e, "the connection ended before its control stream");
            conn.connection_lost();
            return;
        }
    };
    let writer = {
        // Weak: the connection holds the writer, not the other way round.
        let conn = Arc::downgrade(conn);
        spawn_control_writer(send, move || {
            if let Some(conn) = conn.upgrade() {
                conn.goodbye_acknowledged();
            }
        })
    };
    {
        let mut state = conn.lock();
        state.control = Some(writer);
        // Anything the machine said before the stream existed goes now.
        conn.pump(&mut state);
    }
    tokio::spawn({
        let conn = conn.clone();
        let heard = conn.clone();
        read_control(
            recv,
            move |_| heard.heard(),
            move |received| conn.control_received(received),
        )
    });
    let mut next_stream = 0;
    loop {
        match connection.accept_stream().await {
            Ok((send, recv)) => {
                // Reported here, in accept (= stream id) order: the order the
                // machine admits calls in.
                conn.call_opened(next_stream);
                // A span per call only when its level is on: even a disabled
                // one is entered on every poll of the call's task. (Without
                // it the task runs in no span, as under a disabled one.)
                let in_span = tracing::enabled!(tracing::Level::DEBUG);
                let serve = call::serve_call(conn.clone(), next_stream, send, recv, in_span);
                if in_span {
                    let span = tracing::debug_span!(
                        "call",
                        stream = next_stream,
                        id = tracing::field::Empty,
                        method = tracing::field::Empty,
                    );
                    call::start(serve.instrument(span), &conn.spawn_next);
                } else {
                    call::start(serve, &conn.spawn_next);
                }
                next_stream += 1;
            }
            Err(e) => {
                tracing::debug!(error = %e, "the connection ended");
                break;
            }
        }
    }
    conn.connection_lost();
}
