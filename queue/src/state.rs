//! The queues of one service behind one lock, and the one place items move:
//! [`State::dispatch`].
//!
//! Nothing here waits. A call that has to wait (a pull of an empty queue, a
//! push to a full one) leaves a waiter here, with a oneshot channel, and its
//! own task (in `service`) awaits the channel, its timeout and its call's
//! cancellation. Items are handed to waiters under the lock, and a waiter's
//! task withdraws itself under the lock before it gives up, so an item is
//! either in a queue, in exactly one waiter's channel, or leased: never two
//! of these, never none.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use teleport_protocol::{ErrorKind, RemoteError, Tree};
use tokio::sync::oneshot;

use crate::wire::{self, QUEUE_CLOSED, TOO_MANY_QUEUES, UNKNOWN_LEASE};
use crate::QueueConfig;

/// Every queue of a service, and the leases of acknowledged pulls.
#[derive(Debug, Default)]
pub(crate) struct State {
    queues: HashMap<String, Queue>,
    leases: HashMap<u64, Lease>,
    /// Numbers for waiters and leases; never reused.
    next_id: u64,
}

#[derive(Debug)]
pub(crate) struct Queue {
    /// The items, front first.
    pub(crate) items: VecDeque<Tree>,
    /// At most this many items queued and leased together; `None`: no bound.
    pub(crate) capacity: Option<usize>,
    /// Made by `declare`: kept while empty.
    declared: bool,
    pub(crate) closed: bool,
    /// Items out on leases, which may come back.
    pub(crate) leased: usize,
    /// Pulls waiting for an item, in arrival order. Only ever waiting while
    /// `items` is empty.
    pullers: VecDeque<Puller>,
    /// Pushes waiting for room, in arrival order. Only ever waiting while the
    /// queue is full.
    pushers: VecDeque<Pusher>,
}

impl Queue {
    fn new(capacity: Option<usize>) -> Queue {
        Queue {
            items: VecDeque::new(),
            capacity,
            declared: false,
            closed: false,
            leased: 0,
            pullers: VecDeque::new(),
            pushers: VecDeque::new(),
        }
    }

    /// Pulls waiting for an item now.
    pub(crate) fn waiting_pulls(&self) -> usize {
        self.pullers.len()
    }

    /// Pushes waiting for room now.
    pub(crate) fn waiting_pushes(&self) -> usize {
        self.pushers.len()
    }

    pub(crate) fn has_room(&self) -> bool {
        self.capacity
            .is_none_or(|capacity| self.items.len() + self.leased < capacity)
    }

    /// Takes up to `max` items from the front; with `stack`, only the run of
    /// items at the front that have the first one's layout (so that they
    /// stack, and the queue's order is kept).
    fn take(&mut self, max: usize, stack: bool) -> Vec<Tree> {
        let mut count = self.items.len().min(max);
        if stack {
            if let Some(first) = self.items.front().map(Tree::layout) {
                count = self
                    .items
                    .iter()
                    .take(count)
                    .take_while(|item| item.layout() == first)
                    .count();
            }
        }
        self.items.drain(..count).collect()
    }

    /// Puts `items` back at the front, in their order.
    fn give_back(&mut self, items: Vec<Tree>) {
        for item in items.into_iter().rev() {
            self.items.push_front(item);
        }
    }
}

/// What a pull asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Take {
    pub(crate) max: usize,
    pub(crate) stack: bool,
    /// An acknowledged pull: the items are leased to this connection.
    pub(crate) ack: Option<AckSpec>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AckSpec {
    pub(crate) connection: u64,
    pub(crate) timeout: Option<Duration>,
}

/// Items handed to one pull.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) items: Vec<Tree>,
    pub(crate) lease: Option<LeaseTicket>,
}

/// The puller's side of a lease: its number, and a channel that closes when
/// the lease is settled (acknowledged or given back).
#[derive(Debug)]
pub(crate) struct LeaseTicket {
    pub(crate) id: u64,
    pub(crate) settled: oneshot::Receiver<()>,
    pub(crate) timeout: Option<Duration>,
}

