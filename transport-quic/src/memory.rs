//! Where received messages are written, and the budget their memory is
//! charged to.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::FxHashMap as HashMap;
use teleport_protocol::wire::{DataAllocator, DataBuffer};
use tokio::sync::Notify;

use crate::recycle::{Mapping, Recycler};

/// Data sections of at least this many bytes get mappings rounded up to
/// whole huge pages (smaller ones, to the first charging step).
pub(crate) const LARGE_DATA: usize = 8 << 20;

/// A data section is charged to its budget in steps of this size while its
/// first [`HUGE_PAGE`] bytes arrive...
const SMALL_STEP: usize = 64 << 10;
/// ... and in steps of a huge page after that.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Receives data sections past the first 64 KiB into anonymous memory (past
/// its first 2 MiB with transparent huge pages), kept by the connection for
/// reuse; smaller ones go to the decoder's heap buffer.
///
/// The one copy on receive writes into memory nobody has touched, so for a
/// 256 MiB array the kernel takes 65,536 page faults with 4 KiB pages; with
/// 2 MiB pages it takes 128. On this project's loopback benchmark that was the
/// difference between a one-way transfer well below bare quinn and one close to
/// it (see `docs/performance.md`). A mapping is page aligned, so arrays stay
/// 64-byte aligned.
///
/// A fresh mapping has the declared size but is only address space: pages
/// become memory as the bytes that fill them arrive. Its first 2 MiB keep
/// small pages, so a call that declares a gigabyte and sends one byte costs
/// 4 KiB, not a 2 MiB huge page. Once the message's arrays are dropped, the
/// mapping goes to the connection's [`Recycler`] for its next message of
/// about that size.
#[derive(Clone, Debug, Default)]
pub(crate) struct LargeMessageMemory {
    recycler: Option<Arc<Recycler>>,
}

impl LargeMessageMemory {
    pub(crate) fn new(recycler: Option<Arc<Recycler>>) -> LargeMessageMemory {
        LargeMessageMemory { recycler }
    }
}

impl DataAllocator for LargeMessageMemory {
    fn allocate(&self, len: usize) -> Option<Box<dyn DataBuffer>> {
        // A kept mapping spares a reply of 64 KiB-8 MiB the allocator's
        // fresh pages (or its zeroing) every call, as it does a larger one.
        if len <= SMALL_STEP {
            return None;
        }
        large_mapping(len, self.recycler.as_ref()).map(|m| Box::new(m) as Box<dyn DataBuffer>)
    }
}

/// A kept mapping of the connection's if one fits, else a fresh one.
fn large_mapping(len: usize, recycler: Option<&Arc<Recycler>>) -> Option<Mapping> {
    let map = match recycler.and_then(|r| r.take(len)) {
        Some(map) => map,
        None => map(len)?,
    };
    Some(Mapping::new(map, len, recycler))
}

/// The size a mapping for a section of `len` bytes is rounded up to a
/// multiple of (so a kept one fits the next message of about its size):
/// huge pages for large sections, the first charging step below that (a
/// kept mapping is charged whole when reused, so it should not be much
/// bigger than the section).
pub(crate) fn mapping_step(len: usize) -> usize {
    if len >= LARGE_DATA {
        HUGE_PAGE
    } else {
        SMALL_STEP
    }
}

/// A fresh anonymous mapping of at least `len` bytes, rounded up to a
/// multiple of [`mapping_step`].
fn map(len: usize) -> Option<memmap2::MmapMut> {
    let len = len.checked_next_multiple_of(mapping_step(len))?;
    // On failure the decoder falls back to the heap.
    let map = memmap2::MmapOptions::new().len(len).map_anon().ok()?;
    #[cfg(target_os = "linux")]
    {
        // Small pages for the start even where huge pages are the system's
        // default, huge ones for the rest.
        let _ = map.advise_range(memmap2::Advice::NoHugePage, 0, len.min(HUGE_PAGE));
        if len > HUGE_PAGE {
            let _ = map.advise_range(memmap2::Advice::HugePage, HUGE_PAGE, len - HUGE_PAGE);
        }
    }
    Some(map)
}

