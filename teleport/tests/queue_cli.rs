//! `teleport queue serve`, `teleport push` and `teleport pull` as a user
//! runs them: separate processes on loopback; and a `teleport serve` whose
//! reader of stdout went away.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The bound of every wait here.
const WAIT: Duration = Duration::from_secs(20);

const TELEPORT: &str = env!("CARGO_BIN_EXE_teleport");

/// The server process, killed when dropped.
struct Serving {
    child: Child,
    addr: String,
    pin: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve() -> Serving {
    spawn_server(
        &[
            "queue",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "2",
        ],
        true,
    )
}

/// Starts `teleport ARGS` and reads the address and fingerprint it prints.
/// With `keep_reading` its stdout is read to the end; without, the pipe is
/// closed right after the fingerprint, as when a reader goes away.
fn spawn_server(args: &[&str], keep_reading: bool) -> Serving {
    let mut child = Command::new(TELEPORT)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the server");
    let stdout = child.stdout.take().expect("piped");
    // Read on a thread, so that a server that prints nothing fails the test
    // after WAIT instead of hanging it. Reading on to the end even once
    // nobody listens: a closed pipe fails the server's next line (it did
    // before `teleport serve` carried on past that, when this thread
    // stopped after the address and fingerprint).
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let last = !keep_reading && line.starts_with("fingerprint: ");
            let _ = lines_tx.send(line);
            if last {
                return;
            }
        }
    });
    let (mut addr, mut pin) = (None, None);
    while addr.is_none() || pin.is_none() {
        let line = lines
            .recv_timeout(WAIT)
            .expect("the server prints its address and fingerprint");
        if let Some(rest) = line.strip_prefix("teleport serving on ") {
            addr = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("fingerprint: ") {
            pin = Some(rest.trim().to_owned());
        }
    }
    Serving {
        child,
        addr: addr.unwrap(),
        pin: pin.unwrap(),
    }
}

/// Runs `teleport <command> --connect .. --pin .. <args>`, bounded by WAIT:
/// a thread waits for the process and hands its output over a channel, so
/// the test waits for the process itself, not in a loop of sleeps.
fn run(server: &Serving, command: &str, args: &[&str]) -> Output {
    let child = Command::new(TELEPORT)
        .arg(command)
        .args(["--connect", &server.addr, "--pin", &server.pin])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start teleport");
    let pid = child.id();
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    match done.recv_timeout(WAIT) {
        Ok(output) => output.expect("output"),
        Err(_) => {
            // The waiting thread owns the child: end it by its id.
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("teleport {command} {args:?} did not finish within {WAIT:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn push_and_pull_from_the_shell() {
    let server = serve();
    let pushed = run(&server, "push", &["jobs", r#"{"n": 1}"#]);
    assert!(pushed.status.success(), "{}", text(&pushed.stderr));
    assert!(
        text(&pushed.stdout).contains("1 queued"),
        "{}",
        text(&pushed.stdout)
    );
    let array = r#"{"x": {"__array__": {"dtype": "f32", "shape": [2], "fill": 2.5}}}"#;
    let pushed = run(&server, "push", &["jobs", array]);
    assert!(pushed.status.success(), "{}", text(&pushed.stderr));

    // The queue holds 2 (--capacity): a third push fails, and says why.
    let full = run(&server, "push", &["jobs", "3"]);
    assert!(!full.status.success());
    assert!(
        text(&full.stderr).contains("full"),
        "{}",
        text(&full.stderr)
    );

    let first = run(&server, "pull", &["jobs"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(first, serde_json::json!({"n": 1}));
    let second = run(&server, "pull", &["jobs", "--timeout", "1"]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    let second: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(second["x"]["__array__"]["shape"], serde_json::json!([2]));
    assert_eq!(
        second["x"]["__array__"]["first"],
        serde_json::json!([2.5, 2.5])
    );

    // Empty: a pull fails once its timeout passes.
    let empty = run(&server, "pull", &["jobs", "--timeout", "0.1"]);
    assert!(!empty.status.success());
    assert!(
        text(&empty.stderr).contains("no item"),
        "{}",
        text(&empty.stderr)
    );
}

#[test]
fn a_server_whose_stdout_is_closed_keeps_serving() {
    // `println!` panics on a closed pipe: the server died at its first
    // `--stats` line once its reader had gone.
    let server = spawn_server(
        &["serve", "--listen", "127.0.0.1:0", "--stats", "0.05"],
        false,
    );
    // Several --stats lines fall into the closed pipe meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    let called = run(&server, "call", &["echo", "[1, 2]"]);
    assert!(called.status.success(), "{}", text(&called.stderr));
    assert!(
        text(&called.stdout).contains('1'),
        "{}",
        text(&called.stdout)
    );
}
