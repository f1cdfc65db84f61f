//! [`QueueConfig`]: the bounds of a queue service, and their validation.

/// The default [`QueueConfig::default_capacity`].
pub const DEFAULT_CAPACITY: usize = 1024;
/// The default [`QueueConfig::max_capacity`].
pub const DEFAULT_MAX_CAPACITY: usize = 65_536;
/// The default [`QueueConfig::max_queue_bytes`]: 256 MiB.
pub const DEFAULT_MAX_QUEUE_BYTES: usize = 256 << 20;
/// The default [`QueueConfig::max_total_bytes`]: 512 MiB.
pub const DEFAULT_MAX_TOTAL_BYTES: usize = 512 << 20;
/// The default [`QueueConfig::max_queues`].
pub const DEFAULT_MAX_QUEUES: usize = 10_000;
/// The default [`QueueConfig::max_closed_names`].
pub const DEFAULT_MAX_CLOSED_NAMES: usize = 4096;
/// The default [`QueueConfig::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 4096;

/// Settings of a [`QueueService`](crate::QueueService): how much its queues
/// may hold, so that producers faster than their consumers (or a hostile
/// client) cannot exhaust the server's memory.
///
/// A queue is full when its items (queued and leased) reach its capacity
/// *or* one more item would take it over [`max_queue_bytes`](Self::max_queue_bytes),
/// *or* the service over [`max_total_bytes`](Self::max_total_bytes).
/// Build one from [`QueueConfig::default`] with the `with_` methods; a
/// [`QueueService`](crate::QueueService) takes only settings that pass
/// [`validated`](Self::validated).
///
/// ```
/// use teleport_queue::{QueueConfig, QueueService};
///
/// let config = QueueConfig::default()
///     .with_default_capacity(64)
///     .with_max_queue_bytes(64 << 20);
/// let queues = QueueService::with_config(config)?;
/// # let _ = queues;
/// assert!(QueueConfig::default().with_default_capacity(0).validated().is_err());
/// # Ok::<(), teleport_queue::QueueConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueConfig {
    /// The capacity, in items, of a queue made by its first use (a push or
    /// a pull), rather than by `declare`. At least 1, at most
    /// [`max_capacity`](Self::max_capacity). Default [`DEFAULT_CAPACITY`].
    pub default_capacity: usize,
    /// The most items a queue may be declared to hold; `declare` asking for
    /// more is refused, and `declare` of an unbounded queue gets this.
    /// Default [`DEFAULT_MAX_CAPACITY`].
    pub max_capacity: usize,
    /// The most bytes one queue's items (queued and leased) may take. An
    /// item larger than this is refused with
    /// [`ITEM_TOO_LARGE`](crate::wire::ITEM_TOO_LARGE). Default
    /// [`DEFAULT_MAX_QUEUE_BYTES`].
    pub max_queue_bytes: usize,
    /// The most bytes the items of all queues together may take; at least
    /// [`max_queue_bytes`](Self::max_queue_bytes). Default
    /// [`DEFAULT_MAX_TOTAL_BYTES`].
    pub max_total_bytes: usize,
    /// Queues the server holds at once; making more fails with
    /// [`TOO_MANY_QUEUES`](crate::wire::TOO_MANY_QUEUES). An empty queue
    /// made by its first use is forgotten, and so is a closed one once
    /// drained, so this bounds queues that hold something or were declared.
    /// Default [`DEFAULT_MAX_QUEUES`].
    pub max_queues: usize,
    /// Names of closed, drained queues remembered as closed (so that pushes
    /// to them keep failing); beyond this the oldest is forgotten, and a
    /// push to it makes an open queue again. 0 remembers none. Default
    /// [`DEFAULT_MAX_CLOSED_NAMES`].
    pub max_closed_names: usize,
    /// The longest queue name, in bytes. Default 256.
    pub max_name_len: usize,
    /// The most items one `pull_batch` takes, whatever its `max`. Default
    /// [`DEFAULT_MAX_BATCH`].
    pub max_batch: usize,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            default_capacity: DEFAULT_CAPACITY,
            max_capacity: DEFAULT_MAX_CAPACITY,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            max_queues: DEFAULT_MAX_QUEUES,
            max_closed_names: DEFAULT_MAX_CLOSED_NAMES,
            max_name_len: 256,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

