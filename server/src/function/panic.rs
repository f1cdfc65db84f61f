//! A panic in a bound function fails its own call, not the server.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use teleport_protocol::{ErrorKind, RemoteError};

/// A panic's message, if it has one.
pub(crate) fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic payload that is not a string)".to_owned())
}

/// The error a caller gets when `method` panicked.
pub(crate) fn panic_error(method: &str, panic: Box<dyn Any + Send>) -> RemoteError {
    let text = panic_text(&*panic);
    tracing::error!(method, panic = %text, "a bound function panicked");
    RemoteError::new(
        ErrorKind::Panic,
        "panic",
        format!("the function {method:?} panicked: {text}"),
    )
}

/// Runs `f`, turning a panic into the call's error.
pub(crate) fn catch<T>(method: &str, f: impl FnOnce() -> T) -> Result<T, RemoteError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|panic| panic_error(method, panic))
}

/// Awaits `future`, turning a panic into the call's error.
pub(crate) async fn catch_async<T>(
    method: &str,
    future: impl Future<Output = T>,
) -> Result<T, RemoteError> {
    AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|panic| panic_error(method, panic))
}
