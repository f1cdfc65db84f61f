//! What the bench prints: one JSON object per line (`--json`) or tables
//! (Markdown, so a run can go into docs/performance.md as it is).

use serde_json::json;

/// One measurement of Teleport and the references measured beside it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Row {
    /// `echo`, `upload`, `download`, `small`, `clients` or `batched`.
    pub(crate) case: &'static str,
    pub(crate) payload_bytes: u64,
    pub(crate) inflight: usize,
    pub(crate) clients: usize,
    pub(crate) gbps: Option<f64>,
    pub(crate) calls_per_s: Option<f64>,
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
    pub(crate) max_us: Option<f64>,
    pub(crate) references: Vec<Reference>,
    /// Peak resident memory of the server process during Teleport's run.
    pub(crate) server_peak_rss: Option<u64>,
    /// Peak resident memory of the client (this) process during Teleport's run.
    pub(crate) client_peak_rss: Option<u64>,
    /// Resident memory of each side when the case started (what it kept
    /// from earlier cases is in the peak too).
    pub(crate) server_rss_before: Option<u64>,
    pub(crate) client_rss_before: Option<u64>,
    /// CPU time per call of the client (this) and the server process, in µs
    /// (small calls only).
    pub(crate) client_cpu_us_per_call: Option<f64>,
    pub(crate) server_cpu_us_per_call: Option<f64>,
    /// UDP datagrams received on the host (both directions) per call.
    pub(crate) datagrams_per_call: Option<f64>,
}

/// A reference measured in the same run, and Teleport's ratio to it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Reference {
    pub(crate) name: &'static str,
    pub(crate) gbps: Option<f64>,
    pub(crate) calls_per_s: Option<f64>,
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
    /// Teleport / reference for rates; for `clients`, Teleport's p99 over the
    /// p99 with one client (lower is better).
    pub(crate) ratio: Option<f64>,
    pub(crate) client_cpu_us_per_call: Option<f64>,
    pub(crate) server_cpu_us_per_call: Option<f64>,
    /// UDP datagrams received on the host (both directions) per call.
    pub(crate) datagrams_per_call: Option<f64>,
}

/// Teleport's figure over the reference's, when both are there.
pub(crate) fn ratio(teleport: Option<f64>, reference: Option<f64>) -> Option<f64> {
    match (teleport, reference) {
        (Some(t), Some(r)) if r > 0.0 => Some(t / r),
        _ => None,
    }
}

/// One JSON object per reference (one with `reference: null` if none).
/// `worker_threads`: of every process's runtime, if the bench set them.
pub(crate) fn json_lines(row: &Row, worker_threads: Option<usize>) -> Vec<String> {
    let line = |reference: Option<&Reference>| {
        json!({
            "case": row.case,
            "payload_bytes": row.payload_bytes,
            "inflight": row.inflight,
            "clients": row.clients,
            "gbps": row.gbps,
            "calls_per_s": row.calls_per_s,
            "p50_us": row.p50_us,
            "p99_us": row.p99_us,
            "max_us": row.max_us,
            "reference": reference.map(|r| r.name),
            "reference_gbps": reference.and_then(|r| r.gbps),
            "reference_calls_per_s": reference.and_then(|r| r.calls_per_s),
            "reference_p50_us": reference.and_then(|r| r.p50_us),
            "reference_p99_us": reference.and_then(|r| r.p99_us),
            "ratio": reference.and_then(|r| r.ratio),
            "peak_rss_bytes": row.server_peak_rss,
            "client_peak_rss_bytes": row.client_peak_rss,
            "server_rss_before_bytes": row.server_rss_before,
            "client_rss_before_bytes": row.client_rss_before,
            "client_cpu_us_per_call": row.client_cpu_us_per_call,
            "server_cpu_us_per_call": row.server_cpu_us_per_call,
            "reference_client_cpu_us_per_call": reference.and_then(|r| r.client_cpu_us_per_call),
            "reference_server_cpu_us_per_call": reference.and_then(|r| r.server_cpu_us_per_call),
            "datagrams_per_call": row.datagrams_per_call,
            "reference_datagrams_per_call": reference.and_then(|r| r.datagrams_per_call),
            "worker_threads": worker_threads,
        })
        .to_string()
    };
    if row.references.is_empty() {
        vec![line(None)]
    } else {
        row.references.iter().map(|r| line(Some(r))).collect()
    }
}

pub(crate) fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// CPU per call as "client + server".
fn cpu(client: Option<f64>, server: Option<f64>) -> String {
    match (client, server) {
        (Some(c), Some(s)) => format!("{c:.1} + {s:.1}"),
        (Some(c), None) => format!("{c:.1} + -"),
        _ => "-".to_owned(),
    }
}