/// A bound on the memory that received data sections may hold: bytes are
/// reserved from it as they arrive (never the whole declared size up front,
/// except for a section received into a kept mapping, which is memory
/// already and is charged whole when taken, and a section no larger than
/// the first 64 KiB step, charged whole at its start) and given back when
/// the last array of the message is dropped.
///
/// A budget may have a parent ([`child`](Self::child)): a reservation must fit
/// in both. A server has one budget for all its connections and a child per
/// connection, so one connection cannot take all of the server's memory.
///
/// When a reservation does not fit, the stream receiving waits for memory to
/// be given back and stops reading meanwhile, so QUIC flow control stops the
/// sender; a message that could never fit (larger than the budget) fails at
/// its header with [`TransportError::MemoryBudget`](crate::TransportError::MemoryBudget).
///
/// Data sections still arriving are *claims*: each declared its size at its
/// header. While the claims together fit the budget, every one may grow. When
/// they do not (eight 256 MiB arrays arriving at once on a connection with a
/// 1 GiB budget), growing them all in step would leave each holding part of
/// the budget and waiting for the rest, for ever. So a claim grows only while
/// the claims can still all complete in some order, each with what the others
/// give back once they complete and their arrays are dropped (the banker's
/// rule): some arrive at full speed, the others wait, none deadlocks.
#[derive(Debug)]
pub struct MemoryBudget {
    name: &'static str,
    limit: usize,
    used: AtomicUsize,
    parent: Option<Arc<MemoryBudget>>,
    /// Shared by a budget and all its children: woken whenever any of them
    /// gives memory back or a claim ends.
    freed: Arc<Notify>,
    /// The data sections charged here that are still arriving.
    claims: Mutex<Claims>,
    /// Shared by a budget and all its children: grants are decided one at a
    /// time, so each sees every claim as it is.
    grants: Arc<Mutex<()>>,
}

/// A data section still arriving: what it declared and what it holds.
#[derive(Debug)]
struct Claim {
    need: usize,
    held: AtomicUsize,
}

#[derive(Debug, Default)]
struct Claims {
    open: HashMap<u64, Arc<Claim>>,
    /// The sum of the open claims' `need`.
    declared: usize,
}

