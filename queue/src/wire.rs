//! The messages: the reserved function names, the keys of their argument
//! and result trees, and the type names of their errors. `docs/queues.md`
//! describes them for implementers in other languages.

use std::time::Duration;

use teleport_protocol::{ErrorKind, RemoteError, Tree};

/// Adds `item` to the back of a queue.
pub const PUSH: &str = "_queue.push";
/// Takes the item at the front of a queue, waiting for one up to a timeout.
pub const PULL: &str = "_queue.pull";
/// Takes up to `max` items from the front of a queue, optionally stacked.
pub const PULL_BATCH: &str = "_queue.pull_batch";
/// Reports how many items a queue holds.
pub const LEN: &str = "_queue.len";
/// Closes a queue: no more pushes; pulls drain it, then fail.
pub const CLOSE: &str = "_queue.close";
/// Creates a queue with a capacity (or changes the capacity of one).
pub const DECLARE: &str = "_queue.declare";
/// Acknowledges (or gives back) the items of an acknowledged pull.
pub const ACK: &str = "_queue.ack";
/// Gives back whatever an acknowledged pull got, by the claim its client
/// gave it, when the client stopped waiting for its reply.
pub const RELEASE: &str = "_queue.release";

/// Every reserved name a [`QueueService`](crate::QueueService) binds.
pub const FUNCTIONS: [&str; 8] = [PUSH, PULL, PULL_BATCH, LEN, CLOSE, DECLARE, ACK, RELEASE];

/// Error type name: the queue is full and the push did not wait (or waited
/// past its timeout). Kind `Overloaded`.
pub const QUEUE_FULL: &str = "QueueFull";
/// Error type name: the queue was closed (a push), or is closed and drained
/// (a pull). Kind `BadRequest`.
pub const QUEUE_CLOSED: &str = "QueueClosed";
/// Error type name: an `ack` of a lease that this connection does not hold
/// (acknowledged already, given back after its timeout, or never made).
/// Kind `BadRequest`.
pub const UNKNOWN_LEASE: &str = "UnknownLease";
/// Error type name: arguments that are not what the function takes. Kind
/// `BadRequest`.
pub const BAD_ARGUMENTS: &str = "QueueArguments";
/// Error type name: the server holds as many queues as it allows. Kind
/// `Overloaded`.
pub const TOO_MANY_QUEUES: &str = "TooManyQueues";
/// Error type name: an item larger than a queue may hold
/// ([`QueueConfig::max_queue_bytes`](crate::QueueConfig::max_queue_bytes)).
/// Kind `OverLimit`.
pub const ITEM_TOO_LARGE: &str = "ItemTooLarge";
/// Error type name: a stacked pull found an item at the front that does not
/// stack even alone (the item stays there). Kind `BadRequest`.
pub const QUEUE_UNSTACKABLE: &str = "QueueUnstackable";

/// A refusal of a call, as the caller receives it.
pub(crate) fn error(kind: ErrorKind, type_name: &str, message: impl Into<String>) -> RemoteError {
    RemoteError::new(kind, type_name, message.into())
}

pub(crate) fn bad_arguments(function: &str, message: impl std::fmt::Display) -> RemoteError {
    error(
        ErrorKind::BadRequest,
        BAD_ARGUMENTS,
        format!("{function}: {message}"),
    )
}

/// Reads the arguments of one call, saying which function and key is wrong.
pub(crate) struct Args<'a> {
    function: &'static str,
    tree: &'a Tree,
}

impl<'a> Args<'a> {
    pub(crate) fn new(function: &'static str, tree: &'a Tree) -> Result<Args<'a>, RemoteError> {
        if tree.as_map().is_err() {
            return Err(bad_arguments(
                function,
                format_args!("the arguments must be a map, not a {}", tree.kind_name()),
            ));
        }
        Ok(Args { function, tree })
    }

    fn optional(&self, key: &str) -> Option<&'a Tree> {
        match self.tree.get(key) {
            Ok(Tree::None) | Err(_) => None,
            Ok(value) => Some(value),
        }
    }

    fn wrong(&self, key: &str, expected: &str, found: &Tree) -> RemoteError {
        bad_arguments(
            self.function,
            format_args!("{key:?} must be {expected}, not a {}", found.kind_name()),
        )
    }

    /// The queue's name: a non-empty string of at most `max_len` bytes.
    pub(crate) fn queue(&self, max_len: usize) -> Result<&'a str, RemoteError> {
        let Some(value) = self.optional("queue") else {
            return Err(bad_arguments(
                self.function,
                "the queue's name is missing (key \"queue\")",
            ));
        };
        let name = value
            .as_str()
            .map_err(|_| self.wrong("queue", "a string", value))?;
        if name.is_empty() || name.len() > max_len {
            return Err(bad_arguments(
                self.function,
                format_args!(
                    "a queue's name takes 1 to {max_len} bytes, this one has {}",
                    name.len()
                ),
            ));
        }
        Ok(name)
    }

    pub(crate) fn flag(&self, key: &str) -> Result<bool, RemoteError> {
        match self.optional(key) {
            None => Ok(false),
            Some(value) => value
                .as_bool()
                .map_err(|_| self.wrong(key, "a bool", value)),
        }
    }

    /// A duration in seconds (an int or a float, not negative); `None` if
    /// absent or null.
    pub(crate) fn seconds(&self, key: &str) -> Result<Option<Duration>, RemoteError> {
        let Some(value) = self.optional(key) else {
            return Ok(None);
        };
        let seconds = match value {
            Tree::Int(i) => *i as f64,
            Tree::Float(x) => *x,
            other => return Err(self.wrong(key, "a number of seconds", other)),
        };
        Duration::try_from_secs_f64(seconds).map(Some).map_err(|_| {
            bad_arguments(
                self.function,
                format_args!("{key:?} must be a non-negative number of seconds, not {seconds}"),
            )
        })
    }

    /// A count of at least `min`; `None` if absent or null.
    pub(crate) fn count(&self, key: &str, min: usize) -> Result<Option<usize>, RemoteError> {
        let Some(value) = self.optional(key) else {
            return Ok(None);
        };
        let n = value
            .as_int()
            .map_err(|_| self.wrong(key, "an int", value))?;
        match usize::try_from(n) {
            Ok(n) if n >= min => Ok(Some(n)),
            _ => Err(bad_arguments(
                self.function,
                format_args!("{key:?} must be at least {min}, not {n}"),
            )),
        }
    }

    /// A non-negative int (a claim); `None` if absent or null.
    pub(crate) fn number(&self, key: &str) -> Result<Option<u64>, RemoteError> {
        let Some(value) = self.optional(key) else {
            return Ok(None);
        };
        let n = value
            .as_int()
            .map_err(|_| self.wrong(key, "an int", value))?;
        u64::try_from(n).map(Some).map_err(|_| {
            bad_arguments(
                self.function,
                format_args!("{key:?} must not be negative, not {n}"),
            )
        })
    }

    /// A lease number.
    pub(crate) fn lease(&self) -> Result<u64, RemoteError> {
        let Some(value) = self.optional("lease") else {
            return Err(bad_arguments(
                self.function,
                "the lease is missing (key \"lease\")",
            ));
        };
        let n = value
            .as_int()
            .map_err(|_| self.wrong("lease", "an int", value))?;
        u64::try_from(n).map_err(|_| bad_arguments(self.function, format_args!("no lease {n}")))
    }
}

/// Lengths and lease numbers as tree ints (which are `i64`).
pub(crate) fn int(n: impl TryInto<i64>) -> Tree {
    Tree::Int(n.try_into().unwrap_or(i64::MAX))
}
