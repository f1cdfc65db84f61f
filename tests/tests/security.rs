//! Who may connect and call: tokens, pinned certificates, mutual TLS, CA
//! roots, and clients that break the protocol.

mod common;

use std::sync::atomic::Ordering;

use common::{raw_connection, within, Fixture};
use teleport_client::{Client, ClientTls, ConnectError, Error, ErrorKind};
use teleport_protocol::{encode, tree, Call, Hello, Message, Tree};
use teleport_quic::{ClientAuth, Identity};

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused_before_any_function_runs() {
    let fixture = Fixture::start_with(|b| b.token("correct horse")).await;

    let err = within(
        "wrong token",
        fixture.client_builder().token("battery staple").connect(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connect {
                error: ConnectError::Rejected { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("token"), "{err}");

    let err = within("no token", fixture.client_builder().connect())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Connect {
                error: ConnectError::Rejected { .. },
                ..
            }
        ),
        "{err}"
    );

    let client = within(
        "right token",
        fixture.client_builder().token("correct horse").connect(),
    )
    .await
    .unwrap();
    let r = within("call", client.call("sleep", tree!(0.0)))
        .await
        .unwrap();
    assert_eq!(r, tree!("slept"));
    assert_eq!(fixture.counters.sleeps_started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_pinning_another_fingerprint_does_not_connect() {
    let fixture = Fixture::start().await;
    let other = Identity::self_signed(["localhost"]).unwrap().fingerprint();
    let err = within(
        "wrong pin",
        Client::builder(fixture.server.local_addr())
            .pin(other)
            .connect(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("not pinned"), "{err}");
    // A client that chose no way to trust the server is told what to do.
    let err = within(
        "no trust",
        Client::builder(fixture.server.local_addr()).connect(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("pin its fingerprint"), "{err}");
}

#[tokio::test]
async fn mutual_tls_admits_only_pinned_client_certificates() {
    let allowed = Identity::self_signed(["client"]).unwrap();
    let stranger = Identity::self_signed(["client"]).unwrap();
    let fp = allowed.fingerprint();
    let fixture =
        Fixture::start_with(move |b| b.client_auth(ClientAuth::Fingerprints(vec![fp]))).await;

    let client = within(
        "allowed",
        fixture.client_builder().identity(allowed).connect(),
    )
    .await
    .unwrap();
    assert_eq!(
        within("call", client.call("echo", tree!(1))).await.unwrap(),
        tree!(1)
    );

    for builder in [
        fixture.client_builder().identity(stranger),
        fixture.client_builder(),
    ] {
        // TLS 1.3 finishes the client's side of the handshake before the server
        // checks the certificate, so the refusal shows at connect or first call.
        let outcome = within("refused client", async {
            let client = builder.connect().await?;
            client.call("echo", tree!(1)).await
        })
        .await;
        assert!(
            outcome.is_err(),
            "a client without an allowed certificate got through"
        );
    }
}

fn ca_signed(ca: &rcgen::Issuer<'_, rcgen::KeyPair>, name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn ca_roots_verify_the_server_and_the_client() {
    let dir = std::env::temp_dir().join(format!("teleport-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);

    let write_pair = |name: &str, stem: &str| {
        let (cert, key) = ca_signed(&ca, name);
        let (c, k) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        Identity::from_pem_files(&c, &k).unwrap()
    };
    let server_identity = write_pair("localhost", "server");
    let client_identity = write_pair("client", "client");

    let client_auth = ClientAuth::ca_roots_pem_file(&ca_path).unwrap();
    let fixture =
        Fixture::start_with(move |b| b.identity(server_identity).client_auth(client_auth)).await;
    let tls = ClientTls::with_ca_roots_pem_file(&ca_path).unwrap();
    let client = within(
        "CA-verified connect",
        Client::builder(fixture.server.local_addr())
            .tls(tls.clone())
            .server_name("localhost")
            .identity(client_identity)
            .connect(),
    )
    .await
    .unwrap();
    assert_eq!(
        within("call", client.call("echo", tree!(7))).await.unwrap(),
        tree!(7)
    );

    // The certificate names localhost, not another host.
    let err = within(
        "wrong name",
        Client::builder(fixture.server.local_addr())
            .tls(tls)
            .server_name("example.com")
            .connect(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A call message, as a hostile or hand-written client would send it.
fn call(id: u64, method: &str, args: Tree) -> Message {
    Message::Call(Call {
        request_id: id,
        method: method.into(),
        timeout: None,
        args,
    })
}

#[tokio::test]
async fn a_call_before_the_hello_reaches_no_function() {
    let fixture = Fixture::start().await;
    let (_connector, connection) = raw_connection(&fixture).await;
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send(&call(1, "sleep", tree!(0.0))).await.unwrap();
    let answer = within("server answer", recv.receive(|_| {})).await;
    match answer {
        Ok(Some(Message::Goodbye(goodbye))) => {
            assert!(goodbye.message.contains("Hello"), "{goodbye:?}")
        }
        other => panic!("expected a Goodbye, got {other:?}"),
    }
    within("connection closed", connection.closed()).await;
    assert_eq!(fixture.counters.sleeps_started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn garbage_on_a_call_stream_fails_that_call_only() {
    let fixture = Fixture::start().await;
    let (_connector, connection) = raw_connection(&fixture).await;
    let (mut control, mut control_recv) = connection.open_stream().await.unwrap();
    control
        .send(&Message::Hello(Hello::default()))
        .await
        .unwrap();
    let hello = within("server hello", control_recv.receive(|_| {}))
        .await
        .unwrap();
    assert!(matches!(hello, Some(Message::Hello(_))), "{hello:?}");

    // Bad magic: the server answers on that stream, with request id 0.
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send_raw(b"this is not a teleport message at all....")
        .await
        .unwrap();
    send.finish();
    let reply = within("refusal", recv.receive(|_| {})).await.unwrap();
    let Some(Message::Reply(reply)) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(reply.request_id, 0);
    let error = reply.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::BadRequest);
    assert!(error.message.contains("could not be read"), "{error}");

    // A truncated call: a valid prefix, then the stream ends.
    let bytes = encode(&call(5, "echo", tree!([1, 2, 3]))).unwrap().to_vec();
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send_raw(&bytes[..bytes.len() - 3]).await.unwrap();
    send.finish();
    let reply = within("truncated", recv.receive(|_| {})).await.unwrap();
    let Some(Message::Reply(reply)) = reply else {
        panic!("{reply:?}")
    };
    let error = reply.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::BadRequest);
    assert!(
        error.message.contains("truncated") || error.message.contains("ended"),
        "{error}"
    );

    // A message of the wrong kind on a call stream.
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send(&Message::Ping { nonce: 1 }).await.unwrap();
    send.finish();
    let reply = within("wrong kind", recv.receive(|_| {})).await.unwrap();
    let Some(Message::Reply(reply)) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(reply.result.unwrap_err().kind, ErrorKind::BadRequest);

    // The connection still serves a proper call.
    let (mut send, mut recv) = connection.open_stream().await.unwrap();
    send.send(&call(9, "echo", tree!("still here")))
        .await
        .unwrap();
    send.finish();
    let reply = within("good call", recv.receive(|_| {})).await.unwrap();
    let Some(Message::Reply(reply)) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(
        (reply.request_id, reply.result.unwrap()),
        (9, tree!("still here"))
    );

    // And other clients never noticed.
    let client = fixture.client().await;
    assert_eq!(
        within("other client", client.call("echo", tree!(1)))
            .await
            .unwrap(),
        tree!(1)
    );
}

#[tokio::test]
async fn a_hello_of_another_protocol_version_is_refused_with_the_reason() {
    let fixture = Fixture::start().await;
    let (_connector, connection) = raw_connection(&fixture).await;
    let (mut send, _recv) = connection.open_stream().await.unwrap();
    let mut hello = encode(&Message::Hello(Hello::default())).unwrap().to_vec();
    // The byte after the 4-byte magic is the version.
    hello[4] = teleport_protocol::wire::VERSION + 1;
    send.send_raw(&hello).await.unwrap();
    send.finish();
    let closed = within("the server hangs up", connection.closed()).await;
    let text = closed.to_string();
    assert!(text.contains("version"), "{text}");
    // The server carries on for everyone else.
    let client = fixture.client().await;
    assert_eq!(
        within("call", client.call("echo", tree!(1))).await.unwrap(),
        tree!(1)
    );
}

#[tokio::test]
async fn functions_see_the_fingerprint_of_the_client_certificate() {
    let fixture = Fixture::start_with(|b| {
        b.client_auth(ClientAuth::AnyCertificate).bind(
            "whoami",
            |_: Tree, ctx: teleport_server::Context| async move {
                Ok(tree!((ctx.peer_fingerprint().map(|f| f.to_string()))))
            },
        )
    })
    .await;
    // Any certificate is accepted, and the function sees which.
    let identity = Identity::self_signed(["client"]).unwrap();
    let expected = identity.fingerprint().to_string();
    let client = within(
        "connect",
        fixture.client_builder().identity(identity).connect(),
    )
    .await
    .unwrap();
    let seen = within("call", client.call("whoami", tree!(null)))
        .await
        .unwrap();
    assert_eq!(seen, tree!((Some(expected))));
    // A client without a certificate is refused at the TLS level.
    let outcome = within("no certificate", async {
        let client = fixture.client_builder().connect().await?;
        client.call("whoami", tree!(null)).await
    })
    .await;
    assert!(
        matches!(&outcome, Err(e) if e.remote().is_none()),
        "a client without a certificate got through: {outcome:?}"
    );
}