/// Ids of claims, unique in the process.
static NEXT_CLAIM: AtomicU64 = AtomicU64::new(0);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryBudget {
    /// A budget of `limit` bytes; `name` says which budget it is in errors
    /// ("server", "connection").
    pub fn new(name: &'static str, limit: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            name,
            limit,
            used: AtomicUsize::new(0),
            parent: None,
            freed: Arc::new(Notify::new()),
            claims: Mutex::default(),
            grants: Arc::default(),
        })
    }

    /// A budget of at most `limit` bytes whose reservations are also charged
    /// to this one.
    pub fn child(self: &Arc<Self>, name: &'static str, limit: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            name,
            limit,
            used: AtomicUsize::new(0),
            parent: Some(self.clone()),
            freed: self.freed.clone(),
            claims: Mutex::default(),
            grants: self.grants.clone(),
        })
    }

    /// The bound, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The smallest limit of this budget and its parents, with the name of
    /// the budget that sets it: a message larger than this can never fit.
    pub(crate) fn tightest(&self) -> (usize, &'static str) {
        let mut best = (self.limit, self.name);
        let mut parent = self.parent.as_deref();
        while let Some(p) = parent {
            if p.limit < best.0 {
                best = (p.limit, p.name);
            }
            parent = p.parent.as_deref();
        }
        best
    }

    /// This budget and its parents, nearest first.
    fn chain(&self) -> impl Iterator<Item = &MemoryBudget> {
        std::iter::successors(Some(self), |b| b.parent.as_deref())
    }

    #[cfg(test)]
    fn try_reserve(&self, n: usize) -> bool {
        self.try_grant(n, None)
    }

    /// Reserves `n` bytes for `claim` (or for no claim) if they fit every
    /// budget of the chain and, for a claim, leave the claims of each able
    /// to complete (see the type's docs).
    fn try_grant(&self, n: usize, claim: Option<&(u64, Arc<Claim>)>) -> bool {
        let granted = self.grant_if(n, |budget| {
            claim.is_none_or(|(id, _)| budget.safe_after(*id, n))
        });
        let Some(_one_at_a_time) = granted else {
            return false;
        };
        if let Some((_, claim)) = claim {
            // Under the lock, so the next grant sees it.
            claim.held.fetch_add(n, Ordering::AcqRel);
        }
        true
    }

    /// Reserves `n` bytes for a data section that takes them whole, now, if
    /// they fit every budget of the chain together with everything the
    /// sections still arriving there declared. That is what a claim of `n`
    /// granted whole would be allowed while the claims all fit at once (see
    /// [`safe_after`](Self::safe_after)), without the bookkeeping of a claim:
    /// a section that holds all it needs can never wait, so it cannot take
    /// part in a deadlock. Sections of up to one charging step, most of
    /// them, come this way.
    fn try_grant_whole(&self, n: usize) -> bool {
        self.grant_if(n, |budget| {
            let declared = lock(&budget.claims).declared;
            declared
                .checked_add(n)
                .is_some_and(|total| total <= budget.limit)
        })
        .is_some()
    }

    /// Reserves `n` bytes if they fit every budget of the chain and
    /// `allowed` says yes for each; if it did, returns the lock under which
    /// grants are decided, still held.
    fn grant_if(
        &self,
        n: usize,
        allowed: impl Fn(&MemoryBudget) -> bool,
    ) -> Option<MutexGuard<'_, ()>> {
        let one_at_a_time = lock(&self.grants);
        for budget in self.chain() {
            let used = budget.used.load(Ordering::Acquire);
            if used.checked_add(n).is_none_or(|total| total > budget.limit) || !allowed(budget) {
                return None;
            }
        }
        for budget in self.chain() {
            budget.used.fetch_add(n, Ordering::AcqRel);
        }
        Some(one_at_a_time)
    }

    /// Whether, with `n` more bytes held by claim `id`, the open claims here
    /// can all still complete in some order: the one needing least first,
    /// each adding what it holds to what is free once its arrays are gone.
    fn safe_after(&self, id: u64, n: usize) -> bool {
        let claims = lock(&self.claims);
        if claims.declared <= self.limit {
            // They all fit at once.
            return true;
        }
        let mut held_by_claims = 0usize;
        let mut remaining: Vec<(usize, usize)> = claims
            .open
            .iter()
            .map(|(claim_id, claim)| {
                let mut held = claim.held.load(Ordering::Acquire);
                if *claim_id == id {
                    held = held.saturating_add(n);
                }
                held_by_claims = held_by_claims.saturating_add(held);
                (claim.need.saturating_sub(held), held)
            })
            .collect();
        remaining.sort_unstable();
        let mut free = self.limit.saturating_sub(held_by_claims);
        for (needs, holds) in remaining {
            if needs > free {
                return false;
            }
            free = free.saturating_add(holds);
        }
        true
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
        if let Some(parent) = &self.parent {
            parent.release(n);
        } else {
            self.freed.notify_waiters();
        }
    }

    /// Reserves `n` bytes for `claim`, waiting until they may be granted.
    async fn reserve(&self, n: usize, claim: Option<&(u64, Arc<Claim>)>) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_grant(n, claim) {
                return;
            }
            freed.await;
        }
    }
}

/// The memory one message's data section holds in a [`MemoryBudget`], given
/// back when the last handle (the stream receiving it, the message's buffer)
/// is dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<MemoryBudget>,
    held: AtomicUsize,
    /// While the data section arrives: its claim, open in every budget of
    /// the chain.
    claim: Mutex<Option<(u64, Arc<Claim>)>>,
}

impl Reservation {
    pub(crate) fn new(budget: Arc<MemoryBudget>) -> Reservation {
        Reservation {
            budget,
            held: AtomicUsize::new(0),
            claim: Mutex::new(None),
        }
    }

    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The data section declared `need` bytes: from now until
    /// [`end_claim`](Self::end_claim) it grows only as the budgets' claims
    /// allow. Once per reservation.
    pub(crate) fn claim(&self, need: usize) {
        let mut slot = lock(&self.claim);
        if slot.is_some() {
            return;
        }
        let id = NEXT_CLAIM.fetch_add(1, Ordering::Relaxed);
        let claim = Arc::new(Claim {
            need,
            held: AtomicUsize::new(self.held()),
        });
        let _one_at_a_time = lock(&self.budget.grants);
        for budget in self.budget.chain() {
            let mut claims = lock(&budget.claims);
            claims.open.insert(id, claim.clone());
            claims.declared = claims.declared.saturating_add(need);
        }
        *slot = Some((id, claim));
    }

