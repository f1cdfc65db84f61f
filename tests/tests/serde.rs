//! Typed calls: `call_as` with serde types, against a real server whose
//! functions use `from_tree`/`to_tree` themselves.

mod common;

use serde::{Deserialize, Serialize};
use teleport_client::{BlockingClient, Error};
use teleport_protocol::{from_tree, to_tree, Array, Tree};
use teleport_server::{typed, typed_blocking, Function, HandlerError};

use common::{within, Fixture};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Batch {
    images: Array,
    labels: Vec<String>,
    scale: f32,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Summary {
    count: usize,
    first_label: Option<String>,
    scaled: Array,
}

fn summarize(args: Tree) -> Result<Tree, HandlerError> {
    let batch: Batch = from_tree(args).map_err(|e| HandlerError::new(e.to_string()))?;
    let scaled: Vec<f32> = batch
        .images
        .as_slice::<f32>()?
        .iter()
        .map(|x| x * batch.scale)
        .collect();
    let summary = Summary {
        count: batch.labels.len(),
        first_label: batch.labels.first().cloned(),
        scaled: Array::from_vec(batch.images.shape(), scaled)?,
    };
    to_tree(&summary).map_err(|e| HandlerError::new(e.to_string()))
}

async fn fixture() -> Fixture {
    Fixture::start_with(|b| {
        b.bind("summarize", Function::blocking(summarize))
            .bind(
                "typed",
                typed(|batch: Batch| async move { Ok(batch.labels) }),
            )
            .bind(
                "typed_blocking",
                Function::blocking(typed_blocking(|batch: Batch| Ok(batch.scale))),
            )
    })
    .await
}

fn batch() -> Batch {
    Batch {
        images: Array::from_vec([2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap(),
        labels: vec!["cat".into(), "dog".into()],
        scale: 0.5,
    }
}

#[tokio::test]
async fn a_typed_call_sends_and_returns_serde_types() {
    let fixture = fixture().await;
    let client = fixture.client().await;
    let summary: Summary = within("summarize", client.call_as("summarize", &batch()))
        .await
        .unwrap();
    assert_eq!(summary.count, 2);
    assert_eq!(summary.first_label.as_deref(), Some("cat"));
    assert_eq!(summary.scaled.shape(), &[2, 2]);
    assert_eq!(
        summary.scaled.as_slice::<f32>().unwrap(),
        &[0.5, 1.0, 1.5, 2.0]
    );

    // The untyped server function `add` takes a map and returns an int.
    #[derive(Serialize)]
    struct Add {
        a: i64,
        b: i64,
    }
    let sum: i64 = within("add", client.call_as("add", &Add { a: 2, b: 40 }))
        .await
        .unwrap();
    assert_eq!(sum, 42);
}

#[tokio::test]
async fn conversion_errors_name_the_method_and_the_place() {
    let fixture = fixture().await;
    let client = fixture.client().await;

    // The reply is an int; asking for a Summary fails after the call.
    #[derive(Serialize)]
    struct Add {
        a: i64,
        b: i64,
    }
    let err = within(
        "add",
        client.call_as::<_, Summary>("add", &Add { a: 1, b: 2 }),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Response { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the reply of \"add\" did not convert to the type asked for: \
         at the root: invalid type: integer `3`, expected struct Summary"
    );

    // A request that does not convert is not sent.
    let err = within("bad request", client.call_as::<_, i64>("add", &[u64::MAX]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Request { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("at `[0]`: integer 18446744073709551615"),
        "{err}"
    );

    // The server's own conversion error comes back as the function's error.
    let err = within(
        "wrong args",
        client.call_as::<_, Summary>("summarize", &(1, 2)),
    )
    .await
    .unwrap_err();
    assert!(err.remote().is_some(), "{err:?}");
}

#[test]
fn the_blocking_client_makes_typed_calls() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fixture = runtime.block_on(fixture());
    let client = BlockingClient::connect(fixture.client_builder()).unwrap();
    let summary: Summary = client.call_as("summarize", &batch()).unwrap();
    assert_eq!(summary.count, 2);
    assert_eq!(
        summary.scaled.as_slice::<f32>().unwrap(),
        &[0.5, 1.0, 1.5, 2.0]
    );
    drop(client);
    runtime.block_on(fixture.server.shutdown(std::time::Duration::from_secs(1)));
}

#[tokio::test]
async fn typed_server_functions_take_and_return_serde_types() {
    let fixture = fixture().await;
    let client = fixture.client().await;
    let labels: Vec<String> = within("typed", client.call_as("typed", &batch()))
        .await
        .unwrap();
    assert_eq!(labels, vec!["cat".to_owned(), "dog".to_owned()]);
    let scale: f32 = within("typed_blocking", client.call_as("typed_blocking", &batch()))
        .await
        .unwrap();
    assert_eq!(scale, 0.5);
    // Arguments that do not fit fail the call, naming what is missing.
    let err = within(
        "bad arguments",
        client.call("typed", teleport_protocol::tree!({"scale": 1.0})),
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("TypeError") && message.contains("images"),
        "{message}"
    );
}
