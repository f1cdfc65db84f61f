//! Limits a decoder enforces before it allocates anything.

/// Bounds on what one message may contain.
///
/// Every length the peer declares is compared against these before memory is
/// reserved for it, so a hostile peer can make the decoder hold at most about
/// `max_header_len + max_data_len` bytes per message in flight. The defaults suit a
/// server on the public internet that receives arrays of up to a few GiB; raise
/// `max_data_len` for larger ones (the format itself has 64-bit lengths).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Bytes of the postcard header (the tree's structure, names and scalars).
    pub max_header_len: u64,
    /// Bytes of array and bytes-leaf data, padding included.
    pub max_data_len: u64,
    /// Nesting depth of lists and maps: the root is at depth 0, a container's
    /// children (and map keys) one deeper; every node's depth must be
    /// `<= max_depth`. So `0` allows only a scalar or empty root, `1` a flat
    /// list or map.
    pub max_depth: usize,
    /// Nodes in a tree, the root and every map key counted; the count must be
    /// `<= max_nodes` (`{"a": 1}` is three nodes).
    pub max_nodes: usize,
    /// Axes of one array.
    pub max_rank: usize,
    /// Bytes of a method name, map key, agent, token or error type name.
    pub max_name_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_len: 16 << 20,
            max_data_len: 4 << 30,
            max_depth: 64,
            max_nodes: 1 << 20,
            max_rank: 32,
            max_name_len: 1024,
        }
    }
}

impl Limits {
    /// No limit but the address space. Only for peers you trust completely.
    pub fn unlimited() -> Self {
        Limits {
            max_header_len: u64::MAX,
            max_data_len: u64::MAX,
            max_depth: usize::MAX,
            max_nodes: usize::MAX,
            max_rank: usize::MAX,
            max_name_len: usize::MAX,
        }
    }
}
