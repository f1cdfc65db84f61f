//! A client and a server state machine wired back to back in memory, through
//! the real codec, on a virtual clock: for tests and fuzzing (feature `sim`).
//!
//! [`Pair`] models what QUIC gives the drivers: one reliable, ordered control
//! stream each way; one stream per call, delivered in order within the stream
//! but in any order across streams; streams opened implicitly in id order; a
//! connection that can be lost, partitioned (nothing gets through) or closed.
//! Individual messages are never lost (QUIC retransmits them). The test
//! chooses what is delivered when and moves the clock; the harness feeds the
//! machines and records what the application would see.
//!
//! ```
//! use teleport_protocol::sim::Pair;
//! use teleport_protocol::{client::ClientConfig, server::ServerConfig, tree};
//!
//! let mut p = Pair::new(ClientConfig::default(), ServerConfig::default());
//! let id = p.start("f", tree!(1), None);
//! p.settle();
//! let (served, _) = p.take_request().expect("the call reached the server");
//! assert_eq!(served, id);
//! p.answer(id, Ok(tree!(2)));
//! p.settle();
//! assert_eq!(p.result_of(id), Some(&Ok(tree!(2))));
//! ```

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use crate::client::{
    CallError, CallOptions, ClientConfig, ClientOutput, ClientProtocol, ConnId, ConnectError,
    ConnectFailure, ReplyFailure,
};
use crate::server::{CallStreamError, ServerConfig, ServerOutput, ServerProtocol, StreamIndex};
use crate::{
    encode, Decoder, Limits, Message, RemoteError, RequestId, StreamCode, Timestamp, Tree,
};

/// What travels on one stream of the connection, in one direction.
#[derive(Clone, Debug)]
enum Chunk {
    /// An encoded message.
    Message(Vec<u8>),
    /// The sender reset the stream.
    Reset(StreamCode),
}

/// One direction of the connection: a queue per stream (the control stream is
/// `None`), each delivered in order; streams interleave freely.
#[derive(Debug, Default)]
struct Direction {
    streams: BTreeMap<Option<StreamIndex>, VecDeque<Chunk>>,
    /// The sender closed the connection after sending what is queued.
    closed: bool,
}

impl Direction {
    fn push(&mut self, stream: Option<StreamIndex>, chunk: Chunk) {
        self.streams.entry(stream).or_default().push_back(chunk);
    }

    fn pending(&self) -> usize {
        self.streams.values().map(VecDeque::len).sum()
    }

    /// The `pick`-th stream with something queued.
    fn pick(&self, pick: usize) -> Option<Option<StreamIndex>> {
        let ready: Vec<_> = self
            .streams
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(s, _)| *s)
            .collect();
        (!ready.is_empty()).then(|| ready[pick % ready.len()])
    }

    fn pop(&mut self, stream: Option<StreamIndex>) -> Option<Chunk> {
        self.streams.get_mut(&stream)?.pop_front()
    }
}

/// The server end of the current connection.
#[derive(Debug)]
struct ServerSide {
    conn: ConnId,
    machine: ServerProtocol,
    /// Streams the server has been told about (opened).
    opened: StreamIndex,
    /// Calls the application holds: id -> (stream, arguments once they came).
    admitted: BTreeMap<RequestId, Option<Tree>>,
    /// Admitted calls, in the order they were admitted.
    admission_order: Vec<(StreamIndex, RequestId)>,
}

/// The connection between the two, as QUIC would carry it.
#[derive(Debug)]
struct Link {
    conn: ConnId,
    c2s: Direction,
    s2c: Direction,
    /// Call streams the client opened on this connection: stream -> call id.
    client_streams: BTreeMap<StreamIndex, RequestId>,
    /// The client's id -> its stream, for resets.
    stream_of: BTreeMap<RequestId, StreamIndex>,
    next_stream: StreamIndex,
    /// Decoders of the receiving ends, fed continuously (as stream bytes).
    to_server: Decoder,
    to_client: Decoder,
}