fn with_ratio(value: Option<f64>, ratio: Option<f64>, digits: usize) -> String {
    match (value, ratio) {
        (Some(v), Some(r)) => format!("{v:.digits$} ({r:.2}x)"),
        (Some(v), None) => format!("{v:.digits$}"),
        _ => "-".to_owned(),
    }
}

fn reference<'a>(row: &'a Row, name: &str) -> Option<&'a Reference> {
    row.references.iter().find(|r| r.name == name)
}

fn memory(peak: Option<u64>, before: Option<u64>, held: u64) -> String {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let text = match peak {
        Some(peak) if held >= 1 << 20 => format!(
            "{:.0} MiB ({:.2}x)",
            peak as f64 / f64::from(1 << 20),
            peak as f64 / held as f64
        ),
        Some(peak) => format!("{:.0} MiB", peak as f64 / f64::from(1 << 20)),
        None => return "-".to_owned(),
    };
    match (peak, before) {
        (Some(peak), Some(before)) => format!("{text}, from {:.0}", mib(before.min(peak))),
        _ => text,
    }
}

/// The tables, as Markdown.
pub(crate) fn tables(rows: &[Row]) -> String {
    let mut out = String::new();
    let large: Vec<&Row> = rows
        .iter()
        .filter(|r| matches!(r.case, "echo" | "upload" | "download"))
        .collect();
    if !large.is_empty() {
        out.push_str(
            "GB/s (10^9 bytes/s; an echo counts both directions); in brackets Teleport's \
             figure over the reference's; peak memory with its ratio to the payload in flight in brackets, and the resident memory at the case's start\n\n",
        );
        out.push_str(
            "| case | size | in flight | Teleport | bare quinn | TLS/TCP | TCP | memcpy | \
             server peak | client peak |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for row in large {
            let cell = |name: &str| {
                reference(row, name)
                    .map_or_else(|| "-".to_owned(), |r| with_ratio(r.gbps, r.ratio, 2))
            };
            let held = row.payload_bytes * row.inflight as u64;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.case,
                size(row.payload_bytes),
                row.inflight,
                opt(row.gbps, 2),
                cell("quinn"),
                cell("tls-tcp"),
                cell("tcp"),
                reference(row, "memcpy").map_or_else(|| "-".to_owned(), |r| opt(r.gbps, 2)),
                memory(row.server_peak_rss, row.server_rss_before, held),
                memory(row.client_peak_rss, row.client_rss_before, held),
            ));
        }
        out.push('\n');
    }
    let small: Vec<&Row> = rows.iter().filter(|r| r.case == "small").collect();
    if !small.is_empty() {
        out.push_str(
            "Small calls (1 KiB echo), one client; latencies in µs; CPU in µs per call, \
             client + server process; UDP datagrams per call, both ways\n\n| in flight \
             | Teleport calls/s | p50 | p99 | max | CPU | datagrams | bare quinn calls/s | p50 \
             | p99 | CPU | datagrams | ratio |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for row in small {
            let quinn = reference(row, "quinn");
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.inflight,
                opt(row.calls_per_s, 0),
                opt(row.p50_us, 0),
                opt(row.p99_us, 0),
                opt(row.max_us, 0),
                cpu(row.client_cpu_us_per_call, row.server_cpu_us_per_call),
                opt(row.datagrams_per_call, 1),
                opt(quinn.and_then(|q| q.calls_per_s), 0),
                opt(quinn.and_then(|q| q.p50_us), 0),
                opt(quinn.and_then(|q| q.p99_us), 0),
                cpu(
                    quinn.and_then(|q| q.client_cpu_us_per_call),
                    quinn.and_then(|q| q.server_cpu_us_per_call)
                ),
                opt(quinn.and_then(|q| q.datagrams_per_call), 1),
                quinn
                    .and_then(|q| q.ratio)
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
            ));
        }
        out.push('\n');
    }
    let clients: Vec<&Row> = rows.iter().filter(|r| r.case == "clients").collect();
    if !clients.is_empty() {
        out.push_str(
            "Small-call latency (1 KiB echo, one call in flight, round robin over the clients \
             connected), µs\n\n| clients | p50 | p99 | max | p99 / p99 with 1 client |\n\
             | --- | --- | --- | --- | --- |\n",
        );
        for row in clients {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                row.clients,
                opt(row.p50_us, 0),
                opt(row.p99_us, 0),
                opt(row.max_us, 0),
                row.references
                    .first()
                    .and_then(|r| r.ratio)
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
            ));
        }
        out.push('\n');
    }
    for row in rows.iter().filter(|r| r.case == "batched") {
        let unbatched = reference(row, "unbatched");
        out.push_str(&format!(
            "Batching ({} in flight): batched {} calls/s, unbatched {} calls/s, ratio {}\n",
            row.inflight,
            opt(row.calls_per_s, 0),
            opt(unbatched.and_then(|u| u.calls_per_s), 0),
            unbatched
                .and_then(|u| u.ratio)
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
        ));
    }
    out
}
