//! Receive mappings (data sections of more than 64 KiB) kept, once their
//! arrays are dropped, for the next message of about their size on the same
//! connection.
//!
//! A fresh mapping costs the kernel a page fault and a page cleared for every
//! page the message fills. Measured on this project's 2-core VMs, clearing
//! fresh huge pages ran at a fraction of memory speed (the hypervisor backs
//! guest memory on first touch), so a 256 MiB echo swung between 0.4 and
//! 2.1 GB/s by where the kernel found its pages; `docs/performance.md`,
//! "Reused receive memory", has the figures. A mapping written once and
//! reused skips both: the next message of about the same size is written
//! into memory that is already there.
//!
//! What is kept is bounded three ways: a connection keeps at most
//! [`MAX_KEPT`] mappings, all connections of the process together at most
//! [`TransportConfig::recycled_receive_memory`](crate::TransportConfig::recycled_receive_memory)
//! bytes (counted across every endpoint: a pool's hundred clients share
//! one bound), and a connection's mappings are returned
//! to the kernel when the connection is dropped. A message that finds no
//! mapping of its size also returns the connection's smaller ones, so a
//! connection moving to bigger messages does not hold the old sizes beside
//! the new.
//!
//! A kept mapping goes to a section charged its whole size at once, or, when
//! the budget cannot take that much now, is lent to it: charged as its bytes
//! arrive like a fresh mapping, and still counted as kept (a [`Loan`]) until
//! it is dropped. So the memory that sections hold uncharged never exceeds
//! the bound on kept memory, as when the mapping stayed kept, while no fresh
//! mapping is zeroed beside a kept one that waits.
//!
//! Reuse exposes nothing of an earlier message: the decoder writes a data
//! section's every byte, in order, before any array of it is handed out, and
//! an array sees only its own bytes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use memmap2::MmapMut;

/// Mappings a connection keeps at most.
pub(crate) const MAX_KEPT: usize = 8;

/// The bytes kept by the recyclers that share it: in the library, one for
/// the whole process ([`KeptMemory::process`]).
#[derive(Debug, Default)]
pub(crate) struct KeptMemory {
    bytes: AtomicUsize,
}

impl KeptMemory {
    #[cfg(test)]
    pub(crate) fn new() -> Arc<KeptMemory> {
        Arc::default()
    }

    /// The count every connection of the process shares.
    pub(crate) fn process() -> Arc<KeptMemory> {
        static PROCESS: OnceLock<Arc<KeptMemory>> = OnceLock::new();
        PROCESS.get_or_init(Arc::default).clone()
    }

    fn give_back(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A connection's kept mappings.
#[derive(Debug)]
pub(crate) struct Recycler {
    shared: Arc<KeptMemory>,
    /// This connection keeps a mapping only while `shared` stays within
    /// this many bytes (its configuration's bound); 0 keeps none.
    limit: usize,
    kept: Mutex<Vec<MmapMut>>,
}

impl Recycler {
    pub(crate) fn new(shared: Arc<KeptMemory>, limit: usize) -> Arc<Recycler> {
        Arc::new(Recycler {
            shared,
            limit,
            kept: Mutex::new(Vec::new()),
        })
    }

    /// A kept mapping for a data section of `len` bytes: the smallest of at
    /// least `len` and at most an eighth (or one rounding step of
    /// [`mapping_step`](super::memory::mapping_step)) more, so a small
    /// message cannot pin a big mapping. Without one, the kept mappings
    /// smaller than `len` are returned to the kernel.
    pub(crate) fn take(&self, len: usize) -> Option<MmapMut> {
        // The loan ends here: the mapping counts as kept no longer.
        self.lend(len).map(|(map, _loan)| map)
    }

    /// [`take`](Self::take), with the mapping's bytes still counted as kept
    /// for as long as the [`Loan`] lives.
    pub(crate) fn lend(&self, len: usize) -> Option<(MmapMut, Loan)> {
        let slack = (len / 8).max(super::memory::mapping_step(len));
        let mut kept = self.lock();
        let fit = kept
            .iter()
            .enumerate()
            .filter(|(_, m)| m.len() >= len && m.len() - len <= slack)
            .min_by_key(|(_, m)| m.len())
            .map(|(i, _)| i);
        match fit {
            Some(i) => {
                let map = kept.swap_remove(i);
                let loan = Loan {
                    shared: self.shared.clone(),
                    bytes: map.len(),
                };
                Some((map, loan))
            }
            None => {
                let (smaller, rest): (Vec<_>, Vec<_>) = kept.drain(..).partition(|m| m.len() < len);
                *kept = rest;
                drop(kept);
                let freed: usize = smaller.iter().map(|m| m.len()).sum();
                self.shared.give_back(freed);
                drop(smaller); // unmapped outside the lock
                None
            }
        }
    }

    /// Keeps `map` if the bounds allow it; otherwise it is unmapped.
    pub(crate) fn keep(&self, map: MmapMut) {
        let len = map.len();
        let mut kept = self.lock();
        if kept.len() >= MAX_KEPT {
            return;
        }
        let limit = self.limit;
        let admitted = self
            .shared
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
                total.checked_add(len).filter(|&after| after <= limit)
            })
            .is_ok();
        if admitted {
            kept.push(map);
        }
    }