/// Something the application or the harness saw.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Observed {
    /// The server application was handed call `id` (admitted, then its
    /// arguments) on `stream` of connection `conn`.
    Admitted {
        /// The connection.
        conn: ConnId,
        /// The stream.
        stream: StreamIndex,
        /// The call.
        id: RequestId,
    },
    /// The server application was told to stop call `id`.
    Stopped {
        /// The call.
        id: RequestId,
    },
    /// A connection closed, by which side and with which code.
    Closed {
        /// The connection.
        conn: ConnId,
        /// True if the server closed it.
        by_server: bool,
    },
}

/// The pair harness. See the [module docs](self).
#[derive(Debug)]
pub struct Pair {
    /// The virtual clock.
    pub now: Timestamp,
    /// The client's state machine.
    pub client: ClientProtocol,
    server_config: ServerConfig,
    server: Option<ServerSide>,
    link: Option<Link>,
    /// Connection attempts the client made and the harness has not answered.
    pending_connects: VecDeque<ConnId>,
    /// Whether a connection attempt finds a server ([`settle`](Self::settle)
    /// answers attempts with it). Default true.
    pub server_up: bool,
    /// Whether the network delivers anything at all (false: a partition, or a
    /// dead server). Default true.
    pub network_up: bool,
    /// Calls completed at the client, in order.
    pub completed: Vec<(RequestId, Result<Tree, CallError>)>,
    /// What `connect()` was answered, in order.
    pub connect_results: Vec<Result<(), ConnectError>>,
    /// Everything else observed, in order.
    pub observed: Vec<Observed>,
    /// Calls started and not yet completed (the model).
    pending: BTreeSet<RequestId>,
    /// Most calls the server application held at once.
    pub max_held: usize,
}

impl Pair {
    /// A pair at time 0; the client connects when [`connect`](Self::connect)
    /// or its first call asks.
    pub fn new(client: ClientConfig, server: ServerConfig) -> Pair {
        Pair {
            now: Timestamp::ZERO,
            client: ClientProtocol::new(Timestamp::ZERO, client),
            server_config: server,
            server: None,
            link: None,
            pending_connects: VecDeque::new(),
            server_up: true,
            network_up: true,
            completed: Vec::new(),
            connect_results: Vec::new(),
            observed: Vec::new(),
            pending: BTreeSet::new(),
            max_held: 0,
        }
    }

    /// A pair already connected (handshake done).
    pub fn connected(client: ClientConfig, server: ServerConfig) -> Pair {
        let mut p = Pair::new(client, server);
        p.connect();
        p.settle();
        assert!(p.client.is_connected(), "the handshake completes");
        p
    }

    /// The application calls `connect()`.
    pub fn connect(&mut self) {
        self.client.connect(self.now);
        self.pump();
    }

    /// The application starts a call.
    pub fn start(&mut self, method: &str, args: Tree, timeout: Option<Duration>) -> RequestId {
        let options = CallOptions {
            timeout,
            ..CallOptions::default()
        };
        self.start_with(method, args, options)
            .expect("the client takes the call")
    }

    /// The application starts a call with options; `None` if refused.
    pub fn start_with(
        &mut self,
        method: &str,
        args: Tree,
        options: CallOptions,
    ) -> Option<RequestId> {
        let id = self
            .client
            .start_call(self.now, method, args, options)
            .ok()?;
        assert!(self.pending.insert(id), "id {id} reused while pending");
        self.pump();
        Some(id)
    }