/// Items out on an acknowledged pull, kept until acknowledged so they can go
/// back to their queue.
#[derive(Debug)]
struct Lease {
    queue: String,
    items: Vec<Tree>,
    connection: u64,
    /// Dropped when the lease is settled, which ends its watcher.
    _settled: oneshot::Sender<()>,
}

pub(crate) type PullResult = Result<Delivery, RemoteError>;
pub(crate) type PushResult = Result<usize, RemoteError>;

#[derive(Debug)]
struct Puller {
    id: u64,
    take: Take,
    deliver: oneshot::Sender<PullResult>,
}

#[derive(Debug)]
struct Pusher {
    id: u64,
    item: Tree,
    /// The queue's length once the item went in, or why it never will.
    accepted: oneshot::Sender<PushResult>,
}

/// How a lease is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Done with: the items are gone for good.
    Ack,
    /// Given back: the items return to the front of their queue.
    Requeue,
}

pub(crate) fn closed_error(name: &str, what: &str) -> RemoteError {
    wire::error(
        ErrorKind::BadRequest,
        QUEUE_CLOSED,
        format!("the queue {name:?} is closed{what}"),
    )
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Queue> {
        self.queues.get(name)
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.queues.keys().cloned().collect()
    }

    /// The queue `name`, made (with the default capacity) if it does not exist.
    pub(crate) fn queue(
        &mut self,
        name: &str,
        config: &QueueConfig,
    ) -> Result<&mut Queue, RemoteError> {
        if !self.queues.contains_key(name) {
            if self.queues.len() >= config.max_queues {
                return Err(wire::error(
                    ErrorKind::Overloaded,
                    TOO_MANY_QUEUES,
                    format!(
                        "the server holds {} queues, as many as it allows; cannot make {name:?} \
                         (close or drain queues, or raise QueueConfig::max_queues)",
                        self.queues.len()
                    ),
                ));
            }
            self.queues
                .insert(name.to_owned(), Queue::new(config.default_capacity));
        }
        Ok(self.queues.get_mut(name).expect("inserted above"))
    }

    /// `declare`: the queue gets `capacity` and is kept while empty. Returns
    /// whether it was made now.
    pub(crate) fn declare(
        &mut self,
        name: &str,
        capacity: Option<usize>,
        config: &QueueConfig,
    ) -> Result<bool, RemoteError> {
        let created = !self.queues.contains_key(name);
        let queue = self.queue(name, config)?;
        queue.capacity = capacity;
        queue.declared = true;
        // More room may let waiting pushes in.
        self.dispatch(name);
        Ok(created)
    }

    /// Adds `item` at the back if there is room (and no earlier push waits
    /// for it); gives it back if not. `Ok(len)` with the queue's length.
    pub(crate) fn push(
        &mut self,
        name: &str,
        item: Tree,
        config: &QueueConfig,
    ) -> Result<Result<usize, Tree>, RemoteError> {
        let queue = self.queue(name, config)?;
        if queue.closed {
            return Err(closed_error(name, ": it takes no more items"));
        }
        if !queue.has_room() || !queue.pushers.is_empty() {
            return Ok(Err(item));
        }
        queue.items.push_back(item);
        let len = queue.items.len();
        self.dispatch(name);
        Ok(Ok(len))
    }

    /// Leaves a push waiting for room; returns its number and channel.
    pub(crate) fn wait_push(
        &mut self,
        name: &str,
        item: Tree,
    ) -> (u64, oneshot::Receiver<PushResult>) {
        let id = self.next_id();
        let (accepted, receiver) = oneshot::channel();
        if let Some(queue) = self.queues.get_mut(name) {
            queue.pushers.push_back(Pusher { id, item, accepted });
        }
        (id, receiver)
    }

    /// Takes a waiting push out; false if it is no longer waiting (its item
    /// went in, or it failed: the answer is in its channel).
    pub(crate) fn withdraw_push(&mut self, name: &str, id: u64) -> bool {
        let Some(queue) = self.queues.get_mut(name) else {
            return false;
        };
        let before = queue.pushers.len();
        queue.pushers.retain(|pusher| pusher.id != id);
        let withdrawn = queue.pushers.len() < before;
        self.forget_if_idle(name);
        withdrawn
    }

    /// Takes items for a pull now, if there are any. `Ok(None)`: the queue
    /// is empty but may get items. Fails if it is closed and drained.
    pub(crate) fn pull(
        &mut self,
        name: &str,
        take: Take,
        config: &QueueConfig,
    ) -> Result<Option<Delivery>, RemoteError> {
        let queue = self.queue(name, config)?;
        if queue.items.is_empty() {
            if queue.closed && queue.leased == 0 {
                return Err(closed_error(name, " and drained"));
            }
            return Ok(None);
        }
        let items = queue.take(take.max, take.stack);
        let lease = take
            .ack
            .map(|ack| self.lease(name, &items, ack.connection, ack.timeout));
        // Room was made: waiting pushes may go in.
        self.dispatch(name);
        self.forget_if_idle(name);
        Ok(Some(Delivery { items, lease }))
    }

    /// Leaves a pull waiting for items; returns its number and channel.
    pub(crate) fn wait_pull(
        &mut self,
        name: &str,
        take: Take,
    ) -> (u64, oneshot::Receiver<PullResult>) {
        let id = self.next_id();
        let (deliver, receiver) = oneshot::channel();
        if let Some(queue) = self.queues.get_mut(name) {
            queue.pullers.push_back(Puller { id, take, deliver });
        }
        (id, receiver)
    }

    /// Takes a waiting pull out; false if it is no longer waiting (it was
    /// given items, or failed: the answer is in its channel).
    pub(crate) fn withdraw_pull(&mut self, name: &str, id: u64) -> bool {
        let Some(queue) = self.queues.get_mut(name) else {
            return false;
        };
        let before = queue.pullers.len();
        queue.pullers.retain(|puller| puller.id != id);
        let withdrawn = queue.pullers.len() < before;
        self.forget_if_idle(name);
        withdrawn
    }

    /// Items handed to a pull that nobody awaits any more: back to the front
    /// of their queue (a lease is settled by giving them back).
    pub(crate) fn give_back(&mut self, name: &str, delivery: Delivery) {
        match delivery.lease {
            Some(ticket) => {
                let _ = self.settle(ticket.id, None, Settle::Requeue);
            }
            None => {
                if let Some(queue) = self.queues.get_mut(name) {
                    queue.give_back(delivery.items);
                    self.dispatch(name);
                }
            }
        }
    }

    /// `close`: no more pushes; waiting pushes fail, and pulls fail once the
    /// queue is drained. Returns the items still queued.
    pub(crate) fn close(&mut self, name: &str, config: &QueueConfig) -> Result<usize, RemoteError> {
        let queue = self.queue(name, config)?;
        queue.closed = true;
        let len = queue.items.len();
        self.dispatch(name);
        Ok(len)
    }

    fn lease(
        &mut self,
        name: &str,
        items: &[Tree],
        connection: u64,
        timeout: Option<Duration>,
    ) -> LeaseTicket {
        let id = self.next_id();
        let (settled_sender, settled) = oneshot::channel();
        self.leases.insert(
            id,
            Lease {
                queue: name.to_owned(),
                // Arrays share their buffers: this copies only the tree's shape.
                items: items.to_vec(),
                connection,
                _settled: settled_sender,
            },
        );
        if let Some(queue) = self.queues.get_mut(name) {
            queue.leased += items.len();
        }
        LeaseTicket {
            id,
            settled,
            timeout,
        }
    }

    /// Settles lease `id`. With `connection`, only that connection's lease
    /// (an `ack` from a client); `None` for the server itself (the holder's
    /// connection ended or its time ran out). Returns the number of items.
    pub(crate) fn settle(
        &mut self,
        id: u64,
        connection: Option<u64>,
        how: Settle,
    ) -> Result<usize, RemoteError> {
        let held = self
            .leases
            .get(&id)
            .is_some_and(|lease| connection.is_none_or(|c| c == lease.connection));
        let Some(lease) = held.then(|| self.leases.remove(&id)).flatten() else {
            return Err(wire::error(
                ErrorKind::BadRequest,
                UNKNOWN_LEASE,
                format!(
                    "lease {id} is not held by this connection: it was acknowledged already, \
                     given back (its connection ended or its ack timeout passed), or never \
                     made by this connection"
                ),
            ));
        };
        let count = lease.items.len();
        if let Some(queue) = self.queues.get_mut(&lease.queue) {
            queue.leased -= count;
            if how == Settle::Requeue {
                queue.give_back(lease.items);
            }
        }
        self.dispatch(&lease.queue);
        self.forget_if_idle(&lease.queue);
        Ok(count)
    }

    /// Moves items as far as they go: waiting pushes into free room, queued
    /// items to waiting pulls, in arrival order; then fails what a closed
    /// queue can no longer serve.
    fn dispatch(&mut self, name: &str) {
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        loop {
            let mut moved = false;
            while queue.has_room() {
                let Some(pusher) = queue.pushers.pop_front() else {
                    break;
                };
                queue.items.push_back(pusher.item);
                // The push's task withdraws itself under the lock before it
                // gives up, so it is there to hear this.
                let _ = pusher.accepted.send(Ok(queue.items.len()));
                moved = true;
            }
            while !queue.items.is_empty() {
                let Some(puller) = queue.pullers.pop_front() else {
                    break;
                };
                let items = queue.take(puller.take.max, puller.take.stack);
                let lease = puller.take.ack.map(|ack| {
                    let id = {
                        self.next_id += 1;
                        self.next_id
                    };
                    let (settled_sender, settled) = oneshot::channel();
                    self.leases.insert(
                        id,
                        Lease {
                            queue: name.to_owned(),
                            items: items.clone(),
                            connection: ack.connection,
                            _settled: settled_sender,
                        },
                    );
                    queue.leased += items.len();
                    LeaseTicket {
                        id,
                        settled,
                        timeout: ack.timeout,
                    }
                });
                if let Err(Ok(delivery)) = puller.deliver.send(Ok(Delivery { items, lease })) {
                    // Its task is gone (the runtime is shutting down): keep
                    // the items.
                    if let Some(ticket) = delivery.lease {
                        self.leases.remove(&ticket.id);
                        queue.leased -= delivery.items.len();
                    }
                    queue.give_back(delivery.items);
                    break;
                }
                moved = true;
            }
            if !moved {
                break;
            }
        }
        if queue.closed {
            for pusher in queue.pushers.drain(..) {
                let _ = pusher
                    .accepted
                    .send(Err(closed_error(name, " while the push waited for room")));
            }
            if queue.items.is_empty() && queue.leased == 0 {
                for puller in queue.pullers.drain(..) {
                    let _ = puller.deliver.send(Err(closed_error(name, " and drained")));
                }
            }
        }
    }

    /// Forgets a queue that holds nothing, was made implicitly and was not
    /// closed: indistinguishable from one that does not exist, and it must
    /// not take memory (or a place among `max_queues`) forever.
    pub(crate) fn forget_if_idle(&mut self, name: &str) {
        let idle = self.queues.get(name).is_some_and(|queue| {
            !queue.declared
                && !queue.closed
                && queue.items.is_empty()
                && queue.leased == 0
                && queue.pullers.is_empty()
                && queue.pushers.is_empty()
        });
        if idle {
            self.queues.remove(name);
        }
    }
}
