//! The Teleport README example in Rust: a server binds `add` and `msg`, a
//! client calls them. Both run in this one program on loopback; they could as
//! well be two programs on two machines (see `two_process.rs`).
//!
//! ```sh
//! cargo run --release -p teleport --example readme
//! ```

use std::time::Duration;

use teleport::{tree, Array, Client, Server, Tree};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::builder()
        .bind("add", |data: Tree| async move {
            Ok(tree!({"result": (data.get("foo")?.as_int()? + data.get("bar")?.as_int()?)}))
        })
        .bind("msg", |data: Tree| async move {
            println!("Message from client: {}", data.get("msg")?.as_str()?);
            Ok(tree!(null))
        })
        // Arrays travel as they are in memory; this one is doubled.
        .bind("double", |data: Tree| async move {
            let x = data.get("x")?.as_array()?;
            let doubled: Vec<f32> = x.as_slice::<f32>()?.iter().map(|v| v * 2.0).collect();
            Ok(tree!({"y": (Array::from_vec(x.shape().to_vec(), doubled)?)}))
        })
        // Port 0 picks a free port; a self-signed certificate is made for it.
        .listen("127.0.0.1:0")
        .await?;

    // The client trusts exactly the server's certificate.
    let client = Client::builder(server.local_addr())
        .pin(server.fingerprint())
        .connect()
        .await?;
    let future = client.call("add", tree!({"foo": 1, "bar": 1}));
    let result = future.await?;
    println!("{result}"); // {"result": 2}
    assert_eq!(result, tree!({"result": 2}));
    client.call("msg", tree!({"msg": "Hello World"})).await?;

    let x = Array::from_vec([2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?;
    let y = client.call("double", tree!({"x": (x)})).await?;
    println!("doubled: {:?}", y.get("y")?.as_slice::<f32>()?);

    client.close();
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