    /// The data section has arrived (or will not): its claim ends, and
    /// claims waiting behind it may grow.
    pub(crate) fn end_claim(&self) {
        let Some((id, claim)) = lock(&self.claim).take() else {
            return;
        };
        {
            let _one_at_a_time = lock(&self.budget.grants);
            for budget in self.budget.chain() {
                let mut claims = lock(&budget.claims);
                if claims.open.remove(&id).is_some() {
                    claims.declared = claims.declared.saturating_sub(claim.need);
                }
            }
        }
        self.budget.freed.notify_waiters();
    }

    /// Grows the reservation to `total` bytes if that may be granted now.
    pub(crate) fn try_grow_to(&self, total: usize) -> bool {
        let held = self.held();
        if total <= held {
            return true;
        }
        let extra = total - held;
        let claim = lock(&self.claim).clone();
        if !self.budget.try_grant(extra, claim.as_ref()) {
            return false;
        }
        self.held.fetch_add(extra, Ordering::Relaxed);
        true
    }

    /// Grows the reservation to `total` bytes, waiting for memory if needed.
    pub(crate) async fn grow_to(&self, total: usize) {
        let held = self.held();
        if total <= held {
            return;
        }
        let extra = total - held;
        let claim = lock(&self.claim).clone();
        if !self.budget.try_grant(extra, claim.as_ref()) {
            self.budget.reserve(extra, claim.as_ref()).await;
        }
        self.held.fetch_add(extra, Ordering::Relaxed);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.end_claim();
        self.budget.release(*self.held.get_mut());
    }
}

/// How much of its budget a data section of `total` bytes holds once its
/// first `end` bytes are written: the pages they touch, rounded up to the
/// step the memory comes in.
pub(crate) fn charge(end: usize, total: usize) -> usize {
    let step = if end <= HUGE_PAGE {
        SMALL_STEP
    } else {
        HUGE_PAGE
    };
    end.div_ceil(step).saturating_mul(step).min(total)
}

/// Receives every data section into memory charged to a budget: those
/// within the first charging step into the heap, larger ones into a mapping
/// (as [`LargeMessageMemory`] does, kept for reuse alike). The
/// buffer holds the [`Reservation`], so the memory is given back when the
/// message's arrays are dropped; the stream takes a handle of it from
/// [`take`](Self::take) to grow it as bytes arrive.
#[derive(Debug)]
pub(crate) struct BudgetedMemory {
    budget: Arc<MemoryBudget>,
    recycler: Option<Arc<Recycler>>,
    made: Mutex<Option<Arc<Reservation>>>,
}

impl BudgetedMemory {
    pub(crate) fn new(
        budget: Arc<MemoryBudget>,
        recycler: Option<Arc<Recycler>>,
    ) -> BudgetedMemory {
        BudgetedMemory {
            budget,
            recycler,
            made: Mutex::new(None),
        }
    }

