//! The ordered completion hook (Teleport's `donefn`, Portal's `postfn`): runs
//! on the by-products of a function's calls one at a time, strictly in the
//! order the calls were admitted, whatever order they finish in.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

use super::panic::panic_text;

pub(crate) type Hook<B> = dyn Fn(B) + Send + Sync;

/// Runs a function's hook on its by-products strictly in the order the calls
/// were admitted, whatever order they finish in.
pub(crate) struct HookQueue<B> {
    method: String,
    hook: Box<Hook<B>>,
    state: Mutex<HookState<B>>,
}

struct HookState<B> {
    next_ticket: u64,
    /// The ticket whose hook runs next.
    next_to_run: u64,
    /// Calls finished out of turn, by ticket.
    finished: BTreeMap<u64, Finished<B>>,
    /// A thread is running hooks: at most one, which is what keeps them in order.
    draining: bool,
}

struct Finished<B> {
    /// `None`: the call failed, panicked or was dropped before it ran; its turn
    /// is skipped.
    by_product: Option<B>,
    /// Released only after the hook ran (backpressure).
    _admission: Option<OwnedSemaphorePermit>,
}

impl<B: Send + 'static> HookQueue<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HookState<B>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a turn. Must be called inside the runtime (it keeps its handle
    /// to start the hook thread from wherever the call finishes).
    pub(crate) fn ticket(queue: &Arc<Self>) -> HookTicket<B> {
        let number = {
            let mut state = queue.lock();
            state.next_ticket += 1;
            state.next_ticket - 1
        };
        HookTicket {
            queue: queue.clone(),
            number,
            by_product: None,
            admission: None,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Runs every hook whose turn has come, then stops (another finishing call
    /// starts the next drain).
    fn drain(&self) {
        loop {
            let mut finished = {
                let mut state = self.lock();
                let turn = state.next_to_run;
                match state.finished.remove(&turn) {
                    Some(finished) => {
                        state.next_to_run += 1;
                        finished
                    }
                    None => {
                        state.draining = false;
                        return;
                    }
                }
            };
            if let Some(by_product) = finished.by_product.take() {
                let hook = &self.hook;
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| hook(by_product)))
                {
                    tracing::error!(
                        method = %self.method,
                        panic = %panic_text(&*panic),
                        "a completion hook panicked; later hooks still run"
                    );
                }
            }
            // The admission slot is released here, after the hook.
            drop(finished);
        }
    }
}

/// A call's turn in its function's hook order. Dropping it hands over the
/// by-product (if set) and lets the next turns run.
pub(crate) struct HookTicket<B: Send + 'static> {
    queue: Arc<HookQueue<B>>,
    number: u64,
    pub(crate) by_product: Option<B>,
    admission: Option<OwnedSemaphorePermit>,
    runtime: tokio::runtime::Handle,
}

impl<B: Send + 'static> HookTicket<B> {
    /// Keeps the call's admission slot until its hook has run (backpressure).
    pub(crate) fn hold(&mut self, admission: OwnedSemaphorePermit) {
        self.admission = Some(admission);
    }
}

impl<B: Send + 'static> Drop for HookTicket<B> {
    fn drop(&mut self) {
        let start_drain = {
            let mut state = self.queue.lock();
            state.finished.insert(
                self.number,
                Finished {
                    by_product: self.by_product.take(),
                    _admission: self.admission.take(),
                },
            );
            let ready = state.finished.contains_key(&state.next_to_run);
            if ready && !state.draining {
                state.draining = true;
                true
            } else {
                false
            }
        };
        if start_drain {
            let queue = self.queue.clone();
            // Hooks may block; they get a thread of their own.
            drop(self.runtime.spawn_blocking(move || queue.drain()));
        }
    }
}

impl<B: Send + 'static> HookQueue<B> {
    /// A queue running `hook` for the function bound as `method`.
    pub(crate) fn new(method: &str, hook: Box<Hook<B>>) -> HookQueue<B> {
        HookQueue {
            method: method.to_owned(),
            hook,
            state: Mutex::new(HookState {
                next_ticket: 0,
                next_to_run: 0,
                finished: BTreeMap::new(),
                draining: false,
            }),
        }
    }
}
