//! Where large received messages are written.

use teleport_protocol::wire::{DataAllocator, DataBuffer};

/// Data sections of at least this many bytes are received into their own
/// anonymous mapping instead of the heap.
pub(crate) const LARGE_DATA: usize = 8 << 20;

/// Receives large data sections into fresh anonymous memory, asking the kernel
/// for transparent huge pages.
///
/// The one copy on receive writes into memory nobody has touched, so for a
/// 256 MiB array the kernel takes 65,536 page faults with 4 KiB pages; with
/// 2 MiB pages it takes 128. On this project's loopback benchmark that was the
/// difference between a one-way transfer well below bare quinn and one close to
/// it (see `docs/performance.md`). A mapping is page aligned, so arrays stay
/// 64-byte aligned; it is returned to the kernel when the last array of the
/// message is dropped.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LargeMessageMemory;

impl DataAllocator for LargeMessageMemory {
    fn allocate(&self, len: usize) -> Option<Box<dyn DataBuffer>> {
        if len < LARGE_DATA {
            return None;
        }
        // On failure the decoder falls back to the heap.
        let map = memmap2::MmapOptions::new().len(len).map_anon().ok()?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Some(Box::new(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_mapped_aligned_and_small_ones_left_to_the_heap() {
        assert!(LargeMessageMemory.allocate(1024).is_none());
        let mut buf = LargeMessageMemory.allocate(LARGE_DATA).expect("a mapping");
        let mem = (*buf).as_mut();
        assert_eq!(mem.len(), LARGE_DATA);
        assert_eq!(mem.as_ptr() as usize % 64, 0);
        mem[LARGE_DATA - 1] = 7;
        assert_eq!((*buf).as_ref()[LARGE_DATA - 1], 7);
    }
}
