//! What the pool's test files share.

use std::time::Duration;

use tokio::time::timeout;

/// Every wait in these tests is bounded by this.
pub(crate) const LIMIT: Duration = Duration::from_secs(20);

/// Waits until `check` holds, bounded by LIMIT, yielding between looks (the
/// state is changed by other tasks of this runtime).
pub(crate) async fn until(what: &str, mut check: impl FnMut() -> bool) {
    timeout(LIMIT, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}