/// Why a [`QueueConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueueConfigError {
    /// A bound that must be at least 1 is 0.
    #[error("QueueConfig::{0} must be at least 1")]
    Zero(&'static str),
    /// The default capacity is over the most a queue may hold.
    #[error(
        "QueueConfig::default_capacity ({default_capacity}) is over max_capacity \
         ({max_capacity}): lower it, or raise max_capacity"
    )]
    DefaultOverMax {
        /// The default capacity given.
        default_capacity: usize,
        /// The most a queue may hold.
        max_capacity: usize,
    },
    /// One queue may hold more bytes than all of them together.
    #[error(
        "QueueConfig::max_queue_bytes ({max_queue_bytes}) is over max_total_bytes \
         ({max_total_bytes}): one queue cannot hold more than all of them"
    )]
    QueueOverTotal {
        /// The bytes one queue may hold.
        max_queue_bytes: usize,
        /// The bytes all queues may hold.
        max_total_bytes: usize,
    },
}

impl QueueConfig {
    /// These settings with this [`default_capacity`](Self::default_capacity).
    pub fn with_default_capacity(mut self, capacity: usize) -> QueueConfig {
        self.default_capacity = capacity;
        self
    }

    /// These settings with this [`max_capacity`](Self::max_capacity).
    pub fn with_max_capacity(mut self, max_capacity: usize) -> QueueConfig {
        self.max_capacity = max_capacity;
        self
    }

    /// These settings with this [`max_queue_bytes`](Self::max_queue_bytes).
    pub fn with_max_queue_bytes(mut self, bytes: usize) -> QueueConfig {
        self.max_queue_bytes = bytes;
        self
    }

    /// These settings with this [`max_total_bytes`](Self::max_total_bytes).
    pub fn with_max_total_bytes(mut self, bytes: usize) -> QueueConfig {
        self.max_total_bytes = bytes;
        self
    }

    /// These settings with this [`max_queues`](Self::max_queues).
    pub fn with_max_queues(mut self, max_queues: usize) -> QueueConfig {
        self.max_queues = max_queues;
        self
    }

    /// These settings with this [`max_closed_names`](Self::max_closed_names).
    pub fn with_max_closed_names(mut self, max: usize) -> QueueConfig {
        self.max_closed_names = max;
        self
    }

    /// These settings with this [`max_batch`](Self::max_batch).
    pub fn with_max_batch(mut self, max_batch: usize) -> QueueConfig {
        self.max_batch = max_batch;
        self
    }

    /// These settings, if they make sense together: every bound at least 1
    /// (but `max_closed_names`), the default capacity at most
    /// `max_capacity`, `max_queue_bytes` at most `max_total_bytes`.
    pub fn validated(self) -> Result<QueueConfig, QueueConfigError> {
        for (name, value) in [
            ("default_capacity", self.default_capacity),
            ("max_capacity", self.max_capacity),
            ("max_queue_bytes", self.max_queue_bytes),
            ("max_total_bytes", self.max_total_bytes),
            ("max_queues", self.max_queues),
            ("max_name_len", self.max_name_len),
            ("max_batch", self.max_batch),
        ] {
            if value == 0 {
                return Err(QueueConfigError::Zero(name));
            }
        }
        if self.default_capacity > self.max_capacity {
            return Err(QueueConfigError::DefaultOverMax {
                default_capacity: self.default_capacity,
                max_capacity: self.max_capacity,
            });
        }
        if self.max_queue_bytes > self.max_total_bytes {
            return Err(QueueConfigError::QueueOverTotal {
                max_queue_bytes: self.max_queue_bytes,
                max_total_bytes: self.max_total_bytes,
            });
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_nonsense_is_refused_with_its_reason() {
        assert_eq!(
            QueueConfig::default().validated(),
            Ok(QueueConfig::default())
        );
        let zero = QueueConfig::default().with_max_queues(0).validated();
        assert_eq!(zero, Err(QueueConfigError::Zero("max_queues")));
        let over = QueueConfig::default()
            .with_default_capacity(10)
            .with_max_capacity(5)
            .validated()
            .unwrap_err();
        assert!(over.to_string().contains("max_capacity (5)"), "{over}");
        let bytes = QueueConfig::default()
            .with_max_queue_bytes(2 << 30)
            .validated()
            .unwrap_err();
        assert!(matches!(bytes, QueueConfigError::QueueOverTotal { .. }));
        // Remembering no closed names is allowed.
        assert!(QueueConfig::default()
            .with_max_closed_names(0)
            .validated()
            .is_ok());
    }
}