    pub(crate) fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    /// The reservation of the buffer allocated last, once.
    pub(crate) fn take(&self) -> Option<Arc<Reservation>> {
        self.made.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A buffer and the memory of the budget it holds.
struct Charged<B> {
    buf: B,
    range: std::ops::Range<usize>,
    _held: Held,
}

/// What a received data section holds of its budget until its buffer is
/// dropped (kept for its `Drop` only, hence never read).
#[allow(dead_code)]
enum Held {
    /// A reservation grown as the bytes arrived.
    Reservation(Arc<Reservation>),
    /// Bytes granted whole at the section's start.
    Whole(Whole),
}

/// Bytes of a budget granted whole to one data section.
struct Whole {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

impl Drop for Whole {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl<B: AsRef<[u8]>> AsRef<[u8]> for Charged<B> {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref()[self.range.clone()]
    }
}

impl<B: AsMut<[u8]>> AsMut<[u8]> for Charged<B> {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut()[self.range.clone()]
    }
}

impl DataAllocator for BudgetedMemory {
    fn allocate(&self, len: usize) -> Option<Box<dyn DataBuffer>> {
        // Only up to the first charging step: a section is charged that much
        // at its first byte anyway, so a peer that declares sections holds
        // no more than it would with one byte of each.
        if len <= SMALL_STEP && self.budget.try_grant_whole(len) {
            // No reservation for the stream to grow: everything is granted.
            *lock(&self.made) = None;
            return heap_buffer(
                len,
                Held::Whole(Whole {
                    budget: self.budget.clone(),
                    bytes: len,
                }),
            );
        }
        let reservation = Arc::new(Reservation::new(self.budget.clone()));
        *lock(&self.made) = Some(reservation.clone());
        // Beyond the first step a section is charged as its bytes arrive, so
        // its memory must become resident only as they arrive too: a mapping
        // (whose pages the kernel supplies on first write), not a zeroed heap
        // buffer, which is resident whole at once (a peer declaring 7 MiB
        // sections and sending one byte of each would otherwise hold 7 MiB
        // per call against 64 KiB charged).
        if len > SMALL_STEP {
            let recycler = self.recycler.as_ref();
            // A kept mapping is memory already: charged whole now if the
            // budget can take it, else lent (charged as its bytes arrive and
            // counted as kept until dropped), so what a stalled section holds
            // uncharged stays within the kept bound, and no fresh mapping is
            // zeroed while a kept one waits (`docs/performance.md`, "256 MiB
            // with 8 in flight").
            let kept = recycler.and_then(|r| {
                let (map, loan) = r.lend(len)?;
                Some(if reservation.try_grow_to(map.len()) {
                    drop(loan);
                    Mapping::new(map, len, Some(r))
                } else {
                    Mapping::lent(map, len, r, loan)
                })
            });
            if let Some(buf) = kept.or_else(|| map(len).map(|m| Mapping::new(m, len, recycler))) {
                return Some(Box::new(Charged {
                    buf,
                    range: 0..len,
                    _held: Held::Reservation(reservation),
                }));
            }
            // The system refused a mapping: a zeroed heap buffer is resident
            // whole at once, so it is charged whole first where the budgets
            // allow (where they do not, it is charged as its bytes arrive).
            let _ = reservation.try_grow_to(len);
        }
        heap_buffer(len, Held::Reservation(reservation))
    }
}

/// A 64-byte aligned buffer of `len` bytes on the heap, holding `held`.
/// Zeroing makes it resident whole at once: used for sections within the
/// first charging step (charged that much at their first byte anyway), and
/// for larger ones only when no mapping could be made.
fn heap_buffer(len: usize, held: Held) -> Option<Box<dyn DataBuffer>> {
    let mut buf: Vec<u8> = Vec::new();
    buf.try_reserve_exact(len.checked_add(63)?).ok()?;
    buf.resize(len + 63, 0);
    let skip = (64 - (buf.as_ptr() as usize) % 64) % 64;
    Some(Box::new(Charged {
        buf,
        range: skip..skip + len,
        _held: held,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_past_the_first_step_are_mapped_aligned_and_small_ones_left_to_the_heap() {
        assert!(LargeMessageMemory::default().allocate(1024).is_none());
        assert!(LargeMessageMemory::default().allocate(SMALL_STEP).is_none());
        for len in [SMALL_STEP + 1, 3 << 20, LARGE_DATA] {
            let mut buf = LargeMessageMemory::default()
                .allocate(len)
                .expect("a mapping");
            let mem = (*buf).as_mut();
            assert_eq!(mem.len(), len);
            assert_eq!(mem.as_ptr() as usize % 64, 0);
            mem[len - 1] = 7;
            assert_eq!((*buf).as_ref()[len - 1], 7);
        }
    }

    #[test]
    fn a_kept_mapping_is_charged_whole_when_reused_or_lent() {
        use crate::recycle::KeptMemory;
        let budget = MemoryBudget::new("server", 16 << 20);
        let recycler = Recycler::new(KeptMemory::new(), 1 << 30);
        let memory = BudgetedMemory::new(budget.clone(), Some(recycler.clone()));
        let first = memory.allocate(LARGE_DATA).expect("a buffer");
        let address = (*first).as_ref().as_ptr();
        drop((first, memory.take()));
        assert_eq!(budget.reserved(), 0);
        assert_eq!(recycler.kept_bytes(), LARGE_DATA);

        // Reused: the same memory, charged whole before a byte arrives.
        let again = memory.allocate(LARGE_DATA).expect("a buffer");
        assert_eq!((*again).as_ref().as_ptr(), address);
        assert_eq!(budget.reserved(), LARGE_DATA);
        drop((again, memory.take()));
        assert_eq!(budget.reserved(), 0);

        // When the budget cannot take it whole, it is lent: the same
        // memory, charged as its bytes arrive (nothing yet), and still
        // counted as kept, so nothing else can be kept in its place.
        assert!(budget.try_reserve(12 << 20));
        let lent = memory.allocate(LARGE_DATA).expect("a buffer");
        assert_eq!((*lent).as_ref().as_ptr(), address);
        assert_eq!(budget.reserved(), 12 << 20);
        assert_eq!(recycler.kept_bytes(), 0, "out of the recycler");
        assert_eq!(recycler.counted_bytes(), LARGE_DATA, "still counted");
        drop((lent, memory.take()));
        // Back in the recycler, counted once.
        assert_eq!(recycler.kept_bytes(), LARGE_DATA);
        assert_eq!(recycler.counted_bytes(), LARGE_DATA);
        budget.release(12 << 20);
    }

    #[test]
    fn charges_round_up_to_the_pages_written() {
        assert_eq!(charge(1, 1 << 30), 64 << 10);
        assert_eq!(charge(1, 100), 100);
        assert_eq!(charge(2 << 20, 1 << 30), 2 << 20);
        assert_eq!(charge((2 << 20) + 1, 1 << 30), 4 << 20);
        assert_eq!(charge(1 << 30, 1 << 30), 1 << 30);
    }

    #[tokio::test]
    async fn a_child_budget_is_charged_to_its_parent_and_waits_for_memory() {
        let server = MemoryBudget::new("server", 100);
        let a = server.child("connection", 80);
        let b = server.child("connection", 80);
        assert!(a.try_reserve(80));
        assert!(!a.try_reserve(1));
        assert!(!b.try_reserve(30));
        assert!(b.try_reserve(20));
        assert_eq!(server.reserved(), 100);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(30, None).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        a.release(50);
        waiting.await.unwrap();
        assert_eq!(
            (server.reserved(), a.reserved(), b.reserved()),
            (80, 30, 50)
        );
        assert_eq!(b.tightest(), (80, "connection"));
    }

    /// Two data sections of 80 bytes arriving at once on a budget of 100:
    /// grown in step, each would hold 50 and wait for the other for ever.
    #[tokio::test]
    async fn claims_that_do_not_fit_together_complete_one_after_the_other() {
        use futures_util::FutureExt;
        let connection = MemoryBudget::new("server", 1000).child("connection", 100);
        let a = Reservation::new(connection.clone());
        let b = Reservation::new(connection.clone());
        a.claim(80);
        b.claim(80);
        a.grow_to(50).now_or_never().expect("fits");
        // b's 50 would leave neither able to finish: it waits.
        let b_grows = tokio::spawn({
            let b = Arc::new(b);
            let handle = b.clone();
            async move {
                handle.grow_to(50).await;
                handle.grow_to(80).await;
                b
            }
        });
        tokio::task::yield_now().await;
        assert!(!b_grows.is_finished());
        a.grow_to(80).now_or_never().expect("a can always finish");
        a.end_claim();
        tokio::task::yield_now().await;
        assert!(!b_grows.is_finished(), "a's arrays still hold its memory");
        drop(a);
        let b = tokio::time::timeout(std::time::Duration::from_secs(5), b_grows)
            .await
            .expect("b finishes once a is gone")
            .unwrap();
        assert_eq!(connection.reserved(), 80);
        drop(b);
        assert_eq!(connection.reserved(), 0);
    }

    /// Claims that fit together grow in step, whatever their order.
    #[test]
    fn claims_that_fit_together_grow_freely() {
        use futures_util::FutureExt;
        let budget = MemoryBudget::new("connection", 100);
        let claims: Vec<_> = (0..4)
            .map(|_| {
                let r = Reservation::new(budget.clone());
                r.claim(25);
                r
            })
            .collect();
        for step in [10, 20, 25] {
            for r in &claims {
                r.grow_to(step).now_or_never().expect("fits");
            }
        }
        assert_eq!(budget.reserved(), 100);
    }

    /// Past the first step, sections of any size are received into a mapping
    /// (resident only as written) and reuse a kept one, charged whole.
    #[test]
    fn a_section_past_the_first_step_gets_a_mapping_kept_for_the_next() {
        use crate::recycle::KeptMemory;
        let budget = MemoryBudget::new("server", 64 << 20);
        let recycler = Recycler::new(KeptMemory::new(), 1 << 30);
        let memory = BudgetedMemory::new(budget.clone(), Some(recycler.clone()));
        let len = (1 << 20) + 100;
        let first = memory.allocate(len).expect("a buffer");
        let address = (*first).as_ref().as_ptr();
        drop((first, memory.take()));
        // Rounded up to the next 64 KiB, not to a huge page.
        assert_eq!(recycler.kept_bytes(), (1 << 20) + SMALL_STEP);
        let again = memory.allocate(len).expect("a buffer");
        assert_eq!((*again).as_ref().as_ptr(), address);
        assert_eq!((*again).as_ref().len(), len);
        assert_eq!(budget.reserved(), (1 << 20) + SMALL_STEP);
        drop((again, memory.take()));
        assert_eq!(budget.reserved(), 0);
        // A much smaller section does not take (and pay for) the kept one.
        let small = memory.allocate(SMALL_STEP + 1).expect("a buffer");
        assert_ne!((*small).as_ref().as_ptr(), address);
    }

    #[test]
    fn budgeted_buffers_are_aligned_and_give_their_memory_back() {
        let budget = MemoryBudget::new("server", 1 << 30);
        let memory = BudgetedMemory::new(budget.child("connection", 1 << 30), None);
        for len in [1, 1000, SMALL_STEP, SMALL_STEP + 1, LARGE_DATA] {
            let buf = memory.allocate(len).expect("a buffer");
            assert_eq!((*buf).as_ref().len(), len);
            assert_eq!((*buf).as_ref().as_ptr() as usize % 64, 0);
            if len <= SMALL_STEP {
                // Granted whole: nothing for the stream to grow.
                assert!(memory.take().is_none());
                assert_eq!(budget.reserved(), len);
            } else {
                let reservation = memory.take().expect("its reservation");
                futures_util::FutureExt::now_or_never(reservation.grow_to(charge(1, len)))
                    .expect("fits");
                assert!(budget.reserved() > 0);
                drop(reservation);
            }
            assert!(budget.reserved() > 0, "the buffer still holds it");
            drop(buf);
            assert_eq!(budget.reserved(), 0);
        }
    }

    /// A small section is granted whole only where it fits beside what the
    /// sections still arriving declared; otherwise it claims like any other,
    /// so it cannot take memory a claim needs to complete.
    #[test]
    fn a_small_section_is_granted_whole_only_beside_the_open_claims() {
        let budget = MemoryBudget::new("server", 1 << 20);
        let connection = budget.child("connection", 100_000);
        let memory = BudgetedMemory::new(connection.clone(), None);
        let arriving = Reservation::new(connection.clone());
        arriving.claim(60_000);
        let fits = memory.allocate(40_000).expect("a buffer");
        assert!(memory.take().is_none(), "granted whole");
        assert_eq!(connection.reserved(), 40_000);
        // 50,000 would fit what is free, but not beside the 60,000 declared.
        let beyond = memory.allocate(50_000).expect("a buffer");
        let reservation = memory.take().expect("a claim of its own");
        assert_eq!(reservation.held(), 0, "nothing granted up front");
        assert_eq!(connection.reserved(), 40_000);
        drop((fits, beyond, reservation));
        assert_eq!(connection.reserved(), 0);
        assert_eq!(budget.reserved(), 0);
    }
}
