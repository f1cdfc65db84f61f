//! What the pool's process tests share.

/// True while process `pid` runs (a zombie has stopped running).
pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => !status
            .lines()
            .any(|l| l.starts_with("State:") && (l.contains('Z') || l.contains('X'))),
        Err(_) => false,
    }
}
