//! [`MapStream`]: a function mapped over a stream of inputs across the pool.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use futures_util::{Stream, StreamExt};
use teleport_client::CallOptions;
use teleport_protocol::batch::{split, stack};
use teleport_protocol::{DType, Tree};

use crate::error::PoolError;
use crate::members::{Lease, Shared};
use crate::pool::{call_on, Placement};
use crate::Pool;

type Inputs = Pin<Box<dyn Stream<Item = Tree> + Send>>;
type Acquiring = Pin<Box<dyn Future<Output = Result<Lease, PoolError>> + Send>>;

/// The results of one call: one input's, or a chunk's.
enum Outcome {
    One(Result<Tree, PoolError>),
    Chunk(Vec<Result<Tree, PoolError>>),
}

type Call = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A function mapped over inputs across a [`Pool`]: a [`Stream`] of results,
/// one per input, in input order ([`Pool::map`]) or as they finish
/// ([`Pool::map_unordered`]).
///
/// Inputs are read only when a server has a free slot (and, in input order,
/// when no more than twice the pool's slots of results wait for an earlier
/// one), so memory is bounded however long the input is. A failed call
/// yields its error in its place and the map goes on. Busy servers (every
/// slot taken, or refusing calls as overloaded) never end a map: it waits
/// for them. Only a terminal error ends it ([`PoolError::is_terminal`]: no
/// server up for the pool's `server_wait`, or the pool closed): the map
/// reads no more inputs, yields the results of the calls still in flight
/// (in input order for an ordered map), then that error, last, then ends.
/// Dropping the stream stops reading inputs and cancels its calls in flight.
///
/// Set [`chunksize`](Self::chunksize), [`timeout`](Self::timeout) and
/// [`idempotent`](Self::idempotent) before polling it.
#[must_use = "a map does nothing until its stream is polled"]
pub struct MapStream {
    shared: Arc<Shared>,
    /// Keeps the pool open while the map runs.
    _pool: Pool,
    method: Arc<str>,
    options: CallOptions,
    chunksize: usize,
    ordered: bool,
    /// `None` once the inputs ended, or reading stopped after an error.
    inputs: Option<Inputs>,
    /// A slot held for the next input.
    lease: Option<Lease>,
    /// Waiting for a slot.
    acquiring: Option<Acquiring>,
    in_order: FuturesOrdered<Call>,
    as_done: FuturesUnordered<Call>,
    /// Results of a chunk not yet yielded.
    ready: VecDeque<Result<Tree, PoolError>>,
    /// Inputs read and not yet answered (in flight, or in `ready`).
    unanswered: usize,
    /// An input read before its slot was taken (see `start_calls`).
    peeked: Option<Tree>,
    /// The error that ends the map, yielded after the calls in flight.
    terminal: Option<PoolError>,
    /// The terminal error was yielded: the map is over.
    ended: bool,
}

impl fmt::Debug for MapStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapStream")
            .field("method", &self.method)
            .field("ordered", &self.ordered)
            .field("chunksize", &self.chunksize)
            .field("unanswered", &self.unanswered)
            .field("inputs_ended", &self.inputs.is_none())
            .finish_non_exhaustive()
    }
}

impl MapStream {
    pub(crate) fn new(pool: Pool, method: &str, inputs: Inputs, ordered: bool) -> MapStream {
        MapStream {
            shared: pool.shared().clone(),
            options: pool.default_options(method),
            _pool: pool,
            method: method.into(),
            chunksize: 1,
            ordered,
            inputs: Some(inputs),
            lease: None,
            acquiring: None,
            in_order: FuturesOrdered::new(),
            as_done: FuturesUnordered::new(),
            ready: VecDeque::new(),
            unanswered: 0,
            peeked: None,
            terminal: None,
            ended: false,
        }
    }