    /// Bytes this connection keeps.
    #[cfg(test)]
    pub(crate) fn kept_bytes(&self) -> usize {
        self.lock().iter().map(|m| m.len()).sum()
    }

    /// Bytes counted against the kept bound, lent mappings included.
    #[cfg(test)]
    pub(crate) fn counted_bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<MmapMut>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Recycler {
    fn drop(&mut self) {
        let kept = std::mem::take(self.kept.get_mut().unwrap_or_else(|p| p.into_inner()));
        let bytes: usize = kept.iter().map(|m| m.len()).sum();
        self.shared.give_back(bytes);
    }
}

/// Bytes of the kept bound still counted for a mapping taken out of a
/// recycler; given back when dropped.
#[derive(Debug)]
pub(crate) struct Loan {
    shared: Arc<KeptMemory>,
    bytes: usize,
}

impl Drop for Loan {
    fn drop(&mut self) {
        self.shared.give_back(self.bytes);
    }
}

/// A mapping holding one data section of `len` bytes; when dropped, it goes
/// back to the connection it came from, if that connection is still there.
#[derive(Debug)]
pub(crate) struct Mapping {
    map: Option<MmapMut>,
    len: usize,
    home: Weak<Recycler>,
    /// A kept mapping lent to a section not charged for it whole.
    loan: Option<Loan>,
}

impl Mapping {
    /// `map` (at least `len` bytes) for a section of `len` bytes, to be kept
    /// by `home` once dropped.
    pub(crate) fn new(map: MmapMut, len: usize, home: Option<&Arc<Recycler>>) -> Mapping {
        debug_assert!(map.len() >= len);
        Mapping {
            map: Some(map),
            len,
            home: home.map_or_else(Weak::new, Arc::downgrade),
            loan: None,
        }
    }

    /// A kept mapping lent by `home` (see [`Recycler::lend`]): its bytes
    /// count as kept until it is dropped.
    pub(crate) fn lent(map: MmapMut, len: usize, home: &Arc<Recycler>, loan: Loan) -> Mapping {
        let mut mapping = Mapping::new(map, len, Some(home));
        mapping.loan = Some(loan);
        mapping
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], |m| &m[..self.len])
    }
}

