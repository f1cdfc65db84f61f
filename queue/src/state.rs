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

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use teleport_protocol::{ErrorKind, RemoteError, Tree};
use tokio::sync::oneshot;

use crate::wire::{self, ITEM_TOO_LARGE, QUEUE_CLOSED, TOO_MANY_QUEUES, UNKNOWN_LEASE};
use crate::QueueConfig;

/// Claims released before their pull arrived, remembered so that the pull
/// takes nothing when it does (see [`State::release`]). Oldest forgotten
/// first: only a pull whose arguments arrive after its own release, and
/// after this many other early releases, can be missed, and its lease then
/// returns by its connection's end or ack timeout.
const MAX_EARLY_RELEASES: usize = 1024;

/// Who holds a lease: one connection of one installation of the service.
/// Connection numbers are unique only within one server, and a service (its
/// clones share the queues) may be installed on several servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Owner {
    pub(crate) installation: u64,
    pub(crate) connection: u64,
}

/// One queued item and the memory it is counted for.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) tree: Tree,
    pub(crate) bytes: usize,
}

impl Item {
    pub(crate) fn new(tree: Tree) -> Item {
        let bytes = item_bytes(&tree);
        Item { tree, bytes }
    }
}

impl Borrow<Tree> for Item {
    fn borrow(&self) -> &Tree {
        &self.tree
    }
}

/// The memory an item is counted for: its array, bytes and string data, and
/// a fixed cost per node (so that an item of many small leaves is not free).
pub(crate) fn item_bytes(tree: &Tree) -> usize {
    /// About what a node costs on the server: its `Tree` and its place in a
    /// `Vec` or map.
    const PER_NODE: usize = 48;
    let mut total = 0usize;
    let mut stack = vec![tree];
    while let Some(node) = stack.pop() {
        let own = match node {
            Tree::Array(a) => a.nbytes(),
            Tree::Bytes(b) => b.len(),
            Tree::Str(s) => s.len(),
            Tree::List(l) => {
                stack.extend(l.iter());
                0
            }
            Tree::Map(m) => {
                stack.extend(m.values());
                m.keys().map(str::len).sum()
            }
            _ => 0,
        };
        total = total.saturating_add(own).saturating_add(PER_NODE);
    }
    total
}

/// Every queue of a service, and the leases of acknowledged pulls.
#[derive(Debug)]
pub(crate) struct State {
    config: QueueConfig,
    queues: HashMap<String, Queue>,
    leases: HashMap<u64, Lease>,
    /// The lease made for each claimed pull, by its claim.
    claims: HashMap<(Owner, u64), u64>,
    /// See [`MAX_EARLY_RELEASES`].
    early_releases: VecDeque<(Owner, u64)>,
    /// Closed queues that were drained and forgotten, oldest first, at most
    /// `config.max_closed_names`: pushes to them still fail, pulls still
    /// see them closed.
    closed_names: HashSet<String>,
    closed_order: VecDeque<String>,
    /// Queues with waiting pushes, which memory freed in another queue may
    /// let in (the service-wide byte limit).
    pushing: BTreeSet<String>,
    /// Bytes of every queued and leased item.
    total_bytes: usize,
    /// Bytes left the service since the last dispatch: waiting pushes of
    /// other queues may fit now.
    freed: bool,
    /// Numbers for waiters and leases; never reused.
    next_id: u64,
}

#[derive(Debug)]
pub(crate) struct Queue {
    /// The items, front first.
    items: VecDeque<Item>,
    /// At most this many items queued and leased together.
    pub(crate) capacity: usize,
    /// Made by `declare`: kept while empty.
    declared: bool,
    pub(crate) closed: bool,
    /// Items out on leases, which may come back.
    pub(crate) leased: usize,
    /// Bytes of the queued and leased items.
    pub(crate) bytes: usize,
    /// Pulls waiting for an item, in arrival order. Only ever waiting while
    /// `items` is empty.
    pullers: VecDeque<Puller>,
    /// Pushes waiting for room, in arrival order. Only ever waiting while the
    /// queue is full.
    pushers: VecDeque<Pusher>,
}