    /// Sends up to `n` inputs per call (default 1): the inputs ready when a
    /// slot frees up, stacked along a new leading axis with
    /// [`batch::stack`](teleport_protocol::batch::stack) (arrays of shape
    /// `s` become one array of shape `[k, s..]`, ints an `int64` array of
    /// shape `[k]`, maps and lists stack leaf by leaf). The function gets the
    /// stacked tree and must return a tree whose leaves have leading
    /// dimension `k`; it is split back into `k` results
    /// ([`batch::split`](teleport_protocol::batch::split)). When the chunk's
    /// inputs held no arrays (ints, floats, bools and trees of them), the
    /// rank-0 `int64`, `float64` and `bool` arrays the split leaves become
    /// ints, floats and bools again; inputs with arrays (rank-0 ones
    /// included) get arrays back. Inputs of one chunk that do not stack fail
    /// with [`PoolError::Stack`], a result that does not split with
    /// [`PoolError::Split`]; a failed call fails every input of its chunk.
    pub fn chunksize(mut self, n: usize) -> MapStream {
        self.chunksize = n.max(1);
        self
    }

    /// Fails each call with [`PoolError::Timeout`] if no reply arrives within
    /// `timeout` (instead of the pool's call timeout).
    pub fn timeout(mut self, timeout: Duration) -> MapStream {
        self.options = self.options.timeout(timeout);
        self
    }

    /// Whether the method may run twice: if so, a call lost with its server
    /// is sent to another (instead of failing with [`PoolError::ServerLost`]).
    /// Default: whether the pool marks the method idempotent.
    pub fn idempotent(mut self, idempotent: bool) -> MapStream {
        self.options = self.options.idempotent(idempotent);
        self
    }

    fn stop_reading(&mut self) {
        self.inputs = None;
        self.peeked = None;
        self.lease = None;
        self.acquiring = None;
    }

