//! The README's quick start: a server and a client in one program, on loopback.
//!
//! ```sh
//! cargo run --release -p teleport --example readme
//! ```

use std::time::Duration;

use teleport::{tree, Array, Client, HandlerError, Server, Tree};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Bind named functions. Arguments and results are trees of arrays.
    let server = Server::builder()
        .bind("scale", |args: Tree| async move {
            let x: &[f32] = args.get("x")?.as_slice()?;
            let factor = args.get("factor")?.as_float()? as f32;
            let shape = args.get("x")?.as_array()?.shape().to_vec();
            let scaled: Vec<f32> = x.iter().map(|v| v * factor).collect();
            Ok::<Tree, HandlerError>(tree!({"y": (Array::from_vec(shape, scaled)?)}))
        })
        // Port 0 picks a free port; a self-signed certificate is made for us.
        .listen("127.0.0.1:0".parse()?)
        .await?;
    println!(
        "serving on {}, fingerprint {}",
        server.local_addr(),
        server.fingerprint()
    );

    // The client trusts exactly that certificate.
    let client = Client::builder(server.local_addr())
        .pin(server.fingerprint())
        .connect()
        .await?;

    // Calls return futures: start several, await them in any order.
    let obs = Array::from_vec([2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?;
    let double = client.call("scale", tree!({"x": (obs.clone()), "factor": 2.0}));
    let halve = client.call("scale", tree!({"x": (obs), "factor": 0.5}));
    let (halved, doubled) = (halve.await?, double.await?);
    println!("doubled: {:?}", doubled.get("y")?.as_slice::<f32>()?);
    println!("halved:  {:?}", halved.get("y")?.as_slice::<f32>()?);
    assert_eq!(doubled.get("y")?.as_array()?.shape(), &[2, 3]);

    // Errors are per call: the connection carries on.
    match client.call("scale", tree!({"factor": 2.0})).await {
        Ok(_) => return Err("a call without x should fail".into()),
        Err(e) => println!("without x: {e}"),
    }

    client.close();
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