impl AsMut<[u8]> for Mapping {
    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        self.map.as_mut().map_or(&mut [], |m| &mut m[..len])
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // The loan ends first, so the mapping can be kept again.
        drop(self.loan.take());
        if let (Some(map), Some(home)) = (self.map.take(), self.home.upgrade()) {
            home.keep(map);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn anon(len: usize) -> MmapMut {
        MmapMut::map_anon(len).expect("an anonymous mapping")
    }

    #[test]
    fn a_dropped_mapping_is_reused_for_a_section_of_its_size() {
        let recycler = Recycler::new(KeptMemory::new(), 64 * MIB);
        let mut first = Mapping::new(anon(16 * MIB), 16 * MIB, Some(&recycler));
        first.as_mut()[0] = 7;
        let address = first.as_ref().as_ptr();
        drop(first);
        assert_eq!(recycler.kept_bytes(), 16 * MIB);
        let again = recycler.take(15 * MIB).expect("the kept mapping fits");
        assert_eq!(again.as_ptr(), address);
        assert_eq!(recycler.kept_bytes(), 0);
    }

    #[test]
    fn a_small_section_does_not_take_a_big_mapping_and_a_bigger_one_frees_the_small() {
        let recycler = Recycler::new(KeptMemory::new(), 1 << 30);
        drop(Mapping::new(anon(256 * MIB), 256 * MIB, Some(&recycler)));
        drop(Mapping::new(anon(16 * MIB), 16 * MIB, Some(&recycler)));
        assert!(recycler.take(8 * MIB).is_none(), "16 MiB is too big for 8");
        assert_eq!(
            recycler.kept_bytes(),
            272 * MIB,
            "nothing smaller than 8 MiB"
        );
        assert!(recycler.take(512 * MIB).is_none());
        assert_eq!(recycler.kept_bytes(), 0, "both were smaller than 512 MiB");
    }

    #[test]
    fn nothing_is_kept_past_the_limit_or_after_the_connection_is_gone() {
        let none = Recycler::new(KeptMemory::new(), 0);
        drop(Mapping::new(anon(MIB), MIB, Some(&none)));
        assert_eq!(none.kept_bytes(), 0);

        let recycler = Recycler::new(KeptMemory::new(), 64 * MIB);
        for _ in 0..MAX_KEPT + 2 {
            // Each is dropped at once, so the same few bytes come back.
            drop(Mapping::new(anon(MIB), MIB, Some(&recycler)));
        }
        let held: Vec<Mapping> = (0..MAX_KEPT + 2)
            .map(|_| Mapping::new(anon(MIB), MIB, Some(&recycler)))
            .collect();
        drop(held);
        assert_eq!(recycler.kept_bytes(), MAX_KEPT * MIB, "at most MAX_KEPT");

        let shared = recycler.shared.clone();
        let orphan = Mapping::new(anon(MIB), MIB, Some(&recycler));
        drop(recycler);
        assert_eq!(
            shared.bytes.load(Ordering::Relaxed),
            0,
            "given back with the connection"
        );
        drop(orphan); // its connection is gone: simply unmapped
        assert_eq!(shared.bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_lent_mapping_counts_as_kept_until_it_is_dropped() {
        let recycler = Recycler::new(KeptMemory::new(), 16 * MIB);
        drop(Mapping::new(anon(16 * MIB), 16 * MIB, Some(&recycler)));
        let (map, loan) = recycler.lend(16 * MIB).expect("the kept mapping fits");
        let lent = Mapping::lent(map, 16 * MIB, &recycler, loan);
        assert_eq!(recycler.kept_bytes(), 0);
        assert_eq!(recycler.counted_bytes(), 16 * MIB);
        // The bound is full while it is lent: nothing else is kept.
        drop(Mapping::new(anon(MIB), MIB, Some(&recycler)));
        assert_eq!(recycler.kept_bytes(), 0);
        // Dropped, it is kept again and counted once.
        drop(lent);
        assert_eq!(recycler.kept_bytes(), 16 * MIB);
        assert_eq!(recycler.counted_bytes(), 16 * MIB);
        // Taken (not lent), it counts no longer.
        let taken = recycler.take(16 * MIB).expect("kept again");
        assert_eq!(recycler.counted_bytes(), 0);
        drop(taken);
    }

    #[test]
    fn connections_share_one_bound() {
        let shared = KeptMemory::new();
        let a = Recycler::new(shared.clone(), 3 * MIB);
        let b = Recycler::new(shared.clone(), 3 * MIB);
        let held: Vec<Mapping> = (0..2)
            .flat_map(|_| {
                [
                    Mapping::new(anon(MIB), MIB, Some(&a)),
                    Mapping::new(anon(MIB), MIB, Some(&b)),
                ]
            })
            .collect();
        drop(held);
        assert_eq!(a.kept_bytes() + b.kept_bytes(), 3 * MIB);
        assert!(a.take(MIB).is_some());
        assert_eq!(shared.bytes.load(Ordering::Relaxed), 2 * MIB);
    }
}
