//! Carrying one call over its stream: opening it, writing the call, reading
//! the reply, and abandoning both directions when the state machine says so.
//!
//! A small call is opened and written at once, from whichever task pumps the
//! machine (the caller's, usually), and its reply is read by the future the
//! caller awaits: no task per call. A call that must wait (for stream credit,
//! or to write a large message) is carried by a task; so is the reply of a call
//! whose caller does not poll for it while the client is at its in-flight
//! limit (see [`Driver::detach_unpolled`](crate::driver::Driver)).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use teleport_protocol::client::{ConnId, ReplyFailure};
use teleport_protocol::{Call, Message, RequestId, StreamCode};
use teleport_quic::{Connection, Outgoing, RecvStream, SendStream, TransportError};
use tokio::sync::oneshot;

use crate::driver::Driver;

/// The rest of one call's work, as a future.
pub(crate) type CallIo = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How sending a call went, right away.
pub(crate) enum Sent {
    /// Written; this future reads the reply.
    ReadReply(CallIo),
    /// Not written yet: this future writes it and reads the reply (in a task).
    Carry(CallIo),
    /// No stream credit now: try again, in order, when credit comes.
    NoCredit(Call, oneshot::Receiver<StreamCode>),
}

/// Opens a stream for `call` and writes it now if it fits. `stop` abandons
/// the stream with the code sent.
pub(crate) fn send_now(
    driver: &Arc<Driver>,
    conn: ConnId,
    connection: &Connection,
    call: Call,
    stop: oneshot::Receiver<StreamCode>,
) -> Sent {
    let id = call.request_id;
    let (mut send, recv) = match connection.try_open_stream() {
        Some(Ok(streams)) => streams,
        Some(Err(e)) => {
            let driver = driver.clone();
            return Sent::Carry(Box::pin(
                async move { driver.call_stream_failed(conn, id, e) },
            ));
        }
        None => return Sent::NoCredit(call, stop),
    };
    let mut outgoing = match Outgoing::new(&Message::Call(call)) {
        Ok(outgoing) => outgoing,
        Err(e) => {
            let driver = driver.clone();
            return Sent::Carry(Box::pin(
                async move { driver.call_stream_failed(conn, id, e) },
            ));
        }
    };
    let driver = driver.clone();
    match send.try_send_now(&mut outgoing) {
        Ok(true) => {
            send.finish();
            Sent::ReadReply(Box::pin(read_reply(driver, conn, id, send, recv, stop)))
        }
        Ok(false) => Sent::Carry(Box::pin(async move {
            exchange(driver, conn, id, send, recv, outgoing, stop).await
        })),
        // The server refused the call before reading it all; its reply says why.
        Err(TransportError::StreamStopped(_)) => {
            Sent::ReadReply(Box::pin(read_reply(driver, conn, id, send, recv, stop)))
        }
        Err(e) => Sent::Carry(Box::pin(
            async move { driver.call_stream_failed(conn, id, e) },
        )),
    }
}

/// Carries `call` on a stream opened for it: writes it, reads the reply.
pub(crate) async fn carry(
    driver: Arc<Driver>,
    conn: ConnId,
    send: SendStream,
    recv: RecvStream,
    call: Call,
    stop: oneshot::Receiver<StreamCode>,
) {
    let id = call.request_id;
    match Outgoing::new(&Message::Call(call)) {
        Ok(outgoing) => exchange(driver, conn, id, send, recv, outgoing, stop).await,
        Err(e) => driver.call_stream_failed(conn, id, e),
    }
}

/// Writes the rest of the call, then reads the reply, unless stopped.
async fn exchange(
    driver: Arc<Driver>,
    conn: ConnId,
    id: RequestId,
    mut send: SendStream,
    mut recv: RecvStream,
    mut outgoing: Outgoing,
    mut stop: oneshot::Receiver<StreamCode>,
) {
    let written = tokio::select! {
        written = send.send_outgoing(&mut outgoing) => written,
        code = &mut stop => return abandon(&mut send, &mut recv, code),
    };
    match written {
        Ok(()) => send.finish(),
        // The server refused the call before reading it all; its reply says why.
        Err(TransportError::StreamStopped(_)) => {}
        Err(e) => return driver.call_stream_failed(conn, id, e),
    }
    // The arguments' buffers are released as soon as they are sent.
    drop(outgoing);
    read_reply(driver, conn, id, send, recv, stop).await
}

/// Reads the reply of a call already written, unless stopped.
async fn read_reply(
    driver: Arc<Driver>,
    conn: ConnId,
    id: RequestId,
    mut send: SendStream,
    mut recv: RecvStream,
    mut stop: oneshot::Receiver<StreamCode>,
) {
    let received = tokio::select! {
        received = recv.receive(|_| driver.heard()) => received,
        code = &mut stop => return abandon(&mut send, &mut recv, code),
    };
    // Reading the end spares the server a STOP_SENDING per call.
    recv.try_finish();
    match received {
        Ok(Some(Message::Reply(reply))) => driver.reply_received(conn, id, reply),
        Ok(Some(other)) => driver.reply_failed(
            conn,
            id,
            ReplyFailure::Malformed(format!("a {:?} message instead of a reply", other.kind())),
        ),
        Ok(None) => driver.reply_failed(conn, id, ReplyFailure::Missing),
        Err(e) => driver.call_stream_failed(conn, id, e),
    }
}

/// The call was cancelled or expired: abandon both directions of its stream
/// so neither side keeps moving bytes nobody wants.
fn abandon(
    send: &mut SendStream,
    recv: &mut RecvStream,
    code: Result<StreamCode, oneshot::error::RecvError>,
) {
    let code = code.unwrap_or(StreamCode::Cancelled);
    send.reset(code);
    recv.stop(code);
}
