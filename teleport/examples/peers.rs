//! Named peers (moolib's `Rpc`): one learner and two actors in one program on
//! loopback, which call each other by name. `actor-1` connects to the
//! learner; `actor-2` connects only to `actor-1`, and finds the learner
//! through it; the learner calls both actors back by name. Every check that
//! fails makes the program exit non-zero.
//!
//! ```sh
//! cargo run --release -p teleport --example peers
//! ```

use std::time::Duration;

use teleport::peer::Peer;
use teleport::{tree, Array, Tree};

const STEPS: usize = 5;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tokio::time::timeout(Duration::from_secs(30), run())
        .await
        .map_err(|_| "the example did not finish within 30 s")?
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // The cohort shares a token; the learner serves the weights and takes
    // experience from a queue it works through itself (moolib's define_queue).
    let (learner, experience) = Peer::builder()
        .name("learner")
        .token("cohort-secret")
        .define("weights", |_: Tree| async move {
            Ok(tree!({"w": (Array::from_vec([4], vec![0.5f32; 4])?)}))
        })
        .define_queue("experience", 64);
    let learner = learner.listen("127.0.0.1:0").await?;
    let learned = tokio::spawn(async move {
        let mut frames = 0usize;
        while frames < 2 * STEPS {
            let Some(calls) = experience.recv_batch(8).await else {
                break;
            };
            for (args, responder) in calls {
                let obs: &[f32] = args.get("obs")?.as_slice()?;
                frames += 1;
                responder.respond(Ok(
                    tree!({"sum": (obs.iter().sum::<f32>() as f64), "seen": (frames as i64)}),
                ));
            }
        }
        Ok::<usize, teleport::TreeError>(frames)
    });
    println!("learner listens on {}", learner.local_addr().unwrap());

    // Each actor acts on observations; it pins the peer it connects to by
    // name, and trusts the peers that peer introduces.
    let actor = |name: &'static str| {
        Peer::builder()
            .name(name)
            .token("cohort-secret")
            .timeout(Duration::from_secs(10))
            .define("act", move |args: Tree| async move {
                let obs: &[f32] = args.get("obs")?.as_slice()?;
                Ok(tree!({"actor": (name), "action": (obs.iter().copied().fold(f32::MIN, f32::max) as f64)}))
            })
    };
    let actor1 = actor("actor-1")
        .trust("learner", learner.fingerprint())
        .listen("127.0.0.1:0")
        .await?;
    actor1.connect(learner.local_addr().unwrap()).await?;
    let actor2 = actor("actor-2")
        .trust("actor-1", actor1.fingerprint())
        .listen("127.0.0.1:0")
        .await?;
    actor2.connect(actor1.local_addr().unwrap()).await?;
    println!("actor-1 is connected to the learner; actor-2 only to actor-1");

    for step in 0..STEPS {
        for actor in [&actor1, &actor2] {
            // actor-2's first call finds the learner through actor-1.
            let weights = actor.call("learner", "weights", Tree::None).await?;
            let w: &[f32] = weights.get("w")?.as_slice()?;
            let obs =
                Array::from_vec([4], w.iter().map(|v| v * step as f32).collect::<Vec<f32>>())?;
            let reply = actor
                .call("learner", "experience", tree!({"obs": (obs)}))
                .await?;
            let expected = 2.0 * step as f64;
            if reply.get("sum")?.as_float()? != expected {
                return Err(format!(
                    "{}: the learner summed {reply}, expected {expected}",
                    actor.name()
                )
                .into());
            }
        }
    }
    println!("both actors sent {STEPS} steps of experience to the learner by name");

    // The learner calls the actors back by name: actor-2 greeted it when it
    // connected after discovery.
    for name in ["actor-1", "actor-2"] {
        let obs = Array::from_vec([3], vec![1.0f32, 3.0, 2.0])?;
        let reply = learner.call(name, "act", tree!({"obs": (obs)})).await?;
        if reply.get("actor")?.as_str()? != name || reply.get("action")?.as_float()? != 3.0 {
            return Err(format!("{name} answered {reply}").into());
        }
        println!("learner -> {name}: {reply}");
    }
    let frames = learned.await??;
    if frames != 2 * STEPS {
        return Err(format!("the learner took {frames} frames, expected {}", 2 * STEPS).into());
    }
    for peer in [&learner, &actor1, &actor2] {
        let names: Vec<String> = peer.peers().into_iter().map(|p| p.name).collect();
        println!("{} knows {names:?}", peer.name());
    }
    for peer in [&actor1, &actor2, &learner] {
        peer.shutdown(Duration::from_secs(1)).await;
    }
    println!("ok");
    Ok(())
}