impl Queue {
    fn new(capacity: usize) -> Queue {
        Queue {
            items: VecDeque::new(),
            capacity,
            declared: false,
            closed: false,
            leased: 0,
            bytes: 0,
            pullers: VecDeque::new(),
            pushers: VecDeque::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Pulls waiting for an item now.
    pub(crate) fn waiting_pulls(&self) -> usize {
        self.pullers.len()
    }

    /// Pushes waiting for room now.
    pub(crate) fn waiting_pushes(&self) -> usize {
        self.pushers.len()
    }

    fn idle(&self) -> bool {
        self.items.is_empty()
            && self.leased == 0
            && self.pullers.is_empty()
            && self.pushers.is_empty()
    }

    /// Takes up to `max` items from the front; with `stack`, only the run of
    /// items at the front that have the first one's layout (so that they
    /// stack, and the queue's order is kept).
    fn take(&mut self, max: usize, stack: bool) -> Vec<Item> {
        let mut count = self.items.len().min(max);
        if stack {
            if let Some(first) = self.items.front().map(|item| item.tree.layout()) {
                count = self
                    .items
                    .iter()
                    .take(count)
                    .take_while(|item| item.tree.layout() == first)
                    .count();
            }
        }
        self.items.drain(..count).collect()
    }

    /// Puts `items` back at the front, in their order.
    fn put_front(&mut self, items: Vec<Item>) {
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
    /// An acknowledged pull: the items are leased to `owner`.
    pub(crate) ack: Option<AckSpec>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AckSpec {
    pub(crate) owner: Owner,
    /// The client's number for this pull, to release it by if the client
    /// stops waiting for its reply (see [`State::release`]).
    pub(crate) claim: Option<u64>,
    pub(crate) timeout: Option<Duration>,
}

/// Items handed to one pull.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) items: Vec<Item>,
    pub(crate) lease: Option<LeaseTicket>,
}

impl Delivery {
    pub(crate) fn empty() -> Delivery {
        Delivery {
            items: Vec::new(),
            lease: None,
        }
    }
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
    items: Vec<Item>,
    owner: Owner,
    claim: Option<u64>,
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
    item: Item,
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
    pub(crate) fn new(config: QueueConfig) -> State {
        State {
            config,
            queues: HashMap::new(),
            leases: HashMap::new(),
            claims: HashMap::new(),
            early_releases: VecDeque::new(),
            closed_names: HashSet::new(),
            closed_order: VecDeque::new(),
            pushing: BTreeSet::new(),
            total_bytes: 0,
            freed: false,
            next_id: 0,
        }
    }

    pub(crate) fn config(&self) -> &QueueConfig {
        &self.config
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Queue> {
        self.queues.get(name)
    }

    /// Whether `name` is a closed queue that was drained and forgotten.
    pub(crate) fn is_closed_name(&self, name: &str) -> bool {
        self.closed_names.contains(name)
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.queues.keys().cloned().collect()
    }

    /// Bytes of every queued and leased item.
    pub(crate) fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Whether `queue` has room for an item of `bytes` now.
    fn has_room(&self, queue: &Queue, bytes: usize) -> bool {
        queue.items.len() + queue.leased < queue.capacity
            && queue.bytes.saturating_add(bytes) <= self.config.max_queue_bytes
            && self.total_bytes.saturating_add(bytes) <= self.config.max_total_bytes
    }

    /// The queue `name`, made (with the default capacity) if it does not
    /// exist. A closed name is refused with `closed`'s error.
    fn queue(&mut self, name: &str, closed: &str) -> Result<&mut Queue, RemoteError> {
        if self.closed_names.contains(name) {
            return Err(closed_error(name, closed));
        }
        if !self.queues.contains_key(name) {
            if self.queues.len() >= self.config.max_queues {
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
            let capacity = self.config.default_capacity;
            self.queues.insert(name.to_owned(), Queue::new(capacity));
        }
        Ok(self.queues.get_mut(name).expect("inserted above"))
    }

    /// `declare`: the queue gets `capacity` (at most `max_capacity`, which
    /// the caller checked) and is kept while empty. Returns whether it was
    /// made now.
    pub(crate) fn declare(&mut self, name: &str, capacity: usize) -> Result<bool, RemoteError> {
        let created = !self.queues.contains_key(name);
        let queue = self.queue(name, ": a closed queue cannot be declared again")?;
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
        item: Item,
    ) -> Result<Result<usize, Item>, RemoteError> {
        let max = self.config.max_queue_bytes;
        if item.bytes > max {
            return Err(wire::error(
                ErrorKind::OverLimit,
                ITEM_TOO_LARGE,
                format!(
                    "the item takes {} bytes, more than a queue may hold ({max} bytes, \
                     QueueConfig::max_queue_bytes): split it, or raise the limit",
                    item.bytes
                ),
            ));
        }
        let queue = self.queue(name, ": it takes no more items")?;
        if queue.closed {
            return Err(closed_error(name, ": it takes no more items"));
        }
        let queue = &self.queues[name];
        if !self.has_room(queue, item.bytes) || !queue.pushers.is_empty() {
            return Ok(Err(item));
        }
        self.total_bytes += item.bytes;
        let queue = self.queues.get_mut(name).expect("made above");
        queue.bytes += item.bytes;
        queue.items.push_back(item);
        let len = queue.items.len();
        self.dispatch(name);
        Ok(Ok(len))
    }

    /// Leaves a push waiting for room; returns its number and channel.
    pub(crate) fn wait_push(
        &mut self,
        name: &str,
        item: Item,
    ) -> (u64, oneshot::Receiver<PushResult>) {
        let id = self.next_id();
        let (accepted, receiver) = oneshot::channel();
        if let Some(queue) = self.queues.get_mut(name) {
            queue.pushers.push_back(Pusher { id, item, accepted });
            self.pushing.insert(name.to_owned());
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
        if queue.pushers.is_empty() {
            self.pushing.remove(name);
        }
        // The push behind it may fit where it did not.
        self.dispatch(name);
        self.forget_if_idle(name);
        withdrawn
    }

    /// Takes items for a pull now, if there are any. `Ok(None)`: the queue
    /// is empty but may get items. Fails if it is closed and drained.
    pub(crate) fn pull(&mut self, name: &str, take: Take) -> Result<Option<Delivery>, RemoteError> {
        if let Some(AckSpec {
            owner,
            claim: Some(claim),
            ..
        }) = take.ack
        {
            if let Some(at) = self
                .early_releases
                .iter()
                .position(|&c| c == (owner, claim))
            {
                // Its client stopped waiting before the pull arrived.
                self.early_releases.remove(at);
                return Ok(Some(Delivery::empty()));
            }
        }
        let queue = self.queue(name, " and drained")?;
        if queue.items.is_empty() {
            if queue.closed && queue.leased == 0 {
                return Err(closed_error(name, " and drained"));
            }
            return Ok(None);
        }
        let items = queue.take(take.max, take.stack);
        let delivery = self.deliver(name, items, take.ack);
        // Room was made: waiting pushes may go in.
        self.dispatch(name);
        self.forget_if_idle(name);
        Ok(Some(delivery))
    }

    /// Items taken from `name`'s queue for a pull: leased, or gone from the
    /// queue's memory.
    fn deliver(&mut self, name: &str, items: Vec<Item>, ack: Option<AckSpec>) -> Delivery {
        let lease = match ack {
            Some(ack) => Some(self.lease(name, &items, ack)),
            None => {
                let bytes: usize = items.iter().map(|item| item.bytes).sum();
                self.total_bytes -= bytes;
                self.freed = true;
                if let Some(queue) = self.queues.get_mut(name) {
                    queue.bytes -= bytes;
                }
                None
            }
        };
        Delivery { items, lease }
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
            None => self.put_back(name, delivery.items),
        }
    }

    /// Items of a pull without a lease, back at the front of their queue
    /// (made again if it was forgotten meanwhile, as a push would).
    fn put_back(&mut self, name: &str, items: Vec<Item>) {
        if items.is_empty() {
            return;
        }
        let capacity = self.config.default_capacity;
        let bytes: usize = items.iter().map(|item| item.bytes).sum();
        // Not refused for max_queues or the byte limits: the items were
        // counted a moment ago, and losing them is worse.
        let queue = self
            .queues
            .entry(name.to_owned())
            .or_insert_with(|| Queue::new(capacity));
        queue.bytes += bytes;
        queue.put_front(items);
        self.total_bytes += bytes;
        self.dispatch(name);
    }

    /// The items at the end of a delivery that its pull does not take after
    /// all (they did not stack with the ones before): back to the front of
    /// the queue, and out of the delivery's lease if it has one.
    pub(crate) fn give_back_tail(&mut self, name: &str, lease: Option<u64>, tail: Vec<Item>) {
        if tail.is_empty() {
            return;
        }
        let Some(id) = lease else {
            return self.put_back(name, tail);
        };
        let Some(lease) = self.leases.get_mut(&id) else {
            // Settled meanwhile (its connection ended): all its items went
            // back already.
            return;
        };
        let keep = lease.items.len().saturating_sub(tail.len());
        lease.items.truncate(keep);
        if let Some(queue) = self.queues.get_mut(name) {
            // Still counted in the queue's bytes: only no longer leased.
            queue.leased -= tail.len();
            queue.put_front(tail);
        }
        self.dispatch(name);
    }

    /// `close`: no more pushes; waiting pushes fail, and pulls fail once the
    /// queue is drained. Returns the items still queued. A name that is no
    /// queue is only remembered as closed (among at most
    /// `max_closed_names`), so closing names makes no queues.
    pub(crate) fn close(&mut self, name: &str) -> usize {
        let Some(queue) = self.queues.get_mut(name) else {
            self.remember_closed(name);
            return 0;
        };
        queue.closed = true;
        let len = queue.items.len();
        self.dispatch(name);
        self.forget_if_idle(name);
        len
    }

    fn remember_closed(&mut self, name: &str) {
        if self.config.max_closed_names == 0 || !self.closed_names.insert(name.to_owned()) {
            return;
        }
        self.closed_order.push_back(name.to_owned());
        while self.closed_order.len() > self.config.max_closed_names {
            if let Some(oldest) = self.closed_order.pop_front() {
                self.closed_names.remove(&oldest);
            }
        }
    }

    fn lease(&mut self, name: &str, items: &[Item], ack: AckSpec) -> LeaseTicket {
        let id = self.next_id();
        let (settled_sender, settled) = oneshot::channel();
        self.leases.insert(
            id,
            Lease {
                queue: name.to_owned(),
                // Arrays share their buffers: this copies only the tree's shape.
                items: items.to_vec(),
                owner: ack.owner,
                claim: ack.claim,
                _settled: settled_sender,
            },
        );
        if let Some(claim) = ack.claim {
            self.claims.insert((ack.owner, claim), id);
        }
        if let Some(queue) = self.queues.get_mut(name) {
            queue.leased += items.len();
        }
        LeaseTicket {
            id,
            settled,
            timeout: ack.timeout,
        }
    }

    /// Settles lease `id`. With `owner`, only that owner's lease (an `ack`
    /// from a client); `None` for the server itself (the holder's connection
    /// ended, its time ran out, its reply was not delivered). Returns the
    /// number of items.
    pub(crate) fn settle(
        &mut self,
        id: u64,
        owner: Option<Owner>,
        how: Settle,
    ) -> Result<usize, RemoteError> {
        let held = self
            .leases
            .get(&id)
            .is_some_and(|lease| owner.is_none_or(|o| o == lease.owner));
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
        if let Some(claim) = lease.claim {
            let key = (lease.owner, claim);
            if self.claims.get(&key) == Some(&id) {
                self.claims.remove(&key);
            }
        }
        let count = lease.items.len();
        let bytes: usize = lease.items.iter().map(|item| item.bytes).sum();
        if let Some(queue) = self.queues.get_mut(&lease.queue) {
            queue.leased -= count;
            match how {
                Settle::Requeue => queue.put_front(lease.items),
                Settle::Ack => {
                    queue.bytes -= bytes;
                    self.total_bytes -= bytes;
                    self.freed = true;
                }
            }
        }
        self.dispatch(&lease.queue);
        self.forget_if_idle(&lease.queue);
        Ok(count)
    }

    /// `release`: the client of `owner` stopped waiting for the reply of its
    /// pull `claim` of `name`. Whatever that pull got goes back to the front
    /// of the queue; if it still waits, it is withdrawn; if it has not
    /// arrived, it will take nothing. Returns the items given back.
    pub(crate) fn release(&mut self, name: &str, owner: Owner, claim: u64) -> usize {
        if let Some(&id) = self.claims.get(&(owner, claim)) {
            return self.settle(id, Some(owner), Settle::Requeue).unwrap_or(0);
        }
        let claimed = |puller: &Puller| {
            puller
                .take
                .ack
                .is_some_and(|ack| ack.owner == owner && ack.claim == Some(claim))
        };
        if let Some(queue) = self.queues.get_mut(name) {
            if let Some(at) = queue.pullers.iter().position(claimed) {
                if let Some(puller) = queue.pullers.remove(at) {
                    let _ = puller.deliver.send(Ok(Delivery::empty()));
                }
                self.forget_if_idle(name);
                return 0;
            }
        }
        // Not seen yet (or answered already, empty): remember it, bounded.
        self.early_releases.push_back((owner, claim));
        if self.early_releases.len() > MAX_EARLY_RELEASES {
            self.early_releases.pop_front();
        }
        0
    }

    /// Moves items as far as they go: waiting pushes into free room, queued
    /// items to waiting pulls, in arrival order; then fails what a closed
    /// queue can no longer serve. Memory freed here may let in the waiting
    /// pushes of other queues (the service-wide byte limit): those move too.
    pub(crate) fn dispatch(&mut self, name: &str) {
        self.dispatch_one(name);
        // Until a round frees nothing: pushes going in elsewhere may meet
        // waiting pulls there and free memory again.
        while std::mem::take(&mut self.freed) && !self.pushing.is_empty() {
            let waiting: Vec<String> = self.pushing.iter().cloned().collect();
            for other in &waiting {
                self.dispatch_one(other);
            }
        }
    }

    fn dispatch_one(&mut self, name: &str) {
        loop {
            let mut moved = false;
            while let Some(bytes) = self
                .queues
                .get(name)
                .and_then(|queue| queue.pushers.front())
                .map(|pusher| pusher.item.bytes)
            {
                if !self.has_room(&self.queues[name], bytes) {
                    break;
                }
                self.total_bytes += bytes;
                let queue = self.queues.get_mut(name).expect("looked up above");
                let pusher = queue.pushers.pop_front().expect("looked at above");
                queue.bytes += bytes;
                queue.items.push_back(pusher.item);
                // The push's task withdraws itself under the lock before it
                // gives up, so it is there to hear this.
                let _ = pusher.accepted.send(Ok(queue.items.len()));
                if queue.pushers.is_empty() {
                    self.pushing.remove(name);
                }
                moved = true;
            }
            loop {
                let Some(queue) = self.queues.get_mut(name) else {
                    return;
                };
                if queue.items.is_empty() {
                    break;
                }
                let Some(puller) = queue.pullers.pop_front() else {
                    break;
                };
                let items = queue.take(puller.take.max, puller.take.stack);
                let delivery = self.deliver(name, items, puller.take.ack);
                if let Err(Ok(delivery)) = puller.deliver.send(Ok(delivery)) {
                    // Its task is gone (the runtime is shutting down): keep
                    // the items.
                    self.give_back(name, delivery);
                    break;
                }
                moved = true;
            }
            if !moved {
                break;
            }
        }
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        if queue.closed {
            for pusher in queue.pushers.drain(..) {
                let _ = pusher
                    .accepted
                    .send(Err(closed_error(name, " while the push waited for room")));
            }
            self.pushing.remove(name);
            if queue.items.is_empty() && queue.leased == 0 {
                for puller in queue.pullers.drain(..) {
                    let _ = puller.deliver.send(Err(closed_error(name, " and drained")));
                }
            }
        }
    }

    /// Forgets a queue that holds nothing and nobody waits on: one made
    /// implicitly is indistinguishable from one that does not exist, and it
    /// must not take memory (or a place among `max_queues`) forever; a
    /// closed one is remembered by name only.
    pub(crate) fn forget_if_idle(&mut self, name: &str) {
        let Some(queue) = self.queues.get(name) else {
            return;
        };
        if !queue.idle() || (queue.declared && !queue.closed) {
            return;
        }
        let closed = queue.closed;
        self.queues.remove(name);
        self.pushing.remove(name);
        if closed {
            self.remember_closed(name);
        }
    }
}