    /// A slot for the next call, or `Pending` (woken when one frees up).
    fn poll_lease(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PoolError>> {
        if self.lease.is_some() {
            return Poll::Ready(Ok(()));
        }
        if self.acquiring.is_none() {
            match self.shared.try_acquire()? {
                Some(lease) => {
                    self.lease = Some(lease);
                    return Poll::Ready(Ok(()));
                }
                None => {
                    let shared = self.shared.clone();
                    let method = self.method.clone();
                    self.acquiring = Some(Box::pin(async move { shared.acquire(&method).await }));
                }
            }
        }
        let acquiring = self.acquiring.as_mut().expect("set above");
        let lease = std::task::ready!(acquiring.as_mut().poll(cx))?;
        self.acquiring = None;
        self.lease = Some(lease);
        Poll::Ready(Ok(()))
    }

    /// Starts calls while there are free slots and inputs ready.
    fn start_calls(&mut self, cx: &mut Context<'_>) {
        while self.inputs.is_some() {
            if self.ordered && self.in_order.len() >= 2 * self.shared.capacity() {
                break;
            }
            // Inputs that say none is left are looked at before a slot is
            // taken: a map at its end must not end with an error instead.
            if let (None, Some(inputs)) = (&self.peeked, self.inputs.as_mut()) {
                if inputs.size_hint().1 == Some(0) {
                    match inputs.as_mut().poll_next(cx) {
                        Poll::Ready(Some(input)) => self.peeked = Some(input),
                        Poll::Ready(None) => {
                            self.inputs = None;
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
            }
            match self.poll_lease(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => {
                    // Held until the calls in flight have yielded theirs.
                    self.terminal = Some(error);
                    self.stop_reading();
                    break;
                }
                Poll::Pending => break,
            }
            let mut chunk: Vec<Tree> = self.peeked.take().into_iter().collect();
            while chunk.len() < self.chunksize {
                let Some(inputs) = self.inputs.as_mut() else {
                    break;
                };
                match inputs.as_mut().poll_next(cx) {
                    Poll::Ready(Some(input)) => chunk.push(input),
                    Poll::Ready(None) => self.inputs = None,
                    Poll::Pending => break,
                }
            }
            let lease = self.lease.take().expect("acquired above");
            if chunk.is_empty() {
                if self.inputs.is_some() {
                    // Keep the slot for when the next input arrives.
                    self.lease = Some(lease);
                }
                break;
            }
            self.push(lease, chunk);
        }
        if self.inputs.is_none() {
            self.stop_reading();
        }
    }

    fn push(&mut self, lease: Lease, chunk: Vec<Tree>) {
        self.unanswered += chunk.len();
        let call = self.chunk_call(lease, chunk);
        if self.ordered {
            self.in_order.push_back(call);
        } else {
            self.as_done.push(call);
        }
    }

    /// The call of one chunk, given its slot.
    fn chunk_call(&self, lease: Lease, mut chunk: Vec<Tree>) -> Call {
        let shared = self.shared.clone();
        let method = self.method.to_string();
        let options = self.options;
        if self.chunksize == 1 {
            let input = chunk.pop().expect("one input");
            return Box::pin(async move {
                Outcome::One(
                    call_on(shared, lease, method, input, options, Placement::AnyServer).await,
                )
            });
        }
        Box::pin(async move {
            let n = chunk.len();
            // Ints, floats and bools stack into arrays; rank-0 arrays do too.
            // Only inputs without arrays had scalars to give back.
            let scalars = chunk.iter().all(|input| input.arrays().next().is_none());
            let stacked = match stack(&chunk) {
                Ok(stacked) => stacked,
                Err(error) => {
                    let error = PoolError::Stack { method, error };
                    return Outcome::Chunk(vec![Err(error); n]);
                }
            };
            drop(chunk);
            let server = lease.name.to_string();
            let result = match call_on(
                shared,
                lease,
                method.clone(),
                stacked,
                options,
                Placement::AnyServer,
            )
            .await
            {
                Ok(result) => result,
                Err(error) => return Outcome::Chunk(vec![Err(error); n]),
            };
            match split(&result, n) {
                Ok(parts) if scalars => {
                    Outcome::Chunk(parts.into_iter().map(|t| Ok(unstack_scalars(t))).collect())
                }
                Ok(parts) => Outcome::Chunk(parts.into_iter().map(Ok).collect()),
                Err(error) => Outcome::Chunk(vec![
                    Err(PoolError::Split {
                        server,
                        method,
                        size: n,
                        error,
                    });
                    n
                ]),
            }
        })
    }
}

/// The rank-0 `int64`, `float64` and `bool` arrays a split leaves where
/// stacking made arrays of ints, floats and bools, as those scalars again
/// (for chunks whose inputs held no arrays).
fn unstack_scalars(tree: Tree) -> Tree {
    match tree {
        Tree::Array(a) if a.shape().is_empty() => {
            let scalar = match a.dtype() {
                DType::I64 => a.as_slice::<i64>().ok().map(|s| Tree::Int(s[0])),
                DType::F64 => a.as_slice::<f64>().ok().map(|s| Tree::Float(s[0])),
                DType::Bool => a.to_bools().ok().map(|s| Tree::Bool(s[0])),
                _ => None,
            };
            scalar.unwrap_or(Tree::Array(a))
        }
        Tree::List(items) => Tree::List(items.into_iter().map(unstack_scalars).collect()),
        Tree::Map(map) => {
            let mut out = teleport_protocol::Map::with_capacity(map.len());
            for (key, value) in map.iter() {
                out.insert(key, unstack_scalars(value.clone()));
            }
            Tree::Map(out)
        }
        other => other,
    }
}

impl Stream for MapStream {
    type Item = Result<Tree, PoolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            if let Some(result) = this.ready.pop_front() {
                this.unanswered -= 1;
                return Poll::Ready(Some(result));
            }
            this.start_calls(cx);
            let done = if this.ordered {
                this.in_order.poll_next_unpin(cx)
            } else {
                this.as_done.poll_next_unpin(cx)
            };
            match done {
                Poll::Ready(Some(Outcome::One(result))) => {
                    this.unanswered -= 1;
                    return Poll::Ready(Some(result));
                }
                Poll::Ready(Some(Outcome::Chunk(results))) => this.ready.extend(results),
                Poll::Ready(None) if this.inputs.is_none() => {
                    // Every call answered: the terminal error, if any, last.
                    this.ended = true;
                    return Poll::Ready(this.terminal.take().map(Err));
                }
                // Waiting for an input or a slot (both registered a wake-up).
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.ended {
            return (0, Some(0));
        }
        let pending = self.unanswered + usize::from(self.terminal.is_some());
        match &self.inputs {
            None => (pending, Some(pending)),
            Some(inputs) => {
                // The peeked input, if any, and the inputs left (a terminal
                // error would stand in for them, so it adds nothing).
                let peeked = usize::from(self.peeked.is_some());
                let (low, high) = inputs.size_hint();
                let read = pending + peeked;
                (
                    read.saturating_add(low),
                    high.and_then(|h| h.checked_add(read)),
                )
            }
        }
    }
}