    /// The application cancels call `id`.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let cancelled = self.client.cancel(self.now, id);
        self.pump();
        cancelled
    }

    /// The application stops waiting for call `id`.
    pub fn abandon(&mut self, id: RequestId) {
        self.client.abandon(self.now, id);
        self.pump();
    }

    /// The application closes the client.
    pub fn close_client(&mut self) {
        self.client.close(self.now);
        self.pump();
    }

    /// The server begins a graceful shutdown with `grace`.
    pub fn shutdown_server(&mut self, grace: Duration) {
        let now = self.now;
        if let Some(server) = &mut self.server {
            server.machine.begin_shutdown(now, now + grace);
        }
        self.pump();
    }

    /// The server application answers call `id`. False if the server no
    /// longer wants the answer.
    pub fn answer(&mut self, id: RequestId, result: Result<Tree, RemoteError>) -> bool {
        let now = self.now;
        let Some(server) = &mut self.server else {
            return false;
        };
        if server.admitted.remove(&id).is_none() {
            return false;
        }
        let taken = server.machine.reply(now, id, result);
        self.pump();
        taken
    }

    /// The calls the server application holds with their arguments complete,
    /// in id order.
    pub fn held(&self) -> Vec<RequestId> {
        self.server.as_ref().map_or(Vec::new(), |s| {
            s.admitted
                .iter()
                .filter(|(_, args)| args.is_some())
                .map(|(&id, _)| id)
                .collect()
        })
    }

    /// The first call the server application holds, with its arguments.
    pub fn take_request(&mut self) -> Option<(RequestId, Tree)> {
        let server = self.server.as_ref()?;
        server
            .admitted
            .iter()
            .find_map(|(&id, args)| args.clone().map(|a| (id, a)))
    }

    /// The order the server admitted calls in on the current connection:
    /// (stream, id).
    pub fn admission_order(&self) -> &[(StreamIndex, RequestId)] {
        self.server
            .as_ref()
            .map_or(&[][..], |s| &s.admission_order[..])
    }

    /// The result of call `id`, once completed.
    pub fn result_of(&self, id: RequestId) -> Option<&Result<Tree, CallError>> {
        self.completed
            .iter()
            .find(|(done, _)| *done == id)
            .map(|(_, r)| r)
    }

    /// Calls started and not completed.
    pub fn pending(&self) -> &BTreeSet<RequestId> {
        &self.pending
    }

    /// The server's state machine on the current connection.
    pub fn server(&self) -> Option<&ServerProtocol> {
        self.server.as_ref().map(|s| &s.machine)
    }

    /// Messages and resets in flight, both ways.
    pub fn in_flight(&self) -> usize {
        self.link
            .as_ref()
            .map_or(0, |l| l.c2s.pending() + l.s2c.pending())
    }

    /// Answers the oldest pending connection attempt: the server accepts it
    /// if `server_up`, otherwise it fails as unreachable. False if none.
    pub fn answer_connect(&mut self) -> bool {
        let Some(conn) = self.pending_connects.pop_front() else {
            return false;
        };
        if self.server_up && self.network_up {
            self.drop_link();
            self.server = Some(ServerSide {
                conn,
                machine: ServerProtocol::new(self.now, self.server_config.clone()),
                opened: 0,
                admitted: BTreeMap::new(),
                admission_order: Vec::new(),
            });
            self.link = Some(Link {
                conn,
                c2s: Direction::default(),
                s2c: Direction::default(),
                client_streams: BTreeMap::new(),
                stream_of: BTreeMap::new(),
                next_stream: 0,
                to_server: Decoder::new(Limits::default()),
                to_client: Decoder::new(Limits::default()),
            });
            self.client.connected(self.now, conn);
        } else {
            let failure = ConnectFailure::Unreachable(String::from("no server"));
            self.client.connect_failed(self.now, conn, failure);
        }
        self.pump();
        true
    }

    /// Delivers one chunk from client to server, on the `pick`-th stream that
    /// has one. False if nothing could be delivered.
    pub fn deliver_to_server(&mut self, pick: usize) -> bool {
        if !self.network_up {
            return false;
        }
        let Some(link) = &mut self.link else {
            return false;
        };
        let Some(stream) = link.c2s.pick(pick) else {
            if link.c2s.closed {
                // The client's close arrives after everything it sent.
                link.c2s.closed = false;
                if let Some(server) = &mut self.server {
                    server.machine.connection_lost(self.now);
                }
                self.observed.push(Observed::Closed {
                    conn: link.conn,
                    by_server: false,
                });
                self.pump();
                self.server = None;
                self.link = None;
                return true;
            }
            return false;
        };
        let chunk = link.c2s.pop(stream).expect("picked a non-empty stream");
        let now = self.now;
        let Some(server) = &mut self.server else {
            return true;
        };
        let machine = &mut server.machine;
        match stream {
            None => {
                let Chunk::Message(bytes) = chunk else {
                    unreachable!("the control stream is never reset")
                };
                match decode(&mut link.to_server, &bytes) {
                    Ok(message) => {
                        let _ = machine.handle_message(now, message);
                    }
                    Err(e) => machine.protocol_violation(now, e),
                }
            }
            Some(index) => {
                // QUIC opens every lower stream implicitly, in id order.
                while server.opened <= index {
                    machine.call_opened(now, server.opened);
                    server.opened += 1;
                }
                match chunk {
                    Chunk::Reset(code) => {
                        machine.call_unreadable(now, index, CallStreamError::Reset(code.code()))
                    }
                    Chunk::Message(bytes) => {
                        let mut decoder = Decoder::new(Limits::default());
                        match decode(&mut decoder, &bytes) {
                            Ok(Message::Call(call)) => machine.call_received(now, index, call),
                            Ok(other) => machine.call_unreadable(
                                now,
                                index,
                                CallStreamError::NotACall(other.kind()),
                            ),
                            Err(e) => {
                                machine.call_unreadable(now, index, CallStreamError::Malformed(e))
                            }
                        }
                    }
                }
            }
        }
        self.pump();
        true
    }

    /// Delivers one chunk from server to client, on the `pick`-th stream that
    /// has one. False if nothing could be delivered.
    pub fn deliver_to_client(&mut self, pick: usize) -> bool {
        if !self.network_up {
            return false;
        }
        let Some(link) = &mut self.link else {
            return false;
        };
        let conn = link.conn;
        let now = self.now;
        let Some(stream) = link.s2c.pick(pick) else {
            if link.s2c.closed {
                self.link = None;
                self.server = None;
                self.client
                    .connection_lost(now, conn, "the server closed the connection");
                self.pump();
                return true;
            }
            return false;
        };
        let chunk = link.s2c.pop(stream).expect("picked a non-empty stream");
        self.client.heard_from_peer(now, conn);
        match (stream, chunk) {
            (None, Chunk::Message(bytes)) => match decode(&mut link.to_client, &bytes) {
                Ok(message) => {
                    let _ = self.client.handle_message(now, conn, message);
                }
                Err(e) => self.client.protocol_violation(now, conn, e),
            },
            (None, Chunk::Reset(_)) => unreachable!("the control stream is never reset"),
            (Some(index), chunk) => {
                if let Some(&id) = link.client_streams.get(&index) {
                    match chunk {
                        Chunk::Reset(code) => {
                            self.client
                                .reply_failed(now, conn, id, ReplyFailure::Reset(code))
                        }
                        Chunk::Message(bytes) => {
                            let mut decoder = Decoder::new(Limits::default());
                            match decode(&mut decoder, &bytes) {
                                Ok(Message::Reply(reply)) => {
                                    self.client.reply_received(now, conn, id, reply)
                                }
                                Ok(_) => self.client.reply_failed(
                                    now,
                                    conn,
                                    id,
                                    ReplyFailure::Malformed(String::from("not a reply")),
                                ),
                                Err(e) => self.client.reply_failed(
                                    now,
                                    conn,
                                    id,
                                    ReplyFailure::Malformed(e),
                                ),
                            }
                        }
                    }
                }
            }
        }
        self.pump();
        true
    }

    /// Queues `message` to the server on the control stream, as if the client
    /// had sent it (a buggy or hostile client).
    pub fn inject_to_server(&mut self, message: &Message) {
        if let Some(link) = &mut self.link {
            link.c2s.push(None, Chunk::Message(bytes_of(message)));
        }
    }

    /// Queues `bytes` (anything at all) to the server on a call stream of its
    /// own, opened after the client's.
    pub fn inject_call_stream(&mut self, bytes: Vec<u8>) {
        if let Some(link) = &mut self.link {
            let index = link.next_stream;
            link.next_stream += 1;
            link.c2s.push(Some(index), Chunk::Message(bytes));
        }
    }

    /// Queues `message` to the client on the control stream, as if the server
    /// had sent it.
    pub fn inject_to_client(&mut self, message: &Message) {
        if let Some(link) = &mut self.link {
            link.s2c.push(None, Chunk::Message(bytes_of(message)));
        }
    }

    /// Queues `message` to the client on the stream of its call `id`, as if
    /// the server had answered with it. False if `id` has no stream.
    pub fn inject_on_call_stream(&mut self, id: RequestId, message: &Message) -> bool {
        let Some(link) = &mut self.link else {
            return false;
        };
        let Some(&index) = link.stream_of.get(&id) else {
            return false;
        };
        link.s2c
            .push(Some(index), Chunk::Message(bytes_of(message)));
        true
    }

    /// Delivers everything deliverable, in a fixed order, until nothing
    /// moves; answers connection attempts as `server_up` says.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            let moved =
                self.answer_connect() || self.deliver_to_server(0) || self.deliver_to_client(0);
            if !moved {
                return;
            }
        }
        panic!("the pair did not settle");
    }

    /// The transport fails: both sides learn the connection is lost.
    pub fn lose_connection(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        if let Some(server) = &mut self.server {
            server.machine.connection_lost(self.now);
        }
        self.client
            .connection_lost(self.now, link.conn, "the transport failed");
        self.pump();
        self.server = None;
    }

    /// Moves the clock to `to` through every timer due on the way; with
    /// `deliver`, the network settles at each step too.
    pub fn advance(&mut self, to: Timestamp, deliver: bool) {
        loop {
            if deliver {
                self.settle();
            }
            let next = [
                self.client.poll_timeout(),
                self.server.as_ref().and_then(|s| s.machine.poll_timeout()),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= to => {
                    self.now = self.now.max(t);
                    self.client.handle_timeout(self.now);
                    if let Some(server) = &mut self.server {
                        server.machine.handle_timeout(self.now);
                    }
                    self.pump();
                }
                _ => break,
            }
        }
        self.now = self.now.max(to);
        if deliver {
            self.settle();
        }
    }

    fn drop_link(&mut self) {
        self.link = None;
        self.server = None;
    }

    /// Carries out both machines' outputs until neither has any.
    pub fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(output) = self.client.poll_output() {
                moved = true;
                self.client_output(output);
            }
            while let Some(output) = self.server.as_mut().and_then(|s| s.machine.poll_output()) {
                moved = true;
                self.server_output(output);
            }
            if !moved {
                break;
            }
        }
        if let Some(server) = &self.server {
            let held = server.admitted.len();
            self.max_held = self.max_held.max(held);
            assert!(
                held <= server.machine.config().max_in_flight,
                "the server application holds {held} calls, over the connection's limit"
            );
        }
        assert!(self.client.in_flight() <= self.client.config().max_in_flight);
    }

    fn client_output(&mut self, output: ClientOutput) {
        match output {
            ClientOutput::Connect { conn } => self.pending_connects.push_back(conn),
            ClientOutput::Transmit { conn, message } => {
                if let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) {
                    link.c2s.push(None, Chunk::Message(bytes_of(&message)));
                }
            }
            ClientOutput::Send { conn, call } => {
                if let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) {
                    let index = link.next_stream;
                    link.next_stream += 1;
                    link.client_streams.insert(index, call.request_id);
                    link.stream_of.insert(call.request_id, index);
                    let bytes = bytes_of(&Message::Call(call));
                    link.c2s.push(Some(index), Chunk::Message(bytes));
                }
            }
            ClientOutput::AbandonCall { conn, id, code } => {
                if let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) {
                    if let Some(&index) = link.stream_of.get(&id) {
                        // What was not delivered yet is replaced by the reset;
                        // a stream already read to its end ignores it.
                        if let Some(q) = link.c2s.streams.get_mut(&Some(index)) {
                            if !q.is_empty() {
                                q.clear();
                                q.push_back(Chunk::Reset(code));
                            }
                        }
                        link.client_streams.remove(&index);
                        link.s2c.streams.remove(&Some(index));
                    }
                }
            }
            ClientOutput::CloseConnection { conn, .. } => {
                self.pending_connects.retain(|&c| c != conn);
                if let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) {
                    link.c2s.closed = true;
                    // The client reads nothing more of it.
                    link.s2c = Direction::default();
                    self.client_closed_link(conn);
                }
            }
            ClientOutput::Completed { id, result, .. } => {
                assert!(
                    self.pending.remove(&id),
                    "call {id} completed twice or was never started"
                );
                self.completed.push((id, result));
            }
            ClientOutput::ConnectResult(result) => self.connect_results.push(result),
        }
    }

    /// After the client closed a connection, only its close is still to be
    /// delivered to the server.
    fn client_closed_link(&mut self, conn: ConnId) {
        if let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) {
            for q in link.c2s.streams.values_mut() {
                q.clear();
            }
        }
    }

    fn server_output(&mut self, output: ServerOutput) {
        let Some(server) = &mut self.server else {
            return;
        };
        let conn = server.conn;
        match output {
            ServerOutput::Transmit(message) => {
                if let Some(link) = &mut self.link {
                    link.s2c.push(None, Chunk::Message(bytes_of(&message)));
                }
            }
            ServerOutput::Admitted { stream, id, .. } => {
                assert!(
                    server.machine.is_authenticated(),
                    "no call before the Hello"
                );
                if let Some(&(last, _)) = server.admission_order.last() {
                    assert!(last < stream, "admitted out of stream order");
                }
                server.admission_order.push((stream, id));
                assert!(server.admitted.insert(id, None).is_none());
                self.observed.push(Observed::Admitted { conn, stream, id });
            }
            ServerOutput::Arguments { id, args, .. } => {
                let slot = server
                    .admitted
                    .get_mut(&id)
                    .expect("arguments follow admission");
                assert!(slot.is_none(), "arguments handed over twice");
                *slot = Some(args);
            }
            ServerOutput::Stop { id, .. } => {
                server.admitted.remove(&id);
                self.observed.push(Observed::Stopped { id });
            }
            ServerOutput::Reply { stream, reply, .. } => {
                if let Some(link) = &mut self.link {
                    let bytes = bytes_of(&Message::Reply(reply));
                    link.s2c.push(Some(stream), Chunk::Message(bytes));
                }
                // Writing is instant here.
                server.machine.reply_sent(self.now, stream);
            }
            ServerOutput::Reset { stream, code } => {
                if let Some(link) = &mut self.link {
                    let q = link.s2c.streams.entry(Some(stream)).or_default();
                    q.clear();
                    q.push_back(Chunk::Reset(code));
                }
            }
            ServerOutput::Close { .. } => {
                if let Some(link) = &mut self.link {
                    link.s2c.closed = true;
                    // The server reads nothing more.
                    link.c2s = Direction::default();
                }
                self.observed.push(Observed::Closed {
                    conn,
                    by_server: true,
                });
            }
        }
    }
}

fn bytes_of(message: &Message) -> Vec<u8> {
    encode(message)
        .expect("the machines emit encodable messages")
        .to_vec()
}

/// Feeds `bytes` (one whole message) to `decoder` in uneven chunks.
fn decode(decoder: &mut Decoder, bytes: &[u8]) -> Result<Message, String> {
    let mut got = None;
    for chunk in bytes.chunks(7) {
        let mut input = chunk;
        while !input.is_empty() {
            match decoder.feed(&mut input) {
                Ok(Some(m)) => got = Some(m),
                Ok(None) => {}
                Err(e) => return Err(format!("{e}")),
            }
        }
    }
    got.ok_or_else(|| String::from("truncated message"))
}
